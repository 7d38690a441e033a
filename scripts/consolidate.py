"""``cl-arch consolidate``: compile saved sessions' fast weights into a model, or undo that.

    cl-arch consolidate --model DIR --sessions A.safetensors [B ...] --method fold|merge|distill --out DIR
    cl-arch consolidate --model DIR --undo REPORT.json --out DIR

Writes to ``--out``: the new model (``save_pretrained``), ``report.json`` and
``report.undo.safetensors`` (the weights it replaced and the sessions' P). The session files are
left as they are: they still hold the P that is now part of the model, and they are tied to the
old fingerprint, so they no longer load into the new model (by design: their P would count twice).
"""
import json
import os
import sys

import torch


def add_parser(sub):
    p = sub.add_parser("consolidate", help="fold, merge or distill saved sessions into a model (or undo)")
    p.add_argument("--model", required=True, help="model directory (save_pretrained)")
    p.add_argument("--sessions", nargs="+", help="saved session files (Session.save)")
    p.add_argument("--method", choices=["fold", "merge", "distill"], default="fold")
    p.add_argument("--out", required=True, help="output directory: model, report.json, report.undo.safetensors")
    p.add_argument("--undo", metavar="REPORT", help="restore the model a report left behind instead")
    g = p.add_argument_group("merge")
    g.add_argument("--merge-method", choices=["mean", "ties", "regmean"], default="mean")
    g.add_argument("--weights", default=None, help="'count', 'reward' or comma-separated numbers (default equal)")
    g.add_argument("--density", type=float, default=0.5, help="TIES: fraction of entries kept per session")
    g.add_argument("--scale", type=float, default=1.0, help="multiplies the merged task vector")
    g = p.add_argument_group("distill")
    g.add_argument("--replay", help="token data file (default: the session's replay buffer)")
    g.add_argument("--anchor", help="token data file: .safetensors/.pt with input_ids (+ loss_mask), or any "
                                    "other file read as bytes (default: held-out stdlib source for byte models)")
    g.add_argument("--anchor-seqs", type=int, default=64, help="windows cut from a byte anchor")
    g.add_argument("--seq-len", type=int, default=128, help="window length for a byte anchor")
    g.add_argument("--budget", type=float, default=None,
                   help="max forgetting on the anchor, bits/token (distill; fold: folds the largest fraction of P "
                        "within it and saves the rest of each session under OUT/sessions/)")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--rank", type=int, default=None, help="train rank-r deltas instead of full weights")
    g.add_argument("--anchor-weight", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def load_tokens(path, vocab_size, n_seqs=64, seq_len=128, seed=0):
    """Token data from a file: safetensors/pt (``input_ids [N, T]``, optional ``loss_mask``) or raw bytes."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        d = load_file(path)
    elif path.endswith((".pt", ".pth")):
        d = torch.load(path, map_location="cpu", weights_only=True)
    else:
        with open(path, "rb") as f:
            return windows(f.read(), vocab_size, n_seqs, seq_len, seed)
    if isinstance(d, torch.Tensor):
        return d
    if not isinstance(d, dict) or "input_ids" not in d:
        raise ValueError(f"{path}: expected a tensor or a dict with 'input_ids' (and optionally 'loss_mask')")
    return {"input_ids": d["input_ids"], "loss_mask": d.get("loss_mask")}


def windows(data: bytes, vocab_size, n_seqs, seq_len, seed):
    if vocab_size < 256:
        raise ValueError(f"a byte anchor needs a byte-level model (vocab >= 256), this one has {vocab_size}")
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    if t.numel() < seq_len + 1:
        raise ValueError(f"anchor data has {t.numel()} bytes, fewer than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, t.numel() - seq_len, (n_seqs,), generator=g)
    return torch.stack([t[s:s + seq_len] for s in starts.tolist()])


def default_anchor(model, args):
    from cl_arch.train.data import read_bytes, stdlib_files

    data = read_bytes(stdlib_files("held_out"), max_bytes=2_000_000)
    return windows(data, model.config.vocab_size, args.anchor_seqs, args.seq_len, args.seed)


def run(args):
    from cl_arch import PlasticTransformer
    from cl_arch.consolidate import distill, fold, merge, undo, write_report
    from cl_arch.session import Session

    model = PlasticTransformer.from_pretrained(args.model)
    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, "report.json")
    if args.undo:
        info = undo(model, args.undo)
        model.save_pretrained(args.out)
        print(f"restored {len(info['params_restored'])} tensors; model fingerprint {info['fingerprint']} -> {args.out}")
        return 0
    if not args.sessions:
        print("error: --sessions is required (or --undo REPORT)", file=sys.stderr)
        return 2
    try:
        # Load every session before changing anything: a wrong fingerprint or a NaN refuses all.
        sessions = [Session.load(model, p) for p in args.sessions]
        if args.method == "fold":
            anchor = None
            if args.budget is not None:
                anchor = (load_tokens(args.anchor, model.config.vocab_size, args.anchor_seqs, args.seq_len, args.seed)
                          if args.anchor else default_anchor(model, args))
            report = fold(model, sessions, anchor=anchor, budget=args.budget)
        elif args.method == "merge":
            weights = args.weights
            if weights not in (None, "count", "reward"):
                weights = [float(w) for w in weights.split(",")]
            report = merge(model, sessions, weights=weights, method=args.merge_method,
                           density=args.density, scale=args.scale)
        else:
            if len(sessions) != 1:
                print("error: distill takes one session; fold or merge several first", file=sys.stderr)
                return 2
            V = model.config.vocab_size
            replay = load_tokens(args.replay, V, args.anchor_seqs, args.seq_len, args.seed) if args.replay else None
            anchor = (load_tokens(args.anchor, V, args.anchor_seqs, args.seq_len, args.seed) if args.anchor
                      else default_anchor(model, args))
            report = distill(model, sessions[0], replay=replay, anchor=anchor, budget=args.budget,
                             steps=args.steps, lr=args.lr, rank=args.rank, anchor_weight=args.anchor_weight,
                             seed=args.seed, progress=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, p in enumerate(args.sessions):
        if "sessions" in report and i < len(report["sessions"]):
            report["sessions"][i]["name"] = p
    report["sessions_files"] = list(args.sessions)
    model.save_pretrained(args.out)
    if args.method == "fold" and report.get("fold_fraction", 1.0) < 1.0:
        # The part of each P the budget kept out of W0 is still the user's: saved against the new weights.
        kept_dir = os.path.join(args.out, "sessions")
        os.makedirs(kept_dir, exist_ok=True)
        report["sessions_kept"] = []
        for p, s in zip(args.sessions, sessions):
            path = os.path.join(kept_dir, os.path.basename(p))
            s.save(path)
            report["sessions_kept"].append(path)
    write_report(report, report_path)
    summary = {k: report.get(k) for k in ("method", "fingerprint_before", "fingerprint_after", "rolled_back",
                                          "gain_retained", "forgetting_bits", "forgetting_bits_full", "fold_fraction",
                                          "min_gain_retained", "max_rounding")
               if report.get(k) is not None}
    print(json.dumps(summary, indent=2))
    print(f"model -> {args.out}; report -> {report_path}")
    return 0
