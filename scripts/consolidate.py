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

import torch

from .common import (add_in_place_arg, add_model_arg, check_input_files, check_writable_folder, load_model, model_dir,
                     positive_int, refuse_duplicates, refuse_overwrite)


def add_parser(sub):
    p = sub.add_parser("consolidate", help="fold, merge or distill saved sessions into a model (or undo)")
    add_model_arg(p, "model directory (save_pretrained)")
    p.add_argument("--sessions", nargs="+", help="saved session files (Session.save); one file at most once")
    p.add_argument("--method", choices=["fold", "merge", "distill"], default="fold")
    p.add_argument("--out", required=True, help="output directory: model, report.json, report.undo.safetensors "
                   "(and sessions/, see --budget); refused if it is the --model folder or an output file in it "
                   "is an input, unless --in-place")
    p.add_argument("--undo", metavar="REPORT", help="restore the model a report left behind instead")
    add_in_place_arg(p)
    g = p.add_argument_group("merge")
    g.add_argument("--merge-method", choices=["mean", "ties", "regmean"], default="mean")
    g.add_argument("--weights", default=None, help="'count', 'reward' or comma-separated numbers (default equal)")
    g.add_argument("--density", type=float, default=0.5, help="TIES: fraction of entries kept per session")
    g.add_argument("--scale", type=float, default=1.0, help="multiplies the merged task vector")
    g = p.add_argument_group("distill")
    g.add_argument("--replay", help="token data file (default: the session's replay buffer)")
    g.add_argument("--anchor", help="token data file: .safetensors/.pt with input_ids (+ loss_mask), or any "
                                    "other file read as bytes (default for byte models: the training corpus, the "
                                    "stdlib's training split without its held-out evaluation packages)")
    g.add_argument("--anchor-seqs", type=positive_int, default=64, help="windows cut from a byte anchor")
    g.add_argument("--seq-len", type=positive_int, default=128, help="window length for a byte anchor")
    g.add_argument("--budget", type=float, default=None,
                   help="max forgetting on the anchor, bits/token (distill; fold: folds the largest fraction of P "
                        "within it and saves the rest of each session under OUT/sessions/, at its path relative "
                        "to the sessions' common folder: alice/s.safetensors and bob/s.safetensors go to "
                        "OUT/sessions/alice/s.safetensors and OUT/sessions/bob/s.safetensors)")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--rank", type=int, default=None, help="train rank-r deltas instead of full weights")
    g.add_argument("--anchor-weight", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def load_tokens(path, vocab_size, n_seqs=64, seq_len=128, seed=0):
    """Token data from a file: safetensors/pt (``input_ids [N, T]``, optional ``loss_mask``) or raw bytes."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            d = load_file(path)
        except SafetensorError as e:  # not a ValueError: would reach the user as a traceback
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
    elif path.endswith((".pt", ".pth")):
        import pickle

        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"{path}: not a tensor file torch.load(weights_only=True) reads ({e})") from e
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


def default_anchor_files():
    """The training side of the stdlib corpus the shipped model learned from: never a held-out
    evaluation package (an anchor there would train distill on what the benchmarks report) and
    never a validation file (the drift the reports measure)."""
    from cl_arch.train.data import split_files, stdlib_files

    return split_files(stdlib_files("train"))[0]


def default_anchor(model, args):
    from cl_arch.train.data import read_bytes

    if model.config.vocab_size < 256:  # before reading 2 MB
        raise ValueError(f"the default anchor is bytes and needs a byte-level model (vocab >= 256), this one has "
                         f"{model.config.vocab_size}: give --anchor")
    data = read_bytes(default_anchor_files(), max_bytes=2_000_000)
    return windows(data, model.config.vocab_size, args.anchor_seqs, args.seq_len, args.seed)


def kept_session_paths(out, sessions):
    """Where the unfolded rest of each session goes: ``OUT/sessions/`` + its path relative to the
    sessions' common folder, so two files with one base name (alice/s, bob/s) stay two files."""
    paths = [os.path.abspath(p) for p in sessions]
    root = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath([os.path.dirname(p) for p in paths])
    return [os.path.join(out, "sessions", os.path.relpath(p, root)) for p in paths]


def check_paths(args):
    """Refuse, before anything is read or written, duplicate sessions and any output that is an input."""
    from cl_arch.consolidate.report import undo_path_for

    check_input_files([("--sessions", p) for p in args.sessions or []] +
                      [("--undo", args.undo), ("--anchor", args.anchor), ("--replay", args.replay)])
    if args.sessions:
        refuse_duplicates("--sessions", args.sessions)
    inputs = [("--model", model_dir(args.model))]
    inputs += [("--sessions", p) for p in args.sessions or []]
    inputs += [(flag, p) for flag, p in (("--undo", args.undo), ("--anchor", args.anchor), ("--replay", args.replay))]
    if args.undo:
        inputs.append(("--undo", undo_path_for(args.undo)))
    written = ("config.json", "model.safetensors") + (() if args.undo else ("report.json", "report.undo.safetensors"))
    outputs = [("--out", args.out)] + [(f"--out ({name})", os.path.join(args.out, name)) for name in written]
    if args.sessions and not args.undo:
        outputs += [("--out (kept session)", p) for p in kept_session_paths(args.out, args.sessions)]
    refuse_overwrite(outputs, inputs, args.in_place)
    check_writable_folder("--out", args.out)


def run(args):
    from cl_arch.consolidate import distill, fold, merge, undo, write_report
    from cl_arch.session import Session

    if not args.sessions and not args.undo:
        raise ValueError("--sessions is required (or --undo REPORT)")
    if args.method == "distill" and args.sessions and len(args.sessions) != 1:
        raise ValueError("distill takes one session; fold or merge several first")
    check_paths(args)
    model = load_model(args.model)
    report_path = os.path.join(args.out, "report.json")
    if args.undo:
        info = undo(model, args.undo)
        os.makedirs(args.out, exist_ok=True)
        model.save_pretrained(args.out)
        print(f"restored {len(info['params_restored'])} tensors; model fingerprint {info['fingerprint']} -> {args.out}")
        return 0
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
        V = model.config.vocab_size
        replay = load_tokens(args.replay, V, args.anchor_seqs, args.seq_len, args.seed) if args.replay else None
        anchor = (load_tokens(args.anchor, V, args.anchor_seqs, args.seq_len, args.seed) if args.anchor
                  else default_anchor(model, args))
        report = distill(model, sessions[0], replay=replay, anchor=anchor, budget=args.budget,
                         steps=args.steps, lr=args.lr, rank=args.rank, anchor_weight=args.anchor_weight,
                         seed=args.seed, progress=True)
    for i, p in enumerate(args.sessions):
        if "sessions" in report and i < len(report["sessions"]):
            report["sessions"][i]["name"] = p
    report["sessions_files"] = list(args.sessions)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    if args.method == "fold" and report.get("fold_fraction", 1.0) < 1.0:
        # The part of each P the budget kept out of W0 is still the user's: saved against the new weights.
        report["sessions_kept"] = []
        for p, s, path in zip(args.sessions, sessions, kept_session_paths(args.out, args.sessions)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s.save(path)
            report["sessions_kept"].append(path)
            print(f"session {p}: unfolded rest -> {path}")
    write_report(report, report_path)
    summary = {k: report.get(k) for k in ("method", "fingerprint_before", "fingerprint_after", "rolled_back",
                                          "gain_retained", "forgetting_bits", "forgetting_bits_full", "fold_fraction",
                                          "min_gain_retained", "max_rounding")
               if report.get(k) is not None}
    print(json.dumps(summary, indent=2))
    print(f"model -> {args.out}; report -> {report_path}")
    return 0
