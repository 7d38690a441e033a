"""Dynamic evaluation's step size and decay, swept on a package never reported (``cl-arch eval tune-dynamic``
reports the sweep; ``codebase --dyn-tuned`` reads it through :func:`load_or_tune`).

Dynamic evaluation (:class:`~cl_arch.eval.lib.learners.DynamicEval`) has two settings that decide
whether it is a strong baseline or a strawman: the step size ``lr`` and the decay toward the
pretrained weights. Tuning them on a reported stream would leak the test set into the baseline
(and flatter it); never tuning them would handicap it. So they are swept here on a held-out stdlib
package that is never a reported stream (default ``asyncio``; ``json``, ``email`` and ``xml``, the
reported ones, are refused), and the codebase benchmark takes the best setting
(``CodebaseConfig(dyn_tuned=True)`` makes the codebase run call :func:`load_or_tune`).

Protocol (the codebase benchmark's, so that the tuned setting transfers): the package's files in
order, the first ``max_bytes`` bytes, cut at line ends into episodes of at most ``episode_bytes``
(:func:`~cl_arch.eval.lib.streams.segment_stream`); every byte is scored before anything learns from it
(one :meth:`DynamicEval.step` per chunk of ``chunk`` bytes, :meth:`DynamicEval.new_episode` between
episodes: the adapted weights carry over, the recurrent state does not); RMS statistics from
:func:`~cl_arch.eval.lib.learners.calibration_batches` (training split, the step's batch shape,
seed ``seed + 7`` as in the codebase benchmark). Each setting is scored by its prequential
bits/byte over the whole stream and reported as its gain over the frozen model on the same bytes
(same episodes, no updates). The criterion is the mean over the stream, early bytes included: a
step size that only pays off late but costs early is worse for a user who reads the stream once.

Default grids: ``params="all"``: ``lr`` in (3e-5, 1e-4, 3e-4, 1e-3) x ``decay`` in (0, 1e-3, 1e-2).
``params="fast_W0"`` (sparse dynamic evaluation: only the fast memories' ``W0``): the same decays,
``lr`` shifted up tenfold to (3e-4, 1e-3, 3e-3, 1e-2). Why: the RMS step moves each adapted weight
by about ``lr`` in units of its gradient scale, and ``W0`` is 9% of the default model's weights,
so the same ``lr`` changes the function less; and most ``W0`` entries (the readout memory's, for
rare bytes) have ``sqrt(MS)`` around 1e-7, far below ``eps`` = 1e-3, so their steps are
``lr * g / eps`` with a tiny ``g`` and need a larger ``lr`` to move at all. Measured: a probe on
the first 8 kB of asyncio with the shipped model (decay 0, gains over frozen in bits/byte) found
``fast_W0``: 1e-4 +0.003, 3e-4 +0.009, 1e-3 +0.021, 3e-3 +0.028, 1e-2 -0.065 and ``all``: 1e-5
+0.006, 3e-5 +0.015, 1e-4 +0.037, 3e-4 +0.052, 1e-3 -0.082: each best step lies inside its grid,
with a worse step on either side, and ``fast_W0``'s is ten times ``all``'s.

The default sweeps on the shipped model (first 30 kB of asyncio, 16 episodes, frozen 1.204
bits/byte; ``cl-arch eval tune-dynamic``, about 2.5 min each on one CPU thread): ``all`` best at lr
3e-4, decay 1e-3, +0.113 bits/byte (decay 0: +0.113, 1e-2: +0.111; lr 1e-3: +0.02 to +0.04);
``fast_W0`` best at lr 3e-3, decay 1e-2, +0.064 (decay 0: +0.060; off the grid, decay 3e-2: +0.062
and 1e-1: +0.049, so the best decay is inside too). Decay matters little at these stream lengths.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.io import write_json
from cl_arch.train.data import HELD_OUT_STDLIB, resolve_sources

from .learners import DYN_PARAMS, DynamicEval, calibration_batches
from .streams import held_out_package, segment_stream

REPORTED_STREAMS: Tuple[str, ...] = ("json", "email", "xml")
DEFAULT_LRS: Dict[str, Tuple[float, ...]] = {"all": (3e-5, 1e-4, 3e-4, 1e-3), "fast_W0": (3e-4, 1e-3, 3e-3, 1e-2)}
DEFAULT_DECAYS: Tuple[float, ...] = (0.0, 1e-3, 1e-2)
DEFAULT_CALIB_BATCHES = 32
# Bump when the protocol changes what a setting scores: cached sweeps under the old number are
# then ignored instead of silently reused.
TUNE_VERSION = 1

CalibSpec = Union[None, int, Sequence[torch.Tensor]]


def check_package(package: str) -> str:
    """``package`` if it may be tuned on, else ``ValueError`` saying why.

    Refused: the reported streams (:data:`REPORTED_STREAMS`: tuning there leaks the test set into
    the baseline) and any package outside :data:`~cl_arch.train.data.HELD_OUT_STDLIB` (the
    model was pretrained on it, so it says nothing about adapting to unseen code).
    """
    name = os.path.basename(os.path.normpath(str(package)))
    name = name[:-3] if name.endswith(".py") else name
    if name in REPORTED_STREAMS:
        raise ValueError(f"cannot tune dynamic evaluation on {name!r}: it is a reported stream "
                         f"({', '.join(REPORTED_STREAMS)}), and tuning on it would leak the test set into the "
                         f"baseline; use another held-out package, e.g. 'asyncio'")
    if name not in HELD_OUT_STDLIB:
        raise ValueError(f"cannot tune dynamic evaluation on {name!r}: the model was pretrained on it (held-out "
                         f"packages: {', '.join(HELD_OUT_STDLIB)}; tune on one not in {', '.join(REPORTED_STREAMS)})")
    return name


def resolve_grid(params: str, lrs: Optional[Sequence[float]] = None,
                 decays: Optional[Sequence[float]] = None) -> Tuple[List[float], List[float]]:
    """The ``(lrs, decays)`` swept: the given ones, or the defaults of ``params``."""
    if params not in DYN_PARAMS:
        raise ValueError(f"params must be one of {DYN_PARAMS}, got {params!r}")
    lrs = [float(v) for v in (DEFAULT_LRS[params] if lrs is None else lrs)]
    decays = [float(v) for v in (DEFAULT_DECAYS if decays is None else decays)]
    if not lrs or not decays:
        raise ValueError("the grid needs at least one lr and one decay")
    return lrs, decays


def tuning_segments(package: str = "asyncio", max_bytes: int = 30_000,
                    episode_bytes: int = 2048) -> List[Tuple[bytes, int]]:
    """The tuning stream: ``package``'s files cut into episodes as the codebase benchmark cuts its
    streams (``[(segment, prev_byte)]``, :func:`~cl_arch.eval.lib.streams.segment_stream`)."""
    check_package(package)
    return segment_stream(resolve_sources(held_out_package(package)), max_bytes, episode_bytes)


class FrozenReader:
    """The reference: the same model read the same way, never updated (``step``/``new_episode``
    as :class:`DynamicEval`, for :func:`prequential_bits`)."""

    def __init__(self, model: PlasticTransformer):
        self.model = model
        self.state = None

    def new_episode(self) -> None:
        self.state = None

    @torch.no_grad()
    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``ids [1, T]`` -> logits ``[1, T, V]`` (``targets`` unused: nothing learns)."""
        logits, self.state = self.model(ids, state=self.state)
        return logits


def prequential_bits(reader: Any, segments: Sequence[Tuple[bytes, int]], chunk: int = 256,
                     progress: bool = False, desc: str = "stream") -> np.ndarray:
    """Bits of every byte of ``segments`` ``[N]`` (float64), each scored before ``reader`` learns
    from it: ``reader.step(ids [1, <=chunk], targets [1, <=chunk]) -> logits [1, T, V]`` per chunk,
    ``reader.new_episode()`` after each segment (as the codebase benchmark's ``run_stream``)."""
    out: List[np.ndarray] = []
    for seg, prev in tqdm(segments, desc=desc, unit="ep", leave=False, disable=not progress, mininterval=2.0):
        x = torch.tensor([prev] + list(seg[:-1]), dtype=torch.long)
        y = torch.tensor(list(seg), dtype=torch.long)
        for c0 in range(0, len(seg), chunk):
            xi, yi = x[c0:c0 + chunk], y[c0:c0 + chunk]
            logits = reader.step(xi.unsqueeze(0), yi.unsqueeze(0))
            lp = torch.log_softmax(logits[0].float(), -1)
            out.append((-lp.gather(-1, yi.unsqueeze(-1)).squeeze(-1) / math.log(2)).double().numpy())
        reader.new_episode()
    return np.concatenate(out) if out else np.zeros(0)


def _calibration_set(calib_batches: CalibSpec, chunk: int, seed: int) -> Tuple[List[torch.Tensor], Any]:
    """The calibration windows and how to record them (an int, or a digest of given tensors)."""
    if calib_batches is None or isinstance(calib_batches, int):
        n = DEFAULT_CALIB_BATCHES if calib_batches is None else calib_batches
        return list(calibration_batches(n, chunk, seed + 7)), n
    batches = [torch.as_tensor(b) for b in calib_batches]
    h = hashlib.sha1()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return batches, "given:" + h.hexdigest()[:12]


def tune(model: PlasticTransformer, package: str = "asyncio", max_bytes: int = 30_000, params: str = "all",
         lrs: Optional[Sequence[float]] = None, decays: Optional[Sequence[float]] = None, chunk: int = 256,
         calib_batches: CalibSpec = None, seed: int = 0, progress: bool = True, episode_bytes: int = 2048,
         eps: float = 1e-3) -> Dict[str, Any]:
    """Sweep ``lrs x decays`` of RMS dynamic evaluation on ``package`` (see the module docstring).

    Args:
        model: the model whose baseline is tuned (not modified; every setting adapts a copy).
        package: a held-out stdlib package that is not a reported stream (:func:`check_package`).
        max_bytes: bytes of the package read (the first ones, files in sorted order).
        params: ``"all"`` or ``"fast_W0"`` (:class:`DynamicEval`); also picks the default grid.
        lrs, decays: the grid (None: :data:`DEFAULT_LRS` ``[params]``, :data:`DEFAULT_DECAYS`).
        chunk: bytes per dynamic-evaluation step.
        calib_batches: number of :func:`calibration_batches` (None: 32), or the windows
            ``[1, chunk + 1]`` themselves; one calibration serves every setting.
        seed: the calibration windows' seed (``seed + 7``, as the codebase benchmark's).
        episode_bytes, eps: the codebase benchmark's episode length and RMS guard.

    Returns:
        ``best`` (``{"lr", "decay", "gain_bpb"}``: the setting with the largest gain), ``grid``
        (per setting ``{"lr", "decay", "gain_bpb", "bpb", "sec", "drift", "diverged"}``; ``gain_bpb``
        = frozen bits/byte - this setting's, None if it diverged; ``sec`` its stream's wall time),
        ``frozen_bpb``, ``tuned_on``, ``params``, ``max_bytes``, ``bytes``, ``episodes``,
        ``model_fingerprint``, ``lrs``, ``decays``, ``protocol`` (chunk, episode bytes, eps, rule,
        calibration batches, seed, :data:`TUNE_VERSION`) and ``calibration``
        (:meth:`DynamicEval.calibrate`'s figures).
    """
    package = check_package(package)
    lrs, decays = resolve_grid(params, lrs, decays)
    segments = tuning_segments(package, max_bytes, episode_bytes)
    n_bytes = sum(len(s) for s, _ in segments)
    model.eval()
    t0 = time.perf_counter()
    frozen_bits = prequential_bits(FrozenReader(model), segments, chunk, progress, desc=f"frozen on {package}")
    frozen_bpb = float(frozen_bits.mean())
    frozen_sec = time.perf_counter() - t0
    batches, calib_record = _calibration_set(calib_batches, chunk, seed)
    ref = DynamicEval(model, lr=lrs[0], eps=eps, params=params)
    calibration = ref.calibrate(batches)
    grid: List[Dict[str, Any]] = []
    settings = [(lr, d) for d in decays for lr in lrs]
    bar = tqdm(settings, desc=f"tune dynamic eval ({params}) on {package}", unit="setting", disable=not progress)
    for lr, decay in bar:
        dyn = DynamicEval(model, lr=lr, eps=eps, decay=decay, params=params)
        dyn.load_calibration(ref.ms)
        t0 = time.perf_counter()
        try:
            bpb = float(prequential_bits(dyn, segments, chunk, progress, desc=f"lr={lr:g} decay={decay:g}").mean())
        except ValueError:
            # the kernels refuse non-finite inputs: a step size that blew the weights up is a
            # result of the sweep (diverged), any other error is a bug and propagates
            if all(bool(torch.isfinite(p).all()) for p in dyn.params):
                raise
            bpb = float("nan")
        sec = time.perf_counter() - t0
        diverged = not math.isfinite(bpb)
        drift = dyn.drift_from_start()
        grid.append({"lr": lr, "decay": decay, "gain_bpb": None if diverged else frozen_bpb - bpb,
                     "bpb": None if diverged else bpb, "sec": sec,
                     "drift": drift if math.isfinite(drift) else None, "diverged": diverged})
        bar.set_postfix_str(f"lr={lr:g} decay={decay:g} gain={'diverged' if diverged else f'{frozen_bpb - bpb:+.4f}'}")
    ok = [g for g in grid if not g["diverged"]]
    if not ok:
        raise RuntimeError(f"every dynamic-evaluation setting diverged on {package} (lrs {lrs}, decays {decays})")
    top = max(ok, key=lambda g: g["gain_bpb"])
    return {"best": {"lr": top["lr"], "decay": top["decay"], "gain_bpb": top["gain_bpb"]},
            "grid": grid, "frozen_bpb": frozen_bpb, "frozen_sec": frozen_sec, "tuned_on": package,
            "params": params, "max_bytes": max_bytes, "bytes": n_bytes, "episodes": len(segments),
            "model_fingerprint": model.fingerprint(), "lrs": lrs, "decays": decays,
            "protocol": _protocol(chunk, episode_bytes, eps, calib_record, seed),
            "calibration": calibration}


def _protocol(chunk: int, episode_bytes: int, eps: float, calib: Any, seed: int) -> Dict[str, Any]:
    return {"chunk": chunk, "episode_bytes": episode_bytes, "eps": eps, "rule": "rms", "calib_batches": calib,
            "calib_seed": seed + 7, "seed": seed, "version": TUNE_VERSION}


# ---------------------------------------------------------------------------- cache
def tune_cache_dir(cache_dir: Optional[str] = None) -> str:
    """Where sweeps are cached: ``cache_dir``, else ``$CL_ARCH_CACHE`` (or ``$XDG_CACHE_HOME/cl_arch``,
    or ``~/.cache/cl_arch``) + ``/dyn_tune`` (the root :func:`~cl_arch.eval.lib.models.default_cache_dir`
    uses)."""
    if cache_dir:
        return cache_dir
    root = os.environ.get("CL_ARCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cl_arch")
    return os.path.join(root, "dyn_tune")


def cache_key(model: PlasticTransformer, package: str = "asyncio", max_bytes: int = 30_000, params: str = "all",
              lrs: Optional[Sequence[float]] = None, decays: Optional[Sequence[float]] = None, chunk: int = 256,
              calib_batches: CalibSpec = None, seed: int = 0, episode_bytes: int = 2048,
              eps: float = 1e-3) -> Dict[str, Any]:
    """Everything a sweep's result depends on: the model's fingerprint, the stream, the grid and
    the protocol (given calibration windows enter as a digest of their bytes)."""
    lrs, decays = resolve_grid(params, lrs, decays)
    if calib_batches is None or isinstance(calib_batches, int):
        calib = DEFAULT_CALIB_BATCHES if calib_batches is None else calib_batches
    else:
        calib = _calibration_set(calib_batches, chunk, seed)[1]
    return {"model_fingerprint": model.fingerprint(), "package": check_package(package), "max_bytes": max_bytes,
            "params": params, "lrs": lrs, "decays": decays,
            "protocol": _protocol(chunk, episode_bytes, eps, calib, seed)}


def cache_path(key: Dict[str, Any], cache_dir: Optional[str] = None) -> str:
    """``<tune_cache_dir>/<fingerprint>-<package>-<max_bytes>-<params>-<hash of the key>.json``."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    stem = f"{key['model_fingerprint']}-{key['package']}-{key['max_bytes']}-{key['params']}-{digest}"
    return os.path.join(tune_cache_dir(cache_dir), stem + ".json")


def _read_cache(path: str, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The cached sweep at ``path`` if it is whole and for ``key``; None (with a warning) if not."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
        if not isinstance(res, dict) or res.get("key") != key:
            raise ValueError("it was written for other settings")
        best = res["best"]
        if not (isinstance(best, dict) and isinstance(best["lr"], (int, float)) and best["lr"] > 0
                and isinstance(best["decay"], (int, float)) and isinstance(res["grid"], list)):
            raise ValueError("its 'best' or 'grid' is malformed")
        return res
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"dynamic-evaluation tuning cache {path} is unusable ({type(e).__name__}: {e}); "
                      f"tuning again", RuntimeWarning, stacklevel=3)
        return None


def load_or_tune(model: PlasticTransformer, package: str = "asyncio", max_bytes: int = 30_000, params: str = "all",
                 cache_dir: Optional[str] = None, recompute: bool = False, **kw: Any) -> Dict[str, Any]:
    """:func:`tune`'s result, from the cache when this model, stream, grid and protocol were swept
    before; else tuned now and cached (JSON, written atomically). A corrupt or mismatched cache
    file is reported (``RuntimeWarning``) and recomputed; a cache that cannot be written is
    reported and skipped. ``recompute``: tune even if cached (and overwrite the cache).

    ``kw``: :func:`tune`'s other arguments (``lrs``, ``decays``, ``chunk``, ``calib_batches``,
    ``seed``, ``episode_bytes``, ``eps``, ``progress``). Adds ``cache_path`` and ``cached``
    (whether it was read from the cache) to the result.
    """
    progress = kw.pop("progress", True)
    key = cache_key(model, package, max_bytes, params, **kw)
    path = cache_path(key, cache_dir)
    res = None if recompute else _read_cache(path, key)
    if res is not None:
        return {**res, "cache_path": path, "cached": True}
    res = tune(model, package=package, max_bytes=max_bytes, params=params, progress=progress, **kw)
    res["key"] = key
    try:
        write_json(path, res)
    except OSError as e:
        warnings.warn(f"could not write the dynamic-evaluation tuning cache {path} ({e})", RuntimeWarning,
                      stacklevel=2)
    return {**res, "cache_path": path, "cached": False}
