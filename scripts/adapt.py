"""``cl-arch adapt``: talk to a model whose fast memory learns from your rewards.

Reads lines from stdin. Every line is a prompt (its UTF-8 bytes as tokens, a number or ``+``
included) and gets a completion on stdout, except the commands, lines whose first character is ``/``:

    /reward R    commit the episode (everything since the last commit) with reward R, a finite number
    /reward +    the same with reward 1; ``/reward -``: reward -1
    /end         commit the episode with no reward (retention only)
    /help        list the commands
    //text       the prompt ``/text`` (a prompt that starts with ``/``)

A bad command (unknown, a NaN or infinite reward, nothing to reward) is reported on stderr as
``cl-arch adapt: error: line N: ...`` and the loop goes on; ``adapt`` then exits with status 2.
The session is saved atomically to ``--session`` after every commit and at the end of input
(loaded from there at start if it exists); the path is checked writable before anything runs.
An episode that was never committed is not saved.
"""
import math
import os
import sys

from .common import add_model_arg, check_writable_file, load_model

HELP = ("commands: /reward R (R a finite number; /reward + is 1, /reward - is -1), /end (commit with no "
        "reward), /help; //text sends the prompt /text; any other line is a prompt")


def add_parser(sub):
    p = sub.add_parser("adapt", help="interactive generation with reward-driven adaptation",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=_raw())
    add_model_arg(p)
    p.add_argument("--session", required=True, help="session state file (created if missing; its folder must exist)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the session's sampler")
    p.add_argument("--no-adapt", action="store_true", help="frozen control: never change P")
    p.set_defaults(func=run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def parse_command(line: str):
    """A line -> ``("prompt", text)``, ``("reward", r)``, ``("end", None)`` or ``("help", None)``.

    Raises ValueError for a line that starts with one ``/`` but is no command, or a reward that is
    not a finite number. Only ``/``-lines are commands, so ``1984`` or ``+`` are prompts.
    """
    if not line.startswith("/"):
        return "prompt", line
    if line.startswith("//"):
        return "prompt", line[1:]
    word, _, rest = line[1:].rstrip().partition(" ")
    rest = rest.strip()
    if word == "reward":
        if rest in ("+", "-"):
            return "reward", 1.0 if rest == "+" else -1.0
        try:
            r = float(rest)
        except ValueError:
            raise ValueError(f"/reward takes one number (or + or -), got {rest!r}") from None
        if not math.isfinite(r):
            raise ValueError(f"reward must be a finite number, got {rest}")
        return "reward", r
    if word in ("end", "help"):
        if rest:
            raise ValueError(f"/{word} takes no argument, got {rest!r}")
        return word, None
    raise ValueError(f"unknown command /{word} (/help lists them; //text sends /text as a prompt)")


def _lines(stream):
    """Lines of stdin as bytes (prompts are sent as their bytes; invalid UTF-8 is still a prompt)."""
    buf = getattr(stream, "buffer", None)
    for raw in (buf if buf is not None else stream):
        yield raw if isinstance(raw, bytes) else raw.encode("utf-8")


def run(args) -> int:
    from cl_arch import Session

    # Before the model loads and anything is generated: a save that can only fail at the end
    # would lose the whole conversation.
    check_writable_file("--session", args.session)
    model = load_model(args.model)
    if os.path.exists(args.session):
        # the file records adapt; --no-adapt (the frozen control) must win over it
        session = Session.load(model, args.session, seed=args.seed, adapt=False if args.no_adapt else None)
        print(f"[loaded {args.session}: {session.episodes} episodes, baseline {session.baseline:.3f}]",
              file=sys.stderr)
    else:
        session = Session(model, adapt=not args.no_adapt, seed=args.seed)
    refused = []
    for n, raw in enumerate(_lines(sys.stdin), 1):
        raw = raw.rstrip(b"\r\n")
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        try:
            kind, value = parse_command(text)
            if kind == "help":
                print(HELP, file=sys.stderr)
            elif kind == "reward":
                session.reward(value)
                session.save(args.session)  # after every commit: a crash later loses nothing committed
                print(f"[reward {value:g} committed: episode {session.episodes}, baseline {session.baseline:.3f}]",
                      file=sys.stderr)
            elif kind == "end":
                if not session.end_episode():
                    raise ValueError("/end: no episode to commit (nothing generated since the last commit)")
                session.save(args.session)
                print(f"[episode {session.episodes} committed without reward]", file=sys.stderr)
            else:
                prompt = raw[1:] if raw.startswith(b"//") else raw
                out = session.generate(prompt + b"\n", max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k)
                print(bytes(out).decode("utf-8", errors="replace"), flush=True)
        except ValueError as e:  # a bad command, no episode, bytes outside the vocabulary
            refused.append(n)
            print(f"cl-arch adapt: error: line {n}: {' '.join(str(e).split())}", file=sys.stderr)
    session.save(args.session)
    print(f"[saved {args.session}: {session.episodes} episodes, {session.rewards} rewarded]", file=sys.stderr)
    if refused:
        print(f"cl-arch adapt: error: {len(refused)} line(s) refused: {', '.join(map(str, refused))}",
              file=sys.stderr)
        return 2
    return 0
