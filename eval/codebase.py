"""``codebase``: does reading an unseen source tree make the model better at it?

A byte-level model pretrained on the standard library minus its held-out parts reads an unseen
tree file after file. Every byte is scored *before* anything learns from it (prequential
bits/byte). Files are cut into episodes of at most ``episode_bytes`` (at line ends); within an
episode every method has the same in-context memory (fast weights ``S`` and attention caches);
methods differ only in what survives an episode boundary:

=================  ==========================================================================
``static``         no fast-memory writes at all (the weights alone: no learning at inference)
``frozen``         nothing: every episode starts from the pretrained model
``adapt``          the episode's eligibility trace is committed into the persistent fast
                   weight ``P`` (retention only, ``r = None``, rate ``eta_s``); P persists
``adapt+reward``   as ``adapt`` plus the reward-modulated term, reward = the episode's mean
                   tab-completion acceptance (:mod:`cl_arch.eval.tabcomplete`)
``no_persist``     fast weights without persistence: ``S`` itself carries over, no ``P``
``dynamic_eval``   Krause-style online gradient steps on all weights after each chunk
=================  ==========================================================================

The first four run as rows of one batch (:class:`~cl_arch.eval.baselines.EpisodeLearner`), so
the comparison is exactly paired. Reported: gain over frozen at 1k/10k/100k bytes (local window,
:func:`~cl_arch.eval.metrics.gain_curve`), AULC of the relative gain, compute per token (measured
seconds and estimated FLOPs) and the drift of held-out stdlib bits/byte after the stream.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.state import ModelState
from cl_arch.train.data import (bytes_to_tensor, random_windows, read_bytes, resolve_sources, split_files,
                                stdlib_dir, stdlib_files)

from . import metrics as M
from .baselines import DynamicEval, EpisodeLearner, RowPolicy
from .report import curve, format_table, write_report

POINTS = (1_000, 10_000, 100_000)
NEWLINE = 10


# ---------------------------------------------------------------------------- the model
def demo_config() -> PlasticConfig:
    """The small default model: 4 layers (fast, attn, fast, attn), d=128, attention window 64, and
    a readout memory of 2 heads (``configs/default_model.yaml``'s model section).

    The short window bounds the cost of long streams and leaves what lies further back to the
    fast layers and the readout memory.
    """
    return PlasticConfig(d_model=128, n_layers=4, n_heads=4, head_k_dim=32, head_v_dim=32, attn_window=64,
                         chunk_size=64, mlp_ratio=3.0, lam=0.5, eta_s=0.0, eta_r=1.0, commit_clip=10.0,
                         readout_heads=2, readout_values="onehot")


DEMO_PRETRAIN_SECONDS = 150.0
def default_model(log=print) -> PlasticTransformer:
    """The model shipped in ``cl_arch/assets/default_model`` (see ``configs/default_model.yaml``).

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    import json

    import cl_arch

    folder = os.path.join(os.path.dirname(os.path.abspath(cl_arch.__file__)), "assets", "default_model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no shipped default model in {folder}")
    info_path = os.path.join(folder, "pretrain.json")
    extra = ""
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        extra = f" ({info['steps']} steps, validation {info['final_val_bpb']:.3f} bits/byte)"
    log(f"loading the shipped default model from {folder}{extra}")
    return PlasticTransformer.from_pretrained(folder).eval()


def demo_pretrain_overrides(seconds: float = DEMO_PRETRAIN_SECONDS, seed: int = 0,
                            config: Optional[PlasticConfig] = None) -> List[Tuple[List[str], Any]]:
    """Settings of :func:`cl_arch.train.pretrain.pretrain` for the default model (over its defaults).

    ``cl-arch pretrain``'s defaults (stdlib minus :data:`~cl_arch.train.data.HELD_OUT_STDLIB`,
    AdamW 3e-3 with warmup and cosine) with :func:`demo_config` as the model, 1 KB sequences in
    batches of 8 (16x the attention window, as the shipped model) and a wall-clock budget of
    ``seconds`` as the stop (the cosine follows the clock, so the learning rate has decayed when
    the time is up, however fast the machine is).
    """
    model = (config or demo_config()).to_dict()
    seq = 1024 if config is None else 256
    return [(["model"], model), (["data", "seq_len"], seq), (["train", "batch_size"], 16 * 256 // seq),
            (["train", "max_minutes"], seconds / 60.0), (["train", "max_steps"], 5000),
            (["train", "eval_every"], 0), (["train", "val_blocks"], 32), (["train", "log_with"], "none"),
            (["train", "seed"], seed), (["train", "save_every"], 0), (["train", "keep_checkpoints"], 1)]


def default_cache_dir(seconds: float = DEMO_PRETRAIN_SECONDS, seed: int = 0,
                      config: Optional[PlasticConfig] = None) -> str:
    """``$CL_ARCH_CACHE`` or ``~/.cache/cl_arch`` + ``/demo-<hash>``: one folder per pretraining
    recipe (settings, library version, Python version whose stdlib is the corpus)."""
    import hashlib
    import json
    import sys

    import cl_arch

    key = json.dumps({"overrides": demo_pretrain_overrides(seconds, seed, config), "version": cl_arch.__version__,
                      "python": list(sys.version_info[:2])}, sort_keys=True, default=str)
    root = os.environ.get("CL_ARCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cl_arch")
    return os.path.join(root, "demo-" + hashlib.sha1(key.encode()).hexdigest()[:10])


def stdlib_model(cache_dir: Optional[str] = None, seconds: Optional[float] = None, seed: int = 0,
                 config: Optional[PlasticConfig] = None, log=print, progress: bool = True) -> PlasticTransformer:
    """The shipped default model (:func:`default_model`) when called with no recipe (``seconds``,
    ``cache_dir`` and ``config`` all None, seed 0); otherwise load the recipe's model from
    ``cache_dir``, or pretrain it there first (``seconds`` None: 150).

    Pretraining is :func:`cl_arch.train.pretrain.pretrain` (accelerate) with
    :func:`demo_pretrain_overrides`: next-byte loss on the standard library's training split (the
    held-out packages are never read) for ``seconds`` of wall time. A time budget, not a step
    count, so the demo keeps to its few minutes on any machine; the cached checkpoint then fixes
    the result (its ``pretrain.json`` records steps and validation bits/byte).
    ``cache_dir=None``: :func:`default_cache_dir` (keyed by the recipe).
    """
    import json
    import shutil
    import tempfile

    if seconds is None and cache_dir is None and config is None and seed == 0:
        try:
            return default_model(log)
        except FileNotFoundError:
            pass
    seconds = DEMO_PRETRAIN_SECONDS if seconds is None else seconds
    cache_dir = cache_dir or default_cache_dir(seconds, seed, config)
    if os.path.isfile(os.path.join(cache_dir, "config.json")):
        info = {}
        if os.path.isfile(os.path.join(cache_dir, "pretrain.json")):
            with open(os.path.join(cache_dir, "pretrain.json")) as f:
                info = json.load(f)
        extra = f" ({info['steps']} steps, validation {info['final_val_bpb']:.3f} bits/byte)" if info else ""
        log(f"loading the pretrained model from {cache_dir}{extra}")
        return PlasticTransformer.from_pretrained(cache_dir).eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only
    from cl_arch.train.config import PretrainRunConfig, load_config
    from cl_arch.train.pretrain import pretrain

    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".pretrain-", dir=parent)
    try:
        cfg = load_config(PretrainRunConfig, None, demo_pretrain_overrides(seconds, seed, config) +
                          [(["train", "output_dir"], work), (["train", "progress"], progress)])
        log(f"pretraining the default model for {seconds:.0f}s (cl_arch.train.pretrain) on the standard library "
            f"minus its held-out packages; cached in {cache_dir}")
        res = pretrain(cfg)
        final = os.path.join(work, "final")
        with open(os.path.join(final, "pretrain.json"), "w") as f:
            json.dump({k: res[k] for k in ("steps", "final_val_bpb", "seconds", "tokens", "tokens_per_s", "stopped")},
                      f, indent=1)
        if os.path.isdir(cache_dir):  # a stale or partial folder without a model
            shutil.rmtree(cache_dir)
        os.replace(final, cache_dir)  # atomic: a crash never leaves a half-written cache
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PlasticTransformer.from_pretrained(cache_dir).eval()


def without_readout(model: PlasticTransformer) -> PlasticTransformer:
    """A copy of ``model`` with its readout memory removed: the network and its in-block fast
    layers alone (the same weights), to tell the readout memory's share of a gain from theirs."""
    if model.readout is None:
        return model
    cfg = PlasticConfig.from_dict({**model.config.to_dict(), "readout_heads": 0})
    m = PlasticTransformer(cfg).to(next(model.parameters()).dtype)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("readout.")}
    m.load_state_dict(sd)
    return m.eval()


# ---------------------------------------------------------------------------- the stream
def held_out_package(name: str) -> str:
    """Folder (or file) of a held-out stdlib package, e.g. ``"json"`` -> ``.../lib/python3.x/json``."""
    root = stdlib_dir()
    for cand in (os.path.join(root, name), os.path.join(root, name + ".py")):
        if os.path.exists(cand):
            return cand
    raise ValueError(f"no stdlib package {name!r} under {root}")


def segment_stream(files: Sequence[str], max_bytes: Optional[int], episode_bytes: int) -> List[Tuple[bytes, int]]:
    """Cut files into episodes of at most ``episode_bytes``, at line ends where possible.

    Returns ``[(segment, prev_byte)]``: ``prev_byte`` is the input that predicts the segment's
    first byte (a newline at the start of a file, else the byte before), so every byte is scored.
    The stream stops after ``max_bytes`` bytes.
    """
    if episode_bytes < 2:
        raise ValueError(f"episode_bytes must be >= 2, got {episode_bytes}")
    out: List[Tuple[bytes, int]] = []
    total = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            end = min(pos + episode_bytes, len(data))
            if end < len(data):
                cut = data.rfind(b"\n", pos, end)
                end = cut + 1 if cut > pos else end
            if max_bytes is not None:
                end = min(end, pos + (max_bytes - total))
            out.append((data[pos:end], NEWLINE if pos == 0 else data[pos - 1]))
            total += end - pos
            pos = end
            if max_bytes is not None and total >= max_bytes:
                return out
    return out


def line_acceptance(correct: np.ndarray, seg: bytes) -> List[Tuple[np.ndarray, int]]:
    """Tab-completion outcome of every non-blank line of ``seg``.

    ``correct [B, n]``: whether the greedy (argmax) prediction of each byte was right under
    teacher forcing. A greedy proposal of the line, generated from the lines before, agrees with
    the real line exactly up to the first wrong byte, so the longest accepted prefix is the run of
    leading ``True`` (the line's newline included: accepting it accepts the whole line).

    Returns ``[(accepted [B] int, line_length)]`` per non-blank line.
    """
    out = []
    start, n = 0, len(seg)
    while start < n:
        nl = seg.find(b"\n", start)
        end = n if nl < 0 else nl + 1
        if seg[start:end].strip():
            c = correct[:, start:end]
            acc = np.where(c.all(axis=1), end - start, np.argmin(c, axis=1))
            out.append((acc, end - start))
        start = end
    return out


def base_windows(n: int = 8, length: int = 512, seed: int = 0) -> torch.Tensor:
    """``[n, length + 1]`` byte windows of the stdlib validation files (never trained on)."""
    _, val_files = split_files(stdlib_files("train"))
    data = bytes_to_tensor(read_bytes(val_files, 2_000_000))
    x, y = random_windows(data, n, length, torch.Generator().manual_seed(seed))
    return torch.cat([x, y[:, -1:]], dim=1)


@torch.no_grad()
def window_bpb(model: PlasticTransformer, windows: torch.Tensor, state: Optional[ModelState] = None) -> List[float]:
    """Bits/byte of each window ``[W, L+1]``, starting from ``state`` (batch 1, broadcast) or fresh."""
    W = windows.shape[0]
    st = None if state is None else ModelState.stack([state] * W)
    logits, _ = model(windows[:, :-1], state=st)
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    return (nll / math.log(2)).tolist()


def default_policies(eta_s: Optional[float] = None, eta_r: Optional[float] = None, gamma: Optional[float] = None,
                     methods: Sequence[str] = ("frozen", "adapt", "adapt+reward", "no_persist")) -> List[RowPolicy]:
    """The batched methods of this benchmark (dynamic evaluation runs separately)."""
    table = {
        "frozen": RowPolicy("frozen"),
        "static": RowPolicy("static", writes=False),
        "adapt": RowPolicy("adapt", persist=True, eta_s=eta_s, eta_r=0.0, gamma=gamma),
        "adapt+reward": RowPolicy("adapt+reward", persist=True, use_reward=True, eta_s=eta_s, eta_r=eta_r,
                                  gamma=gamma),
        "no_persist": RowPolicy("no_persist", carry_context=True),
    }
    unknown = [m for m in methods if m not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(table)} (+ dynamic_eval)")
    if "frozen" not in methods:
        raise ValueError("methods must include 'frozen': every gain is measured against it")
    return [table[m] for m in methods]


def run_stream(model: PlasticTransformer, segments: Sequence[Tuple[bytes, int]], policies: Sequence[RowPolicy],
               dyn: Optional[DynamicEval] = None, chunk: int = 256, desc: str = "stream",
               lam: Optional[float] = None, learner: Optional[EpisodeLearner] = None) -> Dict[str, Any]:
    """Read ``segments`` prequentially with every row of ``policies`` (and ``dyn``, if given).

    Returns per method: ``bits [N]`` (loss of every byte in bits), ``lines`` (list of
    ``(accepted, length)`` per non-blank line), ``seconds`` (wall time of that method's passes),
    ``rewards`` (per episode, the reward each batched row was given: its mean line acceptance);
    plus the :class:`EpisodeLearner` (its ``P``) and the DynamicEval object. ``learner``: go on
    with this one (e.g. a second session over the same stream) instead of a fresh one.
    """
    learner = learner if learner is not None else EpisodeLearner(model, policies, lam=lam)
    names = [p.name for p in policies] + (["dynamic_eval"] if dyn is not None else [])
    bits: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    lines: Dict[str, List[Tuple[int, int]]] = {n: [] for n in names}
    secs = {"batched": 0.0, "dynamic_eval": 0.0}
    ep_rewards: List[List[Optional[float]]] = []
    B = learner.B
    for seg, prev in tqdm(segments, desc=desc, unit="ep", mininterval=2.0):
        x = torch.tensor([prev] + list(seg[:-1]), dtype=torch.long)
        y = torch.tensor(list(seg), dtype=torch.long)
        ep_bits, ep_corr = [], []
        dyn_bits, dyn_corr = [], []
        for c0 in range(0, len(seg), chunk):
            xi, yi = x[c0:c0 + chunk], y[c0:c0 + chunk]
            t0 = time.perf_counter()
            logits = learner.step(xi.unsqueeze(0).expand(B, -1))
            lp = torch.log_softmax(logits.float(), -1)
            ep_bits.append((-lp.gather(-1, yi.expand(B, -1).unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
            ep_corr.append((logits.argmax(-1) == yi).numpy())
            secs["batched"] += time.perf_counter() - t0
            if dyn is not None:
                t0 = time.perf_counter()
                dl = dyn.step(xi.unsqueeze(0), yi.unsqueeze(0))
                lp = torch.log_softmax(dl.float(), -1)
                dyn_bits.append((-lp[0].gather(-1, yi.unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
                dyn_corr.append((dl[0].argmax(-1) == yi).numpy())
                secs["dynamic_eval"] += time.perf_counter() - t0
        # The episode's last byte was only a target so far; a user's session observes (writes) it
        # too before the episode closes, so the learner does the same (its logits score nothing).
        t0 = time.perf_counter()
        learner.step(y[-1:].unsqueeze(0).expand(B, -1))
        secs["batched"] += time.perf_counter() - t0
        corr = np.concatenate(ep_corr, axis=1)
        b = np.concatenate(ep_bits, axis=1)
        acc = line_acceptance(corr, seg)
        rewards = []
        for i, p in enumerate(policies):
            bits[p.name].append(b[i])
            lines[p.name].extend((int(a[i]), n) for a, n in acc)
            rewards.append(float(np.mean([a[i] / n for a, n in acc])) if acc else None)
        ep_rewards.append(rewards)
        t0 = time.perf_counter()
        learner.end_episode(rewards)
        secs["batched"] += time.perf_counter() - t0
        if dyn is not None:
            bits["dynamic_eval"].append(np.concatenate(dyn_bits))
            dacc = line_acceptance(np.concatenate(dyn_corr)[None], seg)
            lines["dynamic_eval"].extend((int(a[0]), n) for a, n in dacc)
            dyn.new_episode()
    return {"bits": {n: np.concatenate(v) for n, v in bits.items()}, "lines": lines, "seconds": secs,
            "learner": learner, "dyn": dyn, "names": names, "rewards": ep_rewards}


def log_points(n: int, lo: int = 100, per_decade: int = 4) -> List[int]:
    """Log-spaced interaction counts ``lo .. n`` (always ending at n)."""
    if n < lo:
        return [n]
    k = int(math.floor(math.log10(n / lo) * per_decade)) + 1
    pts = sorted({int(round(lo * 10 ** (i / per_decade))) for i in range(k)} | {n})
    return [p for p in pts if p <= n]


def gain_interval(frozen: np.ndarray, adapted: np.ndarray, n: int, block: int = 256,
                  seed: int = 0) -> Tuple[float, float]:
    """95% interval of ``gain_curve``'s figure at ``n``: a paired bootstrap over ``block``-byte
    blocks of the bytes ``(n - ceil(n/2), n]`` (the window the gain is read in). Whole blocks
    are resampled because neighbouring bytes' losses are correlated; single bytes would
    understate the spread."""
    w = int(math.ceil(n / 2))
    f, a = frozen[n - w:n], adapted[n - w:n]
    block = max(1, min(block, w // 8))  # at least 8 blocks, so short windows get an interval too
    nb = max(1, len(f) // block)
    cut = nb * block if len(f) >= block else len(f)
    fb = f[len(f) - cut:].reshape(nb, -1).mean(1)
    ab = a[len(a) - cut:].reshape(nb, -1).mean(1)
    _, (lo, hi) = M.paired_bootstrap_ci(fb, ab, seed=seed)
    return lo, hi


def _short(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def summarize(out: Dict[str, Any], model: PlasticTransformer, chunk: int, episode_bytes: int,
              base: Optional[torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    """Per-method curve and summary figures from :func:`run_stream`'s output."""
    from .cost import flops_per_token

    bits = out["bits"]
    N = len(bits["frozen"])
    pts = log_points(N)
    fl_fwd = flops_per_token(model, context=min(chunk, model.config.attn_window or chunk))
    n_tok = N
    methods: Dict[str, Dict[str, Any]] = {}
    base_before = window_bpb(model, base) if base is not None else None
    learner, dyn = out["learner"], out["dyn"]
    for i, name in enumerate(out["names"]):
        b = bits[name]
        ys = [M.window_mean(b, n) for n in pts]
        s: Dict[str, Any] = {"bpb": float(b.mean())}
        gains = M.gain_curve(bits["frozen"], b, POINTS)
        for n in POINTS:
            s[f"gain_bpb_{_short(n)}"] = gains.get(n)
            if n in gains:
                s[f"gain_ci_{_short(n)}"] = list(gain_interval(bits["frozen"], b, n))
        rel = [(M.window_mean(bits["frozen"], n) - y) / M.window_mean(bits["frozen"], n) for n, y in zip(pts, ys)]
        s["aulc"] = M.aulc(rel, lo=0.0, hi=1.0)  # mean fraction of the frozen loss removed
        ln = out["lines"][name]
        s["tab_acceptance"] = float(np.mean([a / n for a, n in ln])) if ln else None
        if name == "dynamic_eval":
            s["sec_per_token"] = out["seconds"]["dynamic_eval"] / n_tok
            # forward + backward (2x forward) + the update (~4 flops per weight per token-chunk)
            s["flops_per_token"] = 3 * fl_fwd + 4 * model.num_parameters() / chunk
            s["weight_drift_rel"] = dyn.drift_from_start()
        else:
            s["sec_per_token"] = out["seconds"]["batched"] / (n_tok * learner.B)  # rows share the batch
            commit = 0.0
            if learner.policies[i].persist:
                # commit: ~6 flops per P entry per episode, spread over the episode's bytes
                commit = 6 * sum(P[0].numel() for P in learner.P) / episode_bytes
            s["flops_per_token"] = fl_fwd + commit
            s["P_norm"] = learner.persistent_norm()[i]
        if base is not None:
            if name == "dynamic_eval":
                after = window_bpb(dyn.model, base)
            else:
                after = window_bpb(model, base, learner.row_state(i))
            s.update(M.base_drift(base_before, after))
        methods[name] = {"curve": curve(pts, ys), "summary": s}
    return methods


def run(source: Optional[str] = None, model: Optional[PlasticTransformer] = None, max_bytes: int = 100_000,
        episode_bytes: int = 2048, chunk: int = 256, eta_s: Optional[float] = None, eta_r: Optional[float] = None,
        gamma: Optional[float] = None, dyn_lr: float = 1e-4, dyn_rule: str = "rms", dyn_eps: float = 1e-3,
        dyn_decay: float = 0.0, calib_batches: int = 4, with_dynamic_eval: bool = True, drift_windows: int = 8,
        methods: Sequence[str] = ("frozen", "adapt", "adapt+reward", "no_persist"),
        out_dir: Optional[str] = "runs/eval", name: Optional[str] = None, cache_dir: Optional[str] = None,
        pretrain_seconds: Optional[float] = None, seed: int = 0, lam: Optional[float] = None,
        second_session: bool = False) -> Dict[str, Any]:
    """Run the codebase benchmark and (with ``out_dir``) write ``<name>.json`` and ``<name>.png``.

    Args:
        source: a folder of .py files, a file or a glob; default the held-out stdlib ``json``
            package. Any unseen tree works (an installed site-packages package, a project).
        model: a trained model; default :func:`stdlib_model` (the shipped model, or with
            ``cache_dir``/``pretrain_seconds`` one loaded from or trained into the cache).
        max_bytes: bytes of the stream to read (gains are reported at 1k/10k/100k when reached).
        episode_bytes: longest episode; each file is split at line ends into episodes this long.
        eta_s, eta_r, gamma: commit settings for the adapting rows (None: the model's own).
        lam: eligibility-trace decay override (None: the model's own, 0.5 by default). It decides
            how much of an episode a commit stores: ``E_T = sum_t lam^(T-t) D_t``.
        dyn_lr, dyn_rule, dyn_eps, dyn_decay: dynamic evaluation (:class:`DynamicEval`).
        calib_batches: pretraining-corpus batches (8 x 256 bytes) that estimate dynamic
            evaluation's mean squared gradients.
        drift_windows: stdlib validation windows (512 bytes) for the base-drift figure (0: skip).
        second_session: read the stream a second time as a new session of the same user
            (:meth:`EpisodeLearner.new_session`: ``S`` dropped, ``P`` kept); its rows are in
            ``report["second_session"]``: what ``P`` carries that ``S`` (``no_persist``) cannot.
    """
    torch.manual_seed(seed)
    src = source or held_out_package("json")
    files = resolve_sources(src)
    model = model if model is not None else stdlib_model(cache_dir, seconds=pretrain_seconds)
    model.eval()
    segments = segment_stream(files, max_bytes, episode_bytes)
    n_bytes = sum(len(s) for s, _ in segments)
    policies = default_policies(eta_s, eta_r, gamma, methods)
    dyn, calib = None, {}
    if with_dynamic_eval:
        dyn = DynamicEval(model, lr=dyn_lr, rule=dyn_rule, eps=dyn_eps, decay=dyn_decay)
        if dyn_rule == "rms":
            train_files, _ = split_files(stdlib_files("train"))
            data = bytes_to_tensor(read_bytes(train_files, 2_000_000))
            g = torch.Generator().manual_seed(seed + 7)

            def batches():
                for _ in range(calib_batches):
                    x, y = random_windows(data, 8, 256, g)
                    yield torch.cat([x, y[:, -1:]], dim=1)  # [8, 257]: inputs and the last target

            calib = dyn.calibrate(batches())
    base = base_windows(drift_windows, 512, seed) if drift_windows else None
    out = run_stream(model, segments, policies, dyn, chunk, desc=f"codebase {os.path.basename(src.rstrip('/'))}",
                     lam=lam)
    methods = summarize(out, model, chunk, episode_bytes, base)
    second = None
    if second_session:
        learner = out["learner"]
        learner.new_session()
        out2 = run_stream(model, segments, policies, None, chunk, desc="second session", lam=lam, learner=learner)
        second = summarize(out2, model, chunk, episode_bytes, None)
        # What P is worth: each row's second pass against its own first pass, which started
        # without P (a new session that adapts from scratch). Frozen and no_persist read the
        # second pass exactly like the first (nothing survives a session), so their figure is 0.
        for name in second:
            a, b = out["bits"][name], out2["bits"][name]
            gains = M.gain_curve(a, b, POINTS)
            s2 = second[name]["summary"]
            for n in POINTS:
                if n in gains:
                    s2[f"gain_over_first_session_{_short(n)}"] = gains[n]
                    s2[f"gain_over_first_session_ci_{_short(n)}"] = list(gain_interval(a, b, n))
    report = {
        "benchmark": "codebase",
        "config": {"source": os.path.abspath(src), "files": len(files), "bytes": n_bytes,
                   "episodes": len(segments), "episode_bytes": episode_bytes, "chunk": chunk, "eta_s": eta_s,
                   "eta_r": eta_r, "gamma": gamma, "lam": lam, "dyn_lr": dyn_lr, "dyn_rule": dyn_rule, "dyn_eps": dyn_eps,
                   "dyn_decay": dyn_decay, "calibration": calib, "drift_windows": drift_windows,
                   "model_fingerprint": model.fingerprint(), "model_parameters": model.num_parameters(),
                   "model_config": model.config.to_dict(), "seed": seed},
        "x_label": "bytes read", "y_label": "bits/byte (local mean)", "log_x": True,
        "methods": methods,
    }
    report["table"] = table(report)
    if second is not None:
        report["second_session"] = second
        report["second_session_table"] = table({"methods": second})
        report["second_session_vs_first_table"] = table_vs_first(second)
    if out_dir:
        write_report(report, out_dir, name or "codebase")
    return report


def table(report: Dict[str, Any]) -> str:
    """Markdown table of a codebase report: one row per method."""
    rows = []
    for name, m in report["methods"].items():
        s = m["summary"]
        g = [(s.get(f"gain_bpb_{_short(n)}"), s.get(f"gain_ci_{_short(n)}")) for n in POINTS]
        rows.append([name, f"{s['bpb']:.3f}"] +
                    ["-" if v is None else (f"{v:+.3f}" if ci is None or name == "frozen"
                                            else f"{v:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]") for v, ci in g] +
                    [f"{s['aulc']:+.4f}", "-" if s.get("tab_acceptance") is None else f"{s['tab_acceptance']:.3f}",
                     f"{s['sec_per_token'] * 1e3:.3f}", f"{s['flops_per_token'] / 1e6:.2f}",
                     "-" if "drift_bpb" not in s else f"{s['drift_bpb']:+.3f}"])
    return format_table(rows, ["method", "bits/byte", "gain@1k", "gain@10k", "gain@100k", "AULC",
                               "tab accept", "ms/token", "MFLOP/token", "stdlib drift"])


def table_vs_first(second: Dict[str, Any]) -> str:
    """Markdown table: each row's second session against its own first (what the saved P is worth)."""
    rows = []
    for name, m in second.items():
        s = m["summary"]
        cells = []
        for n in POINTS:
            v, ci = s.get(f"gain_over_first_session_{_short(n)}"), s.get(f"gain_over_first_session_ci_{_short(n)}")
            cells.append("-" if v is None else f"{v:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
        rows.append([name] + cells)
    return format_table(rows, ["method", "2nd vs 1st session @1k", "@10k", "@100k"])


__all__ = ["table_vs_first", "demo_config", "default_model", "without_readout", "demo_pretrain_overrides", "default_cache_dir", "stdlib_model", "held_out_package", "segment_stream", "line_acceptance",
           "base_windows", "window_bpb", "default_policies", "run_stream", "summarize", "run", "table", "POINTS"]
