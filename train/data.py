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

from .distributed import split_rows

# Held out of the default pretraining corpus; evaluation reads them as unseen code.
HELD_OUT_STDLIB: Tuple[str, ...] = ("email", "json", "xml", "asyncio", "tomllib", "zoneinfo")
# Never part of any corpus: tests, vendored third-party code and build artefacts.
EXCLUDED_STDLIB: Tuple[str, ...] = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
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
    found = []
    # os.walk with pruning rather than a recursive glob: site-packages can be far larger than the
    # standard library itself, and excluded folders need not be listed at all.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_STDLIB]
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    for path in sorted(found):
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


def split_files(files: Sequence[str], val_fraction: float = 0.05,
                root: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """Deterministic train/validation split by a hash of each file's path relative to ``root``.

    ``root`` defaults to the files' common folder, so the split of a corpus is the same on every
    machine wherever the corpus lives (the standard library's install path differs between
    machines; its layout does not). Order within each side follows ``files``.
    """
    files = list(files)
    if root is None:
        root = os.path.commonpath([os.path.abspath(f) for f in files]) if len(files) > 1 else ""
        if files and len(files) == 1:
            root = os.path.dirname(os.path.abspath(files[0]))
    train, val = [], []
    for path in files:
        key = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
        h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
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


# ============================================================================ datasets pipelines
#
# Everything below builds on the `datasets` library. A corpus is a list of files; its bytes are
# concatenated (each file followed by ``separator``) and cut into fixed blocks of ``block_len``
# bytes with no padding (the tail shorter than a block is dropped). A training block is
# ``seq_len + 1`` bytes: inputs are ``block[:-1]``, next-byte targets ``block[1:]``.
#
# Two modes give the same blocks in the same order (tests hold them equal):
#   in memory  -- `datasets.Dataset` of every block, indexed by a seeded permutation;
#   streaming  -- `datasets.IterableDataset` whose generator reads one file at a time and packs on
#                 the fly, so the corpus never has to fit in memory (shuffled by a seeded buffer).

STDLIB_SOURCE = "stdlib"  # the `sources` value that means "the default corpus"

_ROWS_FEATURE = "input_ids"


def default_corpus_files() -> List[str]:
    """Files of the default pretraining corpus: the standard library's ``.py`` source minus
    :data:`HELD_OUT_STDLIB` (kept for evaluation as unseen code) and :data:`EXCLUDED_STDLIB`."""
    return stdlib_files("train")


def corpus_files(sources: Union[str, Sequence[str]]) -> List[str]:
    """``"stdlib"`` -> :func:`default_corpus_files`; anything else -> :func:`resolve_sources`.

    Raises:
        ValueError: a source matches nothing, or the resulting corpus has no bytes at all.
    """
    if sources == STDLIB_SOURCE or (not isinstance(sources, str) and list(sources) == [STDLIB_SOURCE]):
        files = default_corpus_files()
        if not files:
            raise ValueError(f"the standard library at {stdlib_dir()} holds no .py files: empty corpus")
    else:
        files = resolve_sources(sources)
    if sum(os.path.getsize(f) for f in files) == 0:
        raise ValueError(f"data sources {sources!r} matched {len(files)} file(s) but all are empty: empty corpus")
    return files


def split_corpus(files: Sequence[str], val_fraction: float
                 ) -> Tuple[List[Tuple[str, float, float]], List[Tuple[str, float, float]]]:
    """Deterministic train/validation split as ``(path, start, end)`` byte-fraction spans.

    Whole files go one way or the other by :func:`split_files` (a hash of their path), so no
    validation file is ever seen in training. When that leaves either side empty (one file, or
    a handful), each file is split instead: its first ``1 - val_fraction`` of bytes train and the
    rest validate.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    train, val = split_files(files, val_fraction)
    if train and val:
        return [(f, 0.0, 1.0) for f in train], [(f, 0.0, 1.0) for f in val]
    cut = 1.0 - val_fraction
    return [(f, 0.0, cut) for f in files], [(f, cut, 1.0) for f in files]


def iter_span_bytes(spans: Sequence[Tuple[str, float, float]], separator: bytes = b"\n\n") -> Iterable[bytes]:
    """Yield the bytes of each ``(path, start, end)`` span followed by ``separator``; one file in
    memory at a time."""
    for path, start, end in spans:
        with open(path, "rb") as f:
            data = f.read()
        if start > 0.0 or end < 1.0:
            n = len(data)
            data = data[int(n * start):int(n * end)]
        if data:
            yield data + separator


def pack_blocks(chunks: Iterable[bytes], block_len: int, max_bytes: Optional[int] = None) -> Iterable[bytes]:
    """Cut a stream of byte chunks into consecutive ``block_len``-byte blocks (tail dropped).

    ``max_bytes`` caps the bytes consumed from the stream (before packing).
    """
    if block_len < 2:
        raise ValueError(f"block_len must be >= 2, got {block_len}")
    buf, used = bytearray(), 0
    for chunk in chunks:
        if max_bytes is not None:
            chunk = chunk[:max(0, max_bytes - used)]
        used += len(chunk)
        buf += chunk
        n_full = len(buf) // block_len
        for i in range(n_full):
            yield bytes(buf[i * block_len:(i + 1) * block_len])
        del buf[:n_full * block_len]
        if max_bytes is not None and used >= max_bytes:
            return


def _block_generator(spans, block_len, max_bytes, separator):
    # Module-level function so `datasets` can pickle/fingerprint it; `spans` arrives as a tuple
    # (not a list) so `datasets` keeps a single shard and packing runs across file boundaries.
    import numpy as np

    for block in pack_blocks(iter_span_bytes(spans, separator), block_len, max_bytes):
        yield {_ROWS_FEATURE: np.frombuffer(block, dtype=np.uint8)}


def packed_dataset(spans: Sequence[Tuple[str, float, float]], block_len: int, max_bytes: Optional[int] = None,
                   streaming: bool = False, separator: bytes = b"\n\n"):
    """Packed byte blocks of the spans as a `datasets` dataset.

    Args:
        spans: ``(path, start, end)`` from :func:`split_corpus` (or ``(path, 0.0, 1.0)``).
        block_len: bytes per row (``seq_len + 1`` for next-byte training).
        max_bytes: read at most this many bytes of the corpus.
        streaming: return an ``IterableDataset`` that packs while it reads.

    Returns:
        ``datasets.Dataset`` (rows ``input_ids``: ``[block_len]`` uint8, torch format) or
        ``datasets.IterableDataset`` yielding the same rows in the same order.

    Raises:
        ValueError: the spans hold fewer than ``block_len`` bytes (no block at all).
    """
    import datasets
    import numpy as np

    if streaming:
        features = datasets.Features({_ROWS_FEATURE: datasets.Sequence(datasets.Value("uint8"), length=block_len)})
        ds = datasets.IterableDataset.from_generator(
            _block_generator, features=features,
            gen_kwargs={"spans": tuple(tuple(s) for s in spans), "block_len": block_len,
                        "max_bytes": max_bytes, "separator": separator})
        return ds.with_format("torch")
    # In memory: read once, reshape; the same bytes and cut as the generator above.
    data = b"".join(iter_span_bytes(spans, separator))
    if max_bytes is not None:
        data = data[:max_bytes]
    n = len(data) // block_len
    if n == 0:
        raise ValueError(f"corpus holds {len(data)} bytes, fewer than one block of {block_len}: empty corpus")
    import pyarrow as pa

    # A fixed-size-list arrow column straight over the bytes: no per-row Python objects.
    flat = pa.array(np.frombuffer(data, dtype=np.uint8, count=n * block_len), type=pa.uint8())
    table = pa.table({_ROWS_FEATURE: pa.FixedSizeListArray.from_arrays(flat, block_len)})
    ds = datasets.Dataset(table)  # arrow infers exactly `features`; a cast would copy
    return ds.with_format("torch")


class BlockBatches:
    """Deterministic, resumable stream of global batches of packed blocks.

    Every process draws the same *global* batch of ``global_batch`` blocks and keeps its own
    rows ``[rank * B_local, (rank + 1) * B_local)``; one process with the whole batch therefore
    sees exactly the data a group of processes sees together, which is what makes the DDP run
    comparable with the single-process one.

    The order is a function of ``(seed, epoch)`` only: in memory a ``torch.randperm`` per epoch,
    streaming the dataset's seeded shuffle buffer (``set_epoch``). :meth:`state` / ``start`` give
    the position as ``(epoch, batches consumed in that epoch)``, so resuming skips straight there.

    Yields ``[B_local, block_len]`` int64 tensors.
    """

    def __init__(self, dataset, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, start: Tuple[int, int] = (0, 0)):
        import datasets

        if global_batch % world_size != 0:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.ds = dataset
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        self.global_batch, self.rank, self.world = global_batch, rank, world_size
        self.local = global_batch // world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epoch, self.batch_in_epoch = start
        if not self.streaming and len(dataset) < global_batch:
            raise ValueError(f"corpus holds {len(dataset)} blocks, fewer than one global batch of "
                             f"{global_batch}: lower batch_size/seq_len or add data")

    def state(self) -> Tuple[int, int]:
        """``(epoch, batches consumed in this epoch)``: pass back as ``start`` to resume."""
        return self.epoch, self.batch_in_epoch

    def load_state(self, position) -> None:
        """Continue from a :meth:`state` (before iterating): what ``start`` does at construction."""
        self.epoch, self.batch_in_epoch = (int(v) for v in position)

    def _rows(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank * self.local:(self.rank + 1) * self.local].long()

    def __iter__(self):
        while True:
            if self.streaming:
                yield from self._iter_streaming()
            else:
                yield from self._iter_memory()
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _iter_memory(self):
        n = len(self.ds)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        for b in range(self.batch_in_epoch, n // self.global_batch):
            idx = order[b * self.global_batch:(b + 1) * self.global_batch]
            rows = self.ds[idx.tolist()][_ROWS_FEATURE]
            self.batch_in_epoch = b + 1
            yield self._rows(rows)

    def _iter_streaming(self):
        ds = self.ds
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(self.epoch)
        ds = ds.skip(self.batch_in_epoch * self.global_batch)
        got_any = self.batch_in_epoch > 0
        # Batched iteration formats a whole batch at once (per-example torch formatting is ~50x slower).
        for batch in ds.iter(batch_size=self.global_batch, drop_last_batch=True):
            self.batch_in_epoch += 1
            got_any = True
            yield self._rows(torch.as_tensor(batch[_ROWS_FEATURE]))
        if not got_any:
            raise ValueError(f"streaming corpus holds fewer than one global batch of {self.global_batch} blocks")


def dataset_tensor(dataset, max_rows: Optional[int] = None) -> torch.Tensor:
    """All rows (or the first ``max_rows``) of a packed dataset as one ``[N, block_len]`` int64 tensor."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        if max_rows is not None:
            dataset = dataset.take(max_rows)
        parts = [torch.as_tensor(b[_ROWS_FEATURE]) for b in dataset.iter(batch_size=1024)]
        if not parts or sum(p.shape[0] for p in parts) == 0:
            raise ValueError("dataset is empty")
        return torch.cat(parts).long()
    n = len(dataset) if max_rows is None else min(max_rows, len(dataset))
    return dataset[:n][_ROWS_FEATURE].long()


class RandomRows:
    """Batches of ``batch_size`` rows drawn with replacement from ``rows [N, ...]`` by a seeded
    generator; on ``world`` processes every one draws the same rows and keeps its contiguous share.

    ``state()`` is the number of batches drawn; ``load_state(n)`` replays ``n`` draws, so a resumed
    run continues the same sequence. Yields ``[batch_size // world, ...]`` tensors.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if rows.shape[0] == 0:
            raise ValueError("RandomRows: no rows to draw from")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.share = split_rows(batch_size, rank, world, "batch_size")
        self.drawn = 0

    def state(self) -> list[int]:
        return [self.drawn]

    def load_state(self, position: Sequence[int]) -> None:
        self.drawn = int(position[0])

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.drawn):
            torch.randint(0, self.rows.shape[0], (self.batch_size,), generator=g)
        while True:
            idx = torch.randint(0, self.rows.shape[0], (self.batch_size,), generator=g)
            self.drawn += 1
            yield self.rows[idx][self.share]
