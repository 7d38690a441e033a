"""The streams evaluations read: held-out stdlib packages cut into episodes, the line-level
tab-completion outcome, and held-out stdlib windows for the drift figure."""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from cl_arch import PlasticTransformer
from cl_arch.state import ModelState
from cl_arch.train.data import bytes_to_tensor, random_windows, read_bytes, split_files, stdlib_dir, stdlib_files

NEWLINE = 10


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


def _stdlib_windows(split: str, n: int, length: int, seed: int) -> torch.Tensor:
    """``[n, length + 1]`` random byte windows of the stdlib training split's ``"train"`` or ``"val"`` files."""
    train_files, val_files = split_files(stdlib_files("train"))
    data = bytes_to_tensor(read_bytes(train_files if split == "train" else val_files, 2_000_000))
    x, y = random_windows(data, n, length, torch.Generator().manual_seed(seed))
    return torch.cat([x, y[:, -1:]], dim=1)


def base_windows(n: int = 8, length: int = 512, seed: int = 0) -> torch.Tensor:
    """``[n, length + 1]`` byte windows of the stdlib validation files (never trained on)."""
    return _stdlib_windows("val", n, length, seed)


def anchor_windows(n: int = 16, length: int = 512, seed: int = 0) -> torch.Tensor:
    """``[n, length + 1]`` byte windows of the stdlib *training* files: the anchor a guarded
    ``fold`` measures forgetting on. Disjoint from :func:`base_windows` (validation files), which
    report the drift, and from every held-out package."""
    return _stdlib_windows("train", n, length, seed + 31)


@torch.no_grad()
def window_bpb(model: PlasticTransformer, windows: torch.Tensor, state: Optional[ModelState] = None) -> List[float]:
    """Bits/byte of each window ``[W, L+1]``, starting from ``state`` (batch 1, broadcast) or fresh."""
    W = windows.shape[0]
    st = None if state is None else ModelState.stack([state] * W)
    logits, _ = model(windows[:, :-1], state=st)
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    return (nll / math.log(2)).tolist()


__all__ = ["NEWLINE", "held_out_package", "segment_stream", "line_acceptance", "base_windows", "anchor_windows", "window_bpb"]
