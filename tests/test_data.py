"""Byte pipelines: deterministic split, streaming == in-memory packing, resumable batches."""
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cl_arch.train import data as D  # noqa: E402


def _corpus(root, n=12, size=700):
    """n small files with distinct contents under root (nested, to exercise relative paths)."""
    os.makedirs(os.path.join(root, "pkg"), exist_ok=True)
    files = []
    for i in range(n):
        sub = "pkg" if i % 2 else ""
        path = os.path.join(root, sub, f"mod_{i}.py")
        with open(path, "wb") as f:
            f.write(bytes((i * 7 + j) % 251 for j in range(size + 13 * i)))
        files.append(path)
    return sorted(files)


def test_split_is_deterministic_and_location_independent(tmp_path):
    a = D.resolve_sources(os.path.dirname(_corpus(str(tmp_path / "a" / "src"), n=40)[0]))
    shutil.copytree(tmp_path / "a" / "src", tmp_path / "elsewhere" / "deeper" / "src")
    b = D.resolve_sources(str(tmp_path / "elsewhere" / "deeper" / "src"))
    tr_a, va_a = D.split_files(a, 0.25)
    tr_b, va_b = D.split_files(b, 0.25)
    rel = lambda fs, root: [os.path.relpath(f, root) for f in fs]  # noqa: E731
    assert rel(va_a, tmp_path / "a" / "src") == rel(va_b, tmp_path / "elsewhere" / "deeper" / "src")
    assert va_a and tr_a and not set(tr_a) & set(va_a) and sorted(tr_a + va_a) == sorted(a)
    assert D.split_files(a, 0.25) == (tr_a, va_a)


def test_few_files_split_inside_each_file(tmp_path):
    (f,) = _corpus(str(tmp_path), n=1)
    train, val = D.split_corpus([f], 0.1)
    assert train == [(f, 0.0, 0.9)] and val == [(f, 0.9, 1.0)]
    tr = b"".join(D.iter_span_bytes(train, separator=b""))
    va = b"".join(D.iter_span_bytes(val, separator=b""))
    assert tr + va == open(f, "rb").read()


def test_default_corpus_excludes_held_out_and_tests():
    files = D.default_corpus_files()
    assert len(files) > 50
    root = D.stdlib_dir()
    tops = {os.path.relpath(p, root).split(os.sep)[0] for p in files}
    assert not tops & set(D.HELD_OUT_STDLIB) and not tops & {h + ".py" for h in D.HELD_OUT_STDLIB}
    assert not any(part in ("test", "tests") for p in files for part in os.path.relpath(p, root).split(os.sep))
    assert set(D.stdlib_files("held_out")).isdisjoint(files)


def test_streaming_equals_in_memory_packing(tmp_path):
    files = _corpus(str(tmp_path))
    spans = [(f, 0.0, 1.0) for f in files]
    mem = D.dataset_tensor(D.packed_dataset(spans, 65))
    stream = D.dataset_tensor(D.packed_dataset(spans, 65, streaming=True))
    assert mem.shape == stream.shape and mem.shape[0] > 10
    assert torch.equal(mem, stream)
    raw = b"".join(D.iter_span_bytes(spans))
    assert bytes(mem.flatten().to(torch.uint8).tolist()) == raw[:mem.numel()]
    capped = D.dataset_tensor(D.packed_dataset(spans, 65, max_bytes=1000, streaming=True))
    assert capped.shape[0] == 1000 // 65 and torch.equal(capped, mem[:1000 // 65])


@pytest.mark.parametrize("streaming", [False, True])
def test_batches_resume_and_rank_split(tmp_path, streaming):
    ds = D.packed_dataset([(f, 0.0, 1.0) for f in _corpus(str(tmp_path))], 33, streaming=streaming)
    full = D.BlockBatches(ds, 8, seed=3, shuffle_buffer=16)
    it = iter(full)
    seq = [next(it) for _ in range(40)]  # crosses epoch boundaries
    # Resume from any position continues identically.
    for k in (5, 17):
        again = D.BlockBatches(ds, 8, seed=3, shuffle_buffer=16)
        it2 = iter(again)
        for _ in range(k):
            next(it2)
        resumed = iter(D.BlockBatches(ds, 8, seed=3, shuffle_buffer=16, start=again.state()))
        for j in range(k, k + 6):
            assert torch.equal(next(resumed), seq[j])
    # Two ranks together see exactly the single-process batch.
    r0 = iter(D.BlockBatches(ds, 8, rank=0, world_size=2, seed=3, shuffle_buffer=16))
    r1 = iter(D.BlockBatches(ds, 8, rank=1, world_size=2, seed=3, shuffle_buffer=16))
    for j in range(3):
        assert torch.equal(torch.cat([next(r0), next(r1)]), seq[j])
    # A different seed gives a different order (the shuffle is live).
    other = next(iter(D.BlockBatches(ds, 8, seed=4, shuffle_buffer=16)))
    assert not torch.equal(other, seq[0])


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        D.corpus_files(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_bytes(b"")
    with pytest.raises(ValueError, match="empty corpus"):
        D.corpus_files(str(empty))
    (f,) = _corpus(str(tmp_path / "tiny"), n=1, size=10)
    with pytest.raises(ValueError, match="empty corpus"):
        D.packed_dataset([(f, 0.0, 1.0)], 4096)


def test_legacy_helpers_still_work():
    files = D.stdlib_files("train")[:3]
    data = D.bytes_to_tensor(D.read_bytes(files, 5000))
    x, y = D.random_windows(data, 2, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
