"""Does a retrofitted fast memory learn? (issue 15) A tiny Llama, briefly pretrained on CPU, gets
fast memories beside two of its attentions; they are fine-tuned on text episodes; then:

1. **Text episodes, P carried vs P reset.** Validation blocks (stdlib files never trained on) are
   read as ``episodes`` consecutive episodes; ``carried`` commits each episode's trace into ``P``
   (the retention commit of training), ``reset`` starts every episode at ``P = 0``. Per block, the
   mean loss of the later episodes (2..E) reset minus carried, with a paired bootstrap interval
   over blocks (cl_arch/stats.py). Episode 1 is identical by construction and reported as a check.
2. **Sutton test through Session.** Per seed, a :class:`cl_arch.Session` on the retrofitted model
   plays the hidden-preference game (``train/tasks.py``) for ``game_episodes`` episodes, one
   sampled answer and one reward each (``Session(model, eta_s=0)``: reward-only commits); a second
   session plays another game (the yoked memory). ``R`` = expected reward over all cues of the
   first game with the first session's ``P`` (kept), no ``P`` (reset), the second's (yoked);
   ``cl_arch.stats.sutton_delta`` over seeds.

With ``--episodic`` the fine-tuned retrofit then gains an episodic memory after the final norm
(:func:`cl_arch.hf.add_episodic_memory`) whose four settings are learned on training-corpus spans
with everything else frozen (:func:`cl_arch.train.finetune_hf.train_episodic_hf`); figure 1 is
reported without it (same block memories), with it (all P carried) and with only its P carried,
and two more figures are measured:

3. **A second session over the same text.** Per validation block, a :class:`Session` reads the
   block as ``episodes`` episodes (memories' own commits); its bytes (``to_bytes``) start a second
   session that reads the same block again. Mean loss first - second, paired bootstrap over blocks.
4. The game again with ``Session(eta_s=0, eta_r=1)``: the episodic memory's own commit has
   ``eta_r = 0`` (and ``eta_s = 0`` is overridden), so in (2) it commits nothing; ``eta_r = 1``
   commits its episode change weighted by the advantage.

    OMP_NUM_THREADS=1 python benchmarks/retrofit_learning.py --pretrain-minutes 3 --finetune-minutes 3
    OMP_NUM_THREADS=1 python benchmarks/retrofit_learning.py --finetune-minutes 4 --episodic --finetuned runs/rf-l05

Prints a table and writes ``runs/retrofit_learning.json``. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from cl_arch import Session
from cl_arch.eval.sutton import sutton_scores
from cl_arch.hf import add_episodic_memory, load_retrofit, retrofit, save_retrofit
from cl_arch.stats import paired_bootstrap_ci, sutton_delta
from cl_arch.train.finetune_hf import (HFEpisodicConfig, HFFinetuneConfig, episode_losses, finetune_hf,
                                       token_blocks, train_episodic_hf)
from cl_arch.train.session_play import play_sessions
from cl_arch.train.tasks import PreferenceGame


def tiny_llama(d: int = 128, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                        bos_token_id=1, eos_token_id=None, pad_token_id=0))


def pretrain_base(path: str, minutes: float, seq_len: int = 256, batch: int = 16, lr: float = 3e-3, seed: int = 0):
    """A byte-level tiny Llama trained ``minutes`` on the stdlib (cached in ``path``)."""
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return AutoModelForCausalLM.from_pretrained(path), json.load(open(os.path.join(path, "pretrain.json")))
    model = tiny_llama(seed=seed)
    data = token_blocks("stdlib", lambda b: list(b), seq_len + 1, 4_000_000)["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0, step, deadline = time.perf_counter(), 0, time.perf_counter() + 60 * minutes
    model.train()
    while time.perf_counter() < deadline:
        frac = (time.perf_counter() - t0) / (deadline - t0)
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        x = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"pretrain step {step} loss {float(loss):.3f} bits/byte {float(loss) / math.log(2):.3f}", flush=True)
    info = {"steps": step, "seconds": time.perf_counter() - t0, "final_loss": float(loss)}
    model.eval().save_pretrained(path)
    json.dump(info, open(os.path.join(path, "pretrain.json"), "w"))
    return model, info


def carried_vs_reset(model, blocks: torch.Tensor, episodes: int, seed: int = 0, carry_layers=None):
    carried = episode_losses(model, blocks, episodes, carry=True, carry_layers=carry_layers).numpy()
    reset = episode_losses(model, blocks, episodes, carry=False).numpy()
    later_c, later_r = carried[:, 1:].mean(1), reset[:, 1:].mean(1)
    delta, ci = paired_bootstrap_ci(later_r, later_c, seed=seed)
    return {"blocks": int(blocks.shape[0]), "episodes": episodes,
            "loss_carried_per_episode": carried.mean(0).tolist(), "loss_reset_per_episode": reset.mean(0).tolist(),
            "first_episode_max_abs_diff": float(np.abs(carried[:, 0] - reset[:, 0]).max()),
            "later_reset_minus_carried_nats": delta, "ci95": list(ci),
            "later_reset_minus_carried_bits": delta / math.log(2)}


def second_session(model, blocks: torch.Tensor, episodes: int, seed: int = 0):
    """Per block ``[N, T + 1]``: a session reads it as ``episodes`` episodes; a second session,
    started from the first one's saved bytes, reads it again. Mean prequential loss (nats, first
    token of each episode excluded: it has no prediction) first - second, paired over blocks."""
    first, second = [], []
    for block in blocks:
        ids = block.tolist()
        bounds = [round(k * len(ids) / episodes) for k in range(episodes + 1)]
        s1 = Session(model, seed=seed, replay_size=0)
        nll1 = []
        for e in range(episodes):
            nll1.append(s1.observe(ids[bounds[e]:bounds[e + 1]]))
            s1.end_episode()
        s2 = Session.from_bytes(model, s1.to_bytes(), seed=seed)
        nll2 = []
        for e in range(episodes):
            nll2.append(s2.observe(ids[bounds[e]:bounds[e + 1]]))
            s2.end_episode()
        first.append(float(np.nanmean(torch.cat(nll1).numpy())))
        second.append(float(np.nanmean(torch.cat(nll2).numpy())))
    first, second = np.array(first), np.array(second)
    delta, ci = paired_bootstrap_ci(first, second, seed=seed)
    return {"blocks": int(blocks.shape[0]), "episodes": episodes, "loss_first_nats": float(first.mean()),
            "loss_second_nats": float(second.mean()), "first_minus_second_nats": delta, "ci95": list(ci),
            "first_minus_second_bits": delta / math.log(2)}


def play(session: Session, game: PreferenceGame, episodes: int, seed: int) -> float:
    """One session plays ``game`` for ``episodes`` episodes (answer ``t`` drawn with seed
    ``seed * 100_003 + t``); returns its mean reward."""
    cues = game.cue_sequence(episodes, seed=seed)
    R = play_sessions([session], [game], [cues], seeds=lambda i, t: seed * 100_003 + t)
    return float(R.double().mean())


def sutton_session(model, seeds: int, episodes: int, seed: int = 0, **rule):
    rule = {"eta_s": 0.0, **rule}
    kept, reset, yoked = [], [], []
    for i in range(seeds):
        gA, gB = PreferenceGame(8, 8, seed=seed + i), PreferenceGame(8, 8, seed=seed + 1000 + i)
        sA, sB = Session(model, seed=i, **rule), Session(model, seed=1000 + i, **rule)
        play(sA, gA, episodes, seed + 50 + i)
        play(sB, gB, episodes, seed + 5000 + i)
        k, r, y = sutton_scores(model, sA.P, sB.P, gA)
        kept.append(k)
        reset.append(r)
        yoked.append(y)
    st = sutton_delta(kept, reset, yoked, seed=seed)
    st.update(kept_mean=float(np.mean(kept)), reset_mean=float(np.mean(reset)), yoked_mean=float(np.mean(yoked)),
              chance=1 / 8, episodes=episodes)
    return st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-minutes", type=float, default=3.0)
    ap.add_argument("--finetune-minutes", type=float, default=3.0)
    ap.add_argument("--base-dir", default="runs/retrofit-llama-base")
    ap.add_argument("--out", default="runs/retrofit_learning.json")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--game-seeds", type=int, default=16)
    ap.add_argument("--game-episodes", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam", type=float, default=0.5, help="trace decay of the added memories")
    ap.add_argument("--eta-s", type=float, default=1.0, help="retention commit rate of the added memories")
    ap.add_argument("--finetuned", default=None,
                    help="folder of the fine-tuned retrofit: loaded if it holds one, else written after fine-tuning")
    ap.add_argument("--episodic", action="store_true", help="add an episodic memory after fine-tuning (see above)")
    ap.add_argument("--episodic-features", type=int, default=2048)
    ap.add_argument("--episodic-spans", type=int, default=32, help="training spans its settings are learned on")
    ap.add_argument("--episodic-span-len", type=int, default=2048)
    ap.add_argument("--episodic-steps", type=int, default=150)
    ap.add_argument("--skip-game", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    say = lambda s: print(s, flush=True)  # noqa: E731

    base, pre = pretrain_base(args.base_dir, args.pretrain_minutes, seed=args.seed)
    if args.finetuned and os.path.isfile(os.path.join(args.finetuned, "retrofit.json")):
        model = load_retrofit(args.finetuned, base)
        ft = json.load(open(os.path.join(args.finetuned, "finetune.json")))
        say(f"loaded the fine-tuned retrofit from {args.finetuned}")
    else:
        model = retrofit(base, layers=[1, 3], n_heads=4, head_k_dim=32, head_v_dim=32, eta_s=args.eta_s,
                         lam=args.lam)
        cfg = HFFinetuneConfig(hf_model=args.base_dir, seq_len=args.seq_len, episodes=args.episodes, batch_size=8,
                               lr=3e-3, max_steps=10 ** 6, max_minutes=args.finetune_minutes, seed=args.seed,
                               output_dir=None, log_every=50)
        ft = finetune_hf(cfg, model=model, log=say)
        ft = {k: ft[k] for k in ("steps", "seconds", "tokens_per_second", "val_loss_before", "val_loss_after")}
        if args.finetuned:
            save_retrofit(model, args.finetuned, base_name=args.base_dir)
            json.dump(ft, open(os.path.join(args.finetuned, "finetune.json"), "w"))
    val = token_blocks("stdlib", lambda b: list(b), args.seq_len + 1, 4_000_000)["val"][:args.eval_blocks]
    report = {"pretrain": pre, "finetune": ft, "argv": sys.argv[1:]}
    if args.episodic:
        report["text_episodes_without_episodic"] = carried_vs_reset(model, val, args.episodes, args.seed)
        say(f"without the episodic memory: reset - carried "
            f"{report['text_episodes_without_episodic']['later_reset_minus_carried_bits']:+.4f} bits/byte")
        model = add_episodic_memory(model, heads=1, features=args.episodic_features)
        train = token_blocks("stdlib", lambda b: list(b), args.episodic_span_len + 1, 4_000_000)["train"]
        rows = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.episodic_spans]
        report["episodic_training"] = train_episodic_hf(
            model, train[rows], HFEpisodicConfig(steps=args.episodic_steps, seed=args.seed), log=say)
    text = carried_vs_reset(model, val, args.episodes, args.seed)
    report["text_episodes"] = text
    if args.episodic:
        n = len(model.fast_layers())
        report["text_episodes_episodic_P_only"] = carried_vs_reset(model, val, args.episodes, args.seed,
                                                                   carry_layers=[n - 1])
        report["second_session"] = second_session(model, val, args.episodes, args.seed)
    if not args.skip_game:
        report["sutton_session"] = sutton_session(model, args.game_seeds, args.game_episodes, args.seed)
        if args.episodic:
            report["sutton_session_eta_r1"] = sutton_session(model, args.game_seeds, args.game_episodes, args.seed,
                                                             eta_r=1.0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nbase: {pre['steps']} pretraining steps ({pre['seconds']:.0f} s); fine-tune: {ft['steps']} steps "
          f"({ft['seconds']:.0f} s), val loss {ft['val_loss_before']:.4f} -> {ft['val_loss_after']:.4f} nats")
    if args.episodic:
        ep = report["episodic_training"]
        print(f"episodic memory: learned {ep['learned']} on {ep['spans'][0]} training spans in {ep['seconds']:.0f} s "
              f"(gain {ep['final_gain_last10']:+.4f} bits/byte within spans)")
    print(f"{'figure':52s} {'value':>10s}  95% interval")
    bits = 1 / math.log(2)
    rows = [("later episodes, reset - carried (bits/byte)", "text_episodes"),
            ("  the same without the episodic memory", "text_episodes_without_episodic"),
            ("  the same, only the episodic memory's P carried", "text_episodes_episodic_P_only")]
    for label, key in rows:
        if key in report:
            t = report[key]
            print(f"{label:52s} {t['later_reset_minus_carried_bits']:+10.4f}  [{t['ci95'][0] * bits:+.4f}, "
                  f"{t['ci95'][1] * bits:+.4f}]  ({t['blocks']} blocks)")
    print(f"{'episode 1, max |carried - reset| (nats)':52s} {text['first_episode_max_abs_diff']:10.2e}")
    if "second_session" in report:
        t = report["second_session"]
        print(f"{'second session - first, first - second (bits/byte)':52s} {t['first_minus_second_bits']:+10.4f}  "
              f"[{t['ci95'][0] * bits:+.4f}, {t['ci95'][1] * bits:+.4f}]  ({t['blocks']} blocks)")
    for label, key in (("Sutton delta, preference game (Session eta_s 0)", "sutton_session"),
                       ("Sutton delta, Session eta_s 0, eta_r 1", "sutton_session_eta_r1")):
        if key not in report:
            continue
        game = report[key]
        print(f"{label:52s} {game['sutton_delta']:+10.4f}  "
              f"[{game['sutton_ci'][0]:+.4f}, {game['sutton_ci'][1]:+.4f}]  ({game['n']} seeds)")
        print(f"{'  kept - yoked':52s} {game['yoked_delta']:+10.4f}  [{game['yoked_ci'][0]:+.4f}, {game['yoked_ci'][1]:+.4f}]")
        print(f"{'  R kept / reset / yoked (chance 0.125)':52s} {game['kept_mean']:.4f} / {game['reset_mean']:.4f} / "
              f"{game['yoked_mean']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
