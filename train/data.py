"""Byte-level corpora for pretraining and evaluation.

The default corpus is the Python standard library's own source, present on
every machine (``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded.
A few subpackages are held out of training so evaluation can read code the
model has never seen: see :data:`HELD_OUT_STDLIB`.
"""
import glob
import hashlib
import os
import sysconfig
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

# Held out of the default pretraining corpus; evaluation reads them as unseen code.
HELD_OUT_STDLIB: Tuple[str, ...] = ("email", "json", "xml", "asyncio", "tomllib", "zoneinfo")
# Never part of any corpus: tests, vendored third-party code and build artefacts.
EXCLUDED_STDLIB: Tuple[str, ...] = ("test", "idlelib", "lib2to3", "site-packages", "dist-packages",
                                    "__pycache__", "ensurepip", "turtledemo", "tkinter")


def stdlib_dir() -> str:
    """Folder of the running interpreter's standard library source."""
    return sysconfig.get_paths()["stdlib"]


def _top_component(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".py") else first


def stdlib_files(split: str = "train", root: Optional[str] = None) -> List[str]:
    """Sorted .py files of the standard library.

    Args:
        split: "train" (everything but held-out and excluded parts), "held_out"
            (only :data:`HELD_OUT_STDLIB`) or "all".
    """
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    root = root or stdlib_dir()
    files = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        parts = os.path.relpath(path, root).split(os.sep)
        if any(p in EXCLUDED_STDLIB for p in parts):
            continue
        held = _top_component(path, root) in HELD_OUT_STDLIB
        if split == "all" or (split == "held_out") == held:
            files.append(path)
    return files


def resolve_sources(sources: Union[str, Sequence[str]]) -> List[str]:
    """A folder, a glob, a file or a list of those -> sorted list of existing files.

    Raises:
        ValueError: naming the source that matched nothing.
    """
    if isinstance(sources, str):
        sources = [sources]
    files: List[str] = []
    for src in sources:
        if os.path.isdir(src):
            found = sorted(glob.glob(os.path.join(src, "**", "*.py"), recursive=True))
        elif os.path.isfile(src):
            found = [src]
        else:
            found = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"data source {src!r} does not exist or matches no files")
        files.extend(found)
    return files


def read_bytes(files: Iterable[str], max_bytes: Optional[int] = None, separator: bytes = b"\n\n") -> bytes:
    """Concatenate files (in the given order) up to ``max_bytes``."""
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data + separator)
        total += len(data) + len(separator)
        if max_bytes is not None and total >= max_bytes:
            break
    out = b"".join(chunks)
    return out[:max_bytes] if max_bytes is not None else out


def split_files(files: Sequence[str], val_fraction: float = 0.05) -> Tuple[List[str], List[str]]:
    """Deterministic train/validation split by a hash of each file's name."""
    train, val = [], []
    for path in files:
        h = int(hashlib.sha1(os.path.basename(path).encode() + path.encode()).hexdigest()[:8], 16)
        (val if (h % 10_000) < val_fraction * 10_000 else train).append(path)
    return train, val


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    """``bytes`` -> ``[N]`` uint8 tensor (a copy, so the source may be freed)."""
    if not data:
        raise ValueError("corpus is empty")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a byte tensor as ``(inputs [B, T] long, targets [B, T] long)``."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"corpus of {data.numel()} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]
