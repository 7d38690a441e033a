"""Hostile inputs (issue 22): a folder from elsewhere (a downloaded model, a checkpoint, a report,
a session store) can be refused, but loading it never touches anything outside it and never runs
code. docs/security.md lists each input with the message quoted here.

- Commit journals naming anything but a plain name inside their folder (an absolute path, ``..``,
  a symbolic link leading outside), in moves, discards, parts or a pointer's primary.
- Lock files and journals that are symbolic links or not regular files.
- Pickled code in a checkpoint's ``.pt`` files (``rng_state_<rank>.pt``, ``training_state.pt``).
- Tampered safetensors headers (corrupt JSON, a dtype or shape that does not fit the config).
- A session file written for another model.
"""
import hashlib
import json
import os
import random
import shlex
import shutil
import struct

import numpy as np
import pytest
import torch

from cl_arch import PlasticConfig, PlasticTransformer, Session, SessionStore
from cl_arch import io
from cl_arch.consolidate.report import UNDO_KEY, load_report, write_report
from cl_arch.train import checkpoint as ckpt

CFG = dict(d_model=32, n_layers=2)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return PlasticTransformer(PlasticConfig(**CFG))


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory):
    """A save_pretrained folder, copied by each test before it is made hostile."""
    folder = tmp_path_factory.mktemp("clean") / "model"
    _tiny().save_pretrained(folder)
    return str(folder)


def snapshot(root, skip=()):
    """Every path under ``root`` (not following links) with its kind and content digest."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skip]
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _victim(parent):
    """Things outside the hostile folder that a hostile journal would like to move or delete."""
    victim = os.path.join(parent, "victim")
    os.makedirs(os.path.join(victim, "sub"))
    for rel, text in (("a.txt", "precious"), ("sub/b.bin", "also precious")):
        with open(os.path.join(victim, rel), "w") as f:
            f.write(text)
    with open(os.path.join(parent, "victim_file.txt"), "w") as f:
        f.write("a file beside the folder")
    return victim


def _entry(trick, victim, folder):
    """The journal entry for ``trick``: an absolute path, a ``..`` path, or a link inside the folder."""
    if trick == "absolute":
        return victim
    if trick == "dotdot":
        return "../" + os.path.basename(victim)
    os.symlink(victim, os.path.join(folder, "evil"))  # a link inside the folder, leading outside
    return "evil"


@pytest.mark.parametrize("where", ["moves", "discard"])
@pytest.mark.parametrize("trick", ["absolute", "dotdot", "symlink"])
def test_journal_entry_outside_the_folder_is_refused(tmp_path, clean_model, trick, where):
    """Issue 22, item 1: before, from_pretrained ran such a journal (rmtree of the victim for a
    discard, a move of it into the folder for a move)."""
    folder = str(tmp_path / "model")
    shutil.copytree(clean_model, folder)
    victim = _victim(str(tmp_path))
    entry = _entry(trick, victim, folder)
    journal = io.journal_path(os.path.join(folder, "config.json"))
    body = {"moves": [[entry, "stolen"]], "discard": []} if where == "moves" else \
        {"moves": [], "discard": [entry]}
    with open(journal, "w") as f:
        json.dump(body, f)
    before_victim, before_folder = snapshot(victim), snapshot(folder)
    with pytest.raises(ValueError, match="commit journal") as e:
        PlasticTransformer.from_pretrained(folder)
    msg = str(e.value)
    assert journal in msg and repr(entry) in msg and "nothing was moved or deleted" in msg, msg
    assert snapshot(victim) == before_victim
    assert snapshot(folder) == before_folder  # the journal is refused whole, before any move


class _Marker:
    """Unpickling this runs ``os.system("touch <marker>")``: the shape of a hostile pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(self.marker),))


def _checkpoint(directory, seed=0):
    model = _tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.save_checkpoint(directory, model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10), {"step": 3})
    return model, opt


@pytest.mark.parametrize("name", ["rng_state_0.pt", "training_state.pt"])
def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, name):
    """Issue 22, item 2: before, resuming unpickled rng_state_<rank>.pt with weights_only=False,
    and the marker appeared."""
    directory = str(tmp_path / "checkpoints" / "step_000003")
    model, opt = _checkpoint(directory)
    marker = str(tmp_path / "marker")
    torch.save({"python": _Marker(marker), "numpy": [], "torch": torch.get_rng_state()},
               os.path.join(directory, name))
    with pytest.raises(ValueError, match="refusing to load the .* which could run code") as e:
        ckpt.load_checkpoint(directory, model, opt)
    assert os.path.join(directory, name) in str(e.value) and "posix.system" in str(e.value), str(e.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("how", ["given", "recorded"])
def test_pickled_code_in_a_retrofit_base_is_refused(tmp_path, how):
    """A base model folder whose ``pytorch_model.bin`` holds pickled code, passed to ``load_retrofit`` or
    recorded in the retrofit: a ValueError naming the folder, and the code never runs."""
    transformers = pytest.importorskip("transformers")
    from cl_arch.hf import load_retrofit, retrofit, save_retrofit

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    folder = str(tmp_path / "base")
    base.save_pretrained(folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)  # the retrofit records this folder
    save_retrofit(retrofit(base, layers=[0], n_heads=2, head_k_dim=8, head_v_dim=8), str(tmp_path / "retro"))
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(folder, f))
    marker = str(tmp_path / "marker")
    torch.save({"model.embed_tokens.weight": _Marker(marker)}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="holds more than tensors and plain data") as e:
        load_retrofit(str(tmp_path / "retro"), folder if how == "given" else None)
    assert folder in str(e.value) and "posix.system" in str(e.value), str(e.value)
    assert not os.path.exists(marker)


def test_rng_state_round_trips_under_weights_only(tmp_path):
    """The real RNG state (python, numpy, torch; a cached gaussian included) loads with
    weights_only=True, and a resume draws exactly the numbers the saved run would have drawn."""
    random.gauss(0, 1)
    np.random.randn()  # both now hold a cached second gaussian, part of their state
    directory = str(tmp_path / "step_000003")
    model, opt = _checkpoint(directory)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    ckpt.load_checkpoint(directory, model, opt)
    assert (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def _rewrite_header(path, edit):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data[8 + n:])


def _first_matrix(header):
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)


def _transpose(h):
    k = _first_matrix(h)
    h[k]["shape"] = h[k]["shape"][::-1]


def _as_int(h):
    h[_first_matrix(h)]["dtype"] = "I32"  # same width: the offsets stay valid


def _grow(h):
    h[_first_matrix(h)]["shape"][0] *= 2  # the offsets no longer cover it


def _rename(h):
    k = _first_matrix(h)
    h["evil." + k] = h.pop(k)


def _swap_data(h):
    """A valid header: two tensors of one shape and dtype trade their data (only the fingerprint can tell)."""
    by_shape = {}
    for k, v in h.items():
        if k != "__metadata__":
            by_shape.setdefault((v["dtype"], tuple(v["shape"])), []).append(k)
    a, b = next(names for names in by_shape.values() if len(names) > 1)[:2]
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


def _corrupt_json(path):
    with open(path, "r+b") as f:
        f.seek(9)
        f.write(b"#")


TAMPERED = {
    "corrupt header JSON": (None, "corrupt checkpoint weights .*invalid JSON in header"),
    "shape transposed": (_transpose, "tensor .* has shape .*, the config implies"),
    "dtype F32 -> I32": (_as_int, "tensor .* has dtype torch.int32, weights are floating point"),
    "shape beyond the data": (_grow, "corrupt checkpoint weights .*invalid shape, data type, or offset"),
    "tensor renamed": (_rename, "does not match its config: missing"),
    "two tensors' data swapped": (_swap_data, "weights fingerprint .* does not match the recorded"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_safetensors_header_is_refused_with_the_file_named(tmp_path, clean_model, case):
    """A dtype edit used to fail inside load_state_dict without naming the file."""
    folder = str(tmp_path / "model")
    shutil.copytree(clean_model, folder)
    w_path = os.path.join(folder, "model.safetensors")
    edit, match = TAMPERED[case]
    if edit is None:
        _corrupt_json(w_path)
    else:
        _rewrite_header(w_path, edit)
    with pytest.raises(ValueError, match=match) as e:
        PlasticTransformer.from_pretrained(folder)
    assert (folder if edit is _swap_data else w_path) in str(e.value), str(e.value)


def test_session_of_another_model_is_refused(tmp_path):
    """Also covered by tests/test_session.py::test_load_refuses_foreign_corrupt_truncated_and_unknown."""
    path = str(tmp_path / "s.safetensors")
    Session(_tiny(0)).save(path)
    with pytest.raises(ValueError, match="belongs to another model: fingerprint"):
        Session.load(_tiny(1), path)


# ----------------------------------------------------------------------------- everything at once
def _journal(path, body):
    with open(io.journal_path(path), "w") as f:
        json.dump(body, f)


def test_hostile_folder_changes_nothing_outside_it(tmp_path, clean_model):
    """Every trick above (and the lock-file and pointer-journal ones) applied to one folder from
    elsewhere, each refused; afterwards a sibling victim folder and the folder's parent are exactly
    as they were, and no marker of unpickled code exists."""
    parent = str(tmp_path)
    victim = _victim(parent)
    hostile = os.path.join(parent, "downloaded")
    model_dir = os.path.join(hostile, "model")
    marker = os.path.join(parent, "marker")
    before_parent = snapshot(parent, skip={hostile})
    before_victim = snapshot(victim)
    refused = []

    def fresh_model():
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(clean_model, model_dir)
        return os.path.join(model_dir, "config.json")

    def expect(what, call, match):
        with pytest.raises(ValueError, match=match) as e:
            call()
        refused.append((what, str(e.value)))

    load = lambda: PlasticTransformer.from_pretrained(model_dir)  # noqa: E731
    for trick in ("absolute", "dotdot", "symlink"):
        for where in ("moves", "discard", "parts"):
            cfg = fresh_model()
            entry = _entry(trick, victim, model_dir)
            body = {"moves": [], "discard": [], "parts": []}
            body[where] = [[entry, "x"]] if where == "moves" else [entry]
            _journal(cfg, body)
            expect(f"journal {where} {trick}", load, "commit journal .* entry")
    # A pointer journal (what a multi-file commit leaves beside its other files) whose primary is outside.
    cfg = fresh_model()
    _journal(os.path.join(model_dir, "model.safetensors"), {"primary": "../../victim", "id": "x"})
    _journal(cfg, {"moves": [], "parts": ["model.safetensors"], "id": "x"})
    expect("pointer journal primary ../", lambda: io.recover(os.path.join(model_dir, "model.safetensors")),
           "primary entry '../../victim'")
    # A journal that is a link to a journal elsewhere, or a FIFO (reading it would block forever).
    cfg = fresh_model()
    outside_journal = os.path.join(victim, "a.txt")
    os.symlink(outside_journal, io.journal_path(cfg))
    expect("journal is a symlink", load, "is not a regular file")
    cfg = fresh_model()
    os.mkfifo(io.journal_path(cfg))
    expect("journal is a FIFO", load, "is not a regular file")
    # A lock file planted as a link to a file outside: opened (and truncated, by a naive lock) it would change it.
    cfg = fresh_model()
    os.symlink(os.path.join(parent, "victim_file.txt"), io.lock_path(cfg))
    expect("lock file is a symlink", load, "lock file .* is a symbolic link")
    # A tampered safetensors header.
    fresh_model()
    _rewrite_header(os.path.join(model_dir, "model.safetensors"), _as_int)
    expect("safetensors dtype", load, "weights are floating point")
    # A checkpoint in the folder: pickled code in its RNG file, and a journal beside it.
    ckpt_root = os.path.join(hostile, "checkpoints")
    step = os.path.join(ckpt_root, "step_000003")
    model, opt = _checkpoint(step)
    torch.save({"python": _Marker(marker)}, os.path.join(step, "rng_state_0.pt"))
    expect("pickled RNG state", lambda: ckpt.load_checkpoint(step, model, opt), "refusing to load the RNG state")
    _journal(step, {"moves": [], "discard": ["../../victim"]})
    expect("checkpoint journal", lambda: ckpt.find_latest(ckpt_root), "discard entry '../../victim'")
    # A report in the folder whose journal points outside.
    report = os.path.join(hostile, "report", "fold.json")
    write_report({"fingerprint_before": "a", "fingerprint_after": "b", UNDO_KEY: {"param/w": torch.ones(2)}}, report)
    _journal(report, {"moves": [[os.path.join(victim, "a.txt"), "fold.json"]]})
    expect("report journal", lambda: load_report(report), "move entry .* is an absolute path")
    # A session store in the folder: a pointer journal leading outside, and a session of another model.
    store = SessionStore(os.path.join(hostile, "store"))
    store.save(Session(_tiny(0)), "alice")
    _journal(store.path("alice"), {"primary": "../../victim", "id": "x"})
    expect("session pointer journal", lambda: store.open(_tiny(0), "alice"), "primary entry '../../victim'")
    os.remove(io.journal_path(store.path("alice")))
    expect("session of another model", lambda: store.open(_tiny(1), "alice"), "belongs to another model")

    assert len(refused) == 19, refused
    assert not os.path.exists(marker)
    assert snapshot(victim) == before_victim
    assert snapshot(parent, skip={hostile}) == before_parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_finds_one_bad_entry_anywhere(dtype):
    """kernels.checks.all_finite (the commit's and the kernels' NaN/inf check; min and max in one pass)
    finds a single NaN, inf or -inf at any position of contiguous tensors and strided views of many sizes,
    and passes finite, empty and integer tensors."""
    from cl_arch.kernels.checks import all_finite

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 1000, 4097, 2048 * 256):
        x = torch.randn(n, generator=g).to(dtype)
        assert all_finite(x) and all_finite(x.view(-1, 1)[::2])
        for i in sorted({0, n // 2, n - 1}):
            for bad in (float("nan"), float("inf"), -float("inf")):
                y = x.clone()
                y[i] = bad
                assert not all_finite(y), (n, i, bad)
                assert not all_finite(y[i % 2::2]), (n, i, bad, "view")
    assert all_finite(torch.zeros(0, dtype=dtype)) and all_finite(torch.arange(5))
