"""Shared fixtures.

``recall_model`` (use this one in tests)
    A fresh deep copy, per test, of a small all-fast-weight model trained on associative recall
    (:func:`cl_arch.train.recall.train_recall_model`, config :func:`~cl_arch.train.recall.recall_config`:
    2 fast layers, d=64, 2 heads of 32x32, byte vocabulary). Its fast memory maps a key token
    (``train.tasks.KEYS``) to the value token (``train.tasks.VALUES``) written after it, also
    from a memory carried into a new episode, i.e. from ``S0 = W0 + P`` (but some models of the recipe
    store a pair only when the next token arrives, so an episode that ends on a value may carry
    nothing of its last pair: tests/test_session.py, the Sutton test): use it for anything that
    tests *learning* (sessions, the Sutton test, consolidation, eval); a fresh model cannot map a
    written value back to its token (docs/design.md, "Measuring learning"). Tests may modify their
    copy freely.

``recall_model_base`` (session scope)
    The trained model itself, trained once per pytest run (400 steps: about 40 s on two idle CPU
    cores; deterministic: fixed seed and step count). Whether recall forms in that budget depends
    on the seed and on the CPU's arithmetic (on the build machine seed 0 learns, seeds 1-4 stay
    near chance), so :func:`~cl_arch.train.recall.train_gated_recall_model` retrains with the next
    seed (0, 1000, 2000, ...) until recall accuracy reaches 0.75 (seed 0 here: 0.879; seeds 1000-7000:
    0.11, 0.12, 0.83, 0.06, 0.13, 0.09, 0.11): a machine whose arithmetic
    leaves seed 0 at chance trains another model rather than failing every learning test.
    On a second 2-core machine seed 0 reached 0.621 and seeds 1000-9000 0.880, 0.982, 1.000, 0.087,
    0.063, 0.117, 0.113, 0.810, 0.857, so the fixture took seed 1000 there: each machine's tests
    run on their own model, and a threshold on a learned figure must hold over the models that
    pass the bar, not only the one a machine picks (the Sutton test's sweep covers five).
    Do not modify it; take ``recall_model``. Its first seed is ``RECALL_SEED`` (0). The checkpoint is cached in pytest's cache folder
    (``.pytest_cache/d/recall_model``) under a hash of the library, kernel and task sources, so
    later runs load it in a second; ``pytest --cache-clear`` retrains.

Training runs with one intra-op thread: on a shared, loaded machine two OpenMP threads
spin-wait on each other and a step can take 50x longer. The previous setting is restored.
"""
import copy
import glob
import hashlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's own @jit helpers (tl.sigmoid, cdiv, ...) are built interpreted or compiled when triton
    # is first imported. A test module that imports triton indirectly (transformers does, in
    # test_hf.py) would otherwise fix them as compiled before the kernel tests ask for the
    # interpreter, and every interpreted kernel would then fail with "Cannot call @triton.jit'd
    # outside of the scope of a kernel". conftest is imported before any test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")

RECALL_STEPS = 400
RECALL_MIN_ACCURACY = 0.75
RECALL_SEED = 0
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources_digest() -> str:
    """Hash of everything the trained weights depend on (library, kernels, task code, recipe)."""
    h = hashlib.sha256(f"{RECALL_STEPS}/{RECALL_SEED}/{RECALL_MIN_ACCURACY}/{torch.__version__}".encode())
    files = sorted(glob.glob(os.path.join(_ROOT, "cl_arch", "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(_ROOT, "kernels", "**", "*.py"), recursive=True)
                   + [os.path.join(_ROOT, "train", "recall.py"), os.path.join(_ROOT, "train", "tasks.py")])
    for f in files:
        h.update(os.path.relpath(f, _ROOT).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its ops are tiny, and on a loaded two-core machine two OpenMP threads spin-wait on each other
    (steps 10-50x slower were measured). The previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny byte model (random weights): plumbing and exactness checks only, no figure depends on
    what it learns."""
    from cl_arch import PlasticConfig, PlasticTransformer

    torch.manual_seed(0)
    cfg = PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=16, head_v_dim=16, n_attn_heads=2,
                        attn_window=64, chunk_size=16, mlp_ratio=2.0)
    return PlasticTransformer(cfg).eval()


@pytest.fixture(scope="session")
def output_memory_parts():
    """``parts(model, ids, name) -> (logits, logits without the output memory `name`, h)``: what a
    test writing an output memory's rule out needs; ``h [B, T, d_model]`` are the final normed
    hidden states (no grad)."""
    from cl_arch.state import StepContext

    @torch.no_grad()
    def parts(model, ids, name):
        logits, _ = model(ids)
        with model.memories_off(name):
            base, _ = model(ids)
        x = model.embed(ids)
        for blk in model.blocks:
            x, _ = blk(x, None, StepContext(need_state=False))
        return logits, base, model.norm_f(x)
    return parts


@pytest.fixture(scope="session")
def recall_model_base(request):
    from cl_arch import PlasticTransformer
    from cl_arch.train.recall import train_gated_recall_model

    pytest_cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache = None if pytest_cache is None else \
        os.path.join(str(pytest_cache.mkdir("recall_model")), _sources_digest())
    model = None
    if cache is not None and os.path.isfile(os.path.join(cache, "config.json")):
        try:
            model = PlasticTransformer.from_pretrained(cache)
        except (ValueError, OSError):
            model = None  # a damaged cache entry: retrain
    if model is None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, info = train_gated_recall_model(steps=RECALL_STEPS, seed=RECALL_SEED, lr=1e-2,
                                                   min_accuracy=RECALL_MIN_ACCURACY, tries=8)
            print(f"\nrecall fixture: {info}")
        finally:
            torch.set_num_threads(threads)
        if cache is not None:
            model.save_pretrained(cache)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # the shared copy is read-only; copies re-enable below
    return model


@pytest.fixture
def recall_model(recall_model_base):
    model = copy.deepcopy(recall_model_base)
    for name, p in model.named_parameters():
        p.requires_grad_(True)
    return model


def write_stdlib_corpus(root, max_files: int, bytes_per_file: int, total_bytes: int) -> str:
    """A small real corpus for training tests: the first ``max_files`` stdlib training files, each cut to
    ``bytes_per_file``, written under ``root`` until ``total_bytes``; returns the folder."""
    from cl_arch.train.data import stdlib_files

    total = 0
    for i, f in enumerate(stdlib_files("train")[:max_files]):
        data = open(f, "rb").read()[:bytes_per_file]
        (root / f"f{i}.py").write_bytes(data)
        total += len(data)
        if total > total_bytes:
            break
    return str(root)


@pytest.fixture(scope="session")
def stdlib_corpus():
    """:func:`write_stdlib_corpus`, for module fixtures: ``stdlib_corpus(root, max_files, bytes_per_file, total)``."""
    return write_stdlib_corpus
