"""``cl-arch adapt``: talk to a model whose fast memory learns from your rewards.

Reads lines from stdin. A line that is ``+`` or ``-`` (reward 1 / -1) or a number rewards the
last completion (a three-factor commit into the session's persistent memory); any other line is
a prompt (UTF-8 bytes as tokens) and gets a completion on stdout. On end of input the session
is saved atomically to ``--session`` (loaded from there at start if it exists). An episode that
was never rewarded is not committed.
"""
import os
import sys

from cl_arch import PlasticTransformer, Session


def add_parser(sub):
    p = sub.add_parser("adapt", help="interactive generation with reward-driven adaptation")
    p.add_argument("--model", required=True, help="checkpoint folder (save_pretrained)")
    p.add_argument("--session", required=True, help="session state file (created if missing)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the session's sampler")
    p.add_argument("--no-adapt", action="store_true", help="frozen control: never change P")
    p.set_defaults(func=run)


def parse_reward(line: str):
    """``+`` -> 1.0, ``-`` -> -1.0, a number -> float, anything else -> None (a prompt)."""
    if line == "+":
        return 1.0
    if line == "-":
        return -1.0
    try:
        return float(line)
    except ValueError:
        return None


def run(args) -> int:
    model = PlasticTransformer.from_pretrained(args.model)
    if os.path.exists(args.session):
        session = Session.load(model, args.session, seed=args.seed)
        print(f"[loaded {args.session}: {session.episodes} episodes, baseline {session.baseline:.3f}]",
              file=sys.stderr)
    else:
        session = Session(model, adapt=not args.no_adapt, seed=args.seed)
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        r = parse_reward(line.strip())
        try:
            if r is not None:
                session.reward(r)
                print(f"[reward {r:g} committed: episode {session.episodes}, baseline {session.baseline:.3f}]",
                      file=sys.stderr)
            else:
                out = session.generate((line + "\n").encode("utf-8"), max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k)
                print(bytes(out).decode("utf-8", errors="replace"), flush=True)
        except ValueError as e:  # bad reward, no episode, bytes outside the vocabulary
            print(f"[error: {e}]", file=sys.stderr)
    session.save(args.session)
    print(f"[saved {args.session}: {session.episodes} episodes, {session.rewards} rewarded]", file=sys.stderr)
    return 0
