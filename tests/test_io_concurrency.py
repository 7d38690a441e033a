"""Concurrent readers and writers of one path (issue 22, items 3, 8 and 11): they serialise
through an OS file lock, a reader never finishes a live writer's commit, a stale journal never
replays over a newer file, and written files keep the umask's (or the replaced file's) mode.

- 4 processes resume together (``find_latest`` then ``load_checkpoint``) from a checkpoint folder
  whose replacement was interrupted at the commit point (journal written; no move, or only the
  old folder moved aside). Every process must load the new checkpoint, whole, with no error.
  Before the lock, 3 of 4 processes died with FileNotFoundError: each ran the dead writer's
  renames at once.
- One process loops ``write_report`` while another loops ``load_report`` on the same path for
  10 s: no write or load may fail, and no load may return the JSON of one write with the undo
  weights of another (each write carries a distinct sequence number in both files).

The figures are printed (``pytest -s``) and asserted; docs/security.md quotes them. Before the
lock (measured with these tests on the previous io.py): 116 of 160 loads failed in the resume
test; in 10 s, 134 of 290 writes and 221 of 5058 loads raised and 43 loads returned a mixed pair.
"""
import errno
import hashlib
import multiprocessing as mp
import os
import shutil
import stat
import time

import pytest
import torch

from cl_arch import PlasticConfig, PlasticTransformer, ReadoutConfig, Session, SessionStore
from cl_arch import io
from cl_arch.consolidate.report import UNDO_KEY, load_report, write_report
from cl_arch.session.files import _bytes_writer
from cl_arch.train import checkpoint as ckpt

CFG = dict(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, n_attn_heads=2, memories=[ReadoutConfig(heads=1)])
RANKS = 4
TRIALS = 40
REPORT_SECONDS = 10.0

pytestmark = pytest.mark.skipif(os.name != "posix", reason="multi-process lock tests run on POSIX")


def _ctx():
    # fork: the workers inherit the imported library (spawning 4 interpreters that import torch
    # costs more than the whole test); torch work in them is tiny and single-threaded.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _tiny(seed):
    torch.manual_seed(seed)
    return PlasticTransformer(PlasticConfig(**CFG))


def _digest(model):
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _save(directory, seed, step):
    model = _tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    ckpt.save_checkpoint(directory, model, opt, sched, {"step": step})
    return _digest(model)


class _Crash(BaseException):
    """Stands for a kill: raised inside a rename, it leaves the disk as SIGKILL there would."""


def _interrupted_replacement(root, old_src, new_src, moves_done, monkeypatch):
    """``root/step_000001`` being replaced by ``new_src``'s content, stopped after the journal and
    ``moves_done`` of its two renames (the library's own commit, its rename made to fail)."""
    directory, tmp, old = (os.path.join(root, n) for n in ("step_000001", ".tmp-step_000001", ".old-step_000001"))
    shutil.copytree(old_src, directory)
    shutil.copytree(new_src, tmp)
    real, calls = os.replace, {"n": 0}

    def replace(src, dst):
        if os.fspath(dst) in (old, directory):  # the commit's renames, not the journal's own write
            if calls["n"] == moves_done:
                raise _Crash
            calls["n"] += 1
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with pytest.raises(_Crash):
            io.commit_moves(directory, [(directory, old), (tmp, directory)], discard=[old])
    finally:
        monkeypatch.setattr(os, "replace", real)
    assert os.path.exists(io.journal_path(directory))


def _resume_worker(rank, tasks, results, barrier):
    torch.set_num_threads(1)
    model = _tiny(99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    while True:
        root = tasks.get()
        if root is None:
            return
        barrier.wait()  # all ranks start together, as after a job restart
        try:
            latest = ckpt.find_latest(root)
            training = ckpt.load_checkpoint(latest, model, opt, rank=0)
            results.put((rank, "ok", os.path.basename(latest), training["step"], _digest(model)))
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            results.put((rank, "error", repr(e), None, None))


def test_ranks_resume_together_after_a_kill_at_the_commit_point(tmp_path, monkeypatch):
    """4 ranks, 40 trials, a replacement killed after its journal: 0 errors, every rank loads the
    new checkpoint whole."""
    src_a, src_b = str(tmp_path / "A" / "step_000001"), str(tmp_path / "B" / "step_000001")
    digest_a = _save(src_a, seed=1, step=1)
    digest_b = _save(src_b, seed=2, step=2)
    assert digest_a != digest_b
    ctx = _ctx()
    barrier = ctx.Barrier(RANKS)
    tasks = [ctx.Queue() for _ in range(RANKS)]
    results = ctx.Queue()
    workers = [ctx.Process(target=_resume_worker, args=(r, tasks[r], results, barrier), daemon=True)
               for r in range(RANKS)]
    for w in workers:
        w.start()
    errors, wrong, samples = 0, 0, []
    t0 = time.perf_counter()
    try:
        for trial in range(TRIALS):
            root = str(tmp_path / f"trial_{trial}" / "checkpoints")
            os.makedirs(root)
            _interrupted_replacement(root, src_a, src_b, moves_done=trial % 2, monkeypatch=monkeypatch)
            for q in tasks:
                q.put(root)
            got = [results.get(timeout=60) for _ in range(RANKS)]
            for rank, status, name, step, digest in got:
                if status == "error":
                    errors += 1
                    samples.append(f"trial {trial} rank {rank}: {name}")
                elif (name, step, digest) != ("step_000001", 2, digest_b):
                    wrong += 1
                    samples.append(f"trial {trial} rank {rank}: loaded {name} step {step} digest {digest}")
            left = sorted(os.listdir(root))
            assert [n for n in left if not n.endswith(".lock")] == ["step_000001"], left
    finally:
        for q in tasks:
            q.put(None)
        for w in workers:
            w.join(timeout=30)
    print(f"\n4 ranks resuming after a kill at the commit point: {TRIALS} trials, {TRIALS * RANKS} loads, "
          f"{errors} errors, {wrong} loads of another version ({time.perf_counter() - t0:.1f} s)")
    assert errors == 0 and wrong == 0, samples[:8]


def _report(seq):
    # The sequence number is in the JSON and in every undo tensor: a load that mixes two writes shows it.
    return {"method": "test", "fingerprint_before": f"before-{seq}", "fingerprint_after": f"after-{seq}",
            "params_replaced": ["w"], "seq": seq, "undo_file": None,
            UNDO_KEY: {"param/w": torch.full((64, 64), float(seq)), "param/b": torch.full((8,), float(seq))}}


def _writer(path, deadline, out):
    torch.set_num_threads(1)
    writes, errors, samples, seq = 0, 0, [], 1
    while time.time() < deadline:
        seq += 1
        try:
            write_report(_report(seq), path)
            writes += 1
        except Exception as e:  # noqa: BLE001
            errors += 1
            samples.append(repr(e))
    out.put(("writer", writes, errors, 0, samples[:5]))


def _reader(path, deadline, out):
    torch.set_num_threads(1)
    loads, errors, mixed, samples = 0, 0, 0, []
    while time.time() < deadline:
        try:
            r = load_report(path)
        except Exception as e:  # noqa: BLE001
            errors += 1
            samples.append(repr(e))
            continue
        loads += 1
        seqs = {float(r["seq"])} | {float(v) for t in r[UNDO_KEY].values() for v in t.unique()}
        if len(seqs) != 1 or r["fingerprint_before"] != f"before-{r['seq']}":
            mixed += 1
            samples.append(f"mixed pair: json seq {r['seq']}, undo values {sorted(seqs)}")
    out.put(("reader", loads, errors, mixed, samples[:5]))


def test_report_writer_and_reader_of_one_path(tmp_path):
    """A writer and a reader of one report for 10 s: 0 errors, 0 mixed pairs."""
    path = str(tmp_path / "report.json")
    write_report(_report(1), path)
    ctx = _ctx()
    out = ctx.Queue()
    deadline = time.time() + REPORT_SECONDS
    procs = [ctx.Process(target=f, args=(path, deadline, out), daemon=True) for f in (_writer, _reader)]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        role, count, errors, mixed, samples = out.get(timeout=REPORT_SECONDS + 60)
        got[role] = (count, errors, mixed, samples)
    for p in procs:
        p.join(timeout=30)
    (writes, write_errors, _, write_samples), (loads, load_errors, mixed, load_samples) = got["writer"], got["reader"]
    print(f"\nreport writer and reader for {REPORT_SECONDS:.0f} s: {writes} writes ({write_errors} errors), "
          f"{loads} loads ({load_errors} errors), {mixed} mixed pairs")
    assert writes > 20 and loads > 20, got  # both really ran side by side
    assert write_errors == 0 and load_errors == 0 and mixed == 0, (write_samples, load_samples)
    final = load_report(path)
    assert final["seq"] >= writes  # the last write is the one on disk


# ----------------------------------------------------------------------------- stale journals of sessions
def _session(model, baseline):
    s = Session(model, seed=0)
    s.baseline = baseline  # tells the versions apart
    return s


def _killed_multi_write(writes):
    """``io.atomic_write_many(writes)`` in a child process killed (``os._exit``) at its first rename
    into place: the journal and its pointers are written, no file is replaced yet. ``undo`` writes
    session files this way."""
    targets = {os.path.abspath(p) for p, _ in writes}
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        real = os.replace

        def replace(src, dst):
            if os.path.abspath(os.fspath(dst)) in targets:
                os._exit(17)
            return real(src, dst)

        os.replace = replace
        try:
            io.atomic_write_many(writes)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 17


def _baseline(model, store, uid):
    return store.open(model, uid).baseline


def test_session_store_finishes_an_interrupted_undo_write_before_reading(tmp_path):
    """Issue 22, item 11: SessionStore.open reads the version an undo killed after its commit point
    left (before: the older one, with the journal still waiting to replay later)."""
    model = _tiny(0)
    store = SessionStore(tmp_path / "store")
    store.save(_session(model, 1.0), "alice")
    store.save(_session(model, 2.0), "bob")
    _killed_multi_write([(store.path(u), _bytes_writer(_session(model, b).to_bytes()))
                         for u, b in (("alice", 11.0), ("bob", 12.0))])
    # alice's file is not the one the journal is named after: her pointer journal leads to it.
    assert _baseline(model, store, "alice") == 11.0
    assert _baseline(model, store, "bob") == 12.0
    assert sorted(os.listdir(store.root)) == ["alice.session.safetensors", "bob.session.safetensors"]


@pytest.mark.parametrize("layout", ["one folder", "two folders"])
def test_stale_journal_never_replays_over_a_newer_session_file(tmp_path, layout):
    """Issue 22, item 11: after an undo write killed at its commit point, a newer session saved
    to the same files stays, whatever later recovers (before: the stale journal moved the undo's
    content over it)."""
    model = _tiny(0)
    folders = [tmp_path / "a", tmp_path / "a"] if layout == "one folder" else [tmp_path / "a", tmp_path / "b"]
    paths = [str(f / n) for f, n in zip(folders, ("alice.safetensors", "bob.safetensors"))]
    for f in folders:
        f.mkdir(exist_ok=True)
    for p, b in zip(paths, (1.0, 2.0)):
        _session(model, b).save(p)
    _killed_multi_write([(p, _bytes_writer(_session(model, b).to_bytes())) for p, b in zip(paths, (11.0, 12.0))])
    for p, b in zip(paths, (21.0, 22.0)):
        _session(model, b).save(p)  # the user goes on and saves newer sessions
    for p in paths:  # what every later reader and writer does first
        io.recover(p)
    assert [Session.load(model, p).baseline for p in paths] == [21.0, 22.0]
    left = sorted(n for f in set(folders) for n in os.listdir(f) if n.startswith("."))
    # No journal is left to replay. (Across folders a kill leaves hidden temp files and backups,
    # as a kill while staging does: the commit of each folder is its own.)
    assert [n for n in left if not n.endswith((".tmp", ".bak"))] == [], left
    if layout == "one folder":
        assert left == [], left


def test_session_load_finishes_an_interrupted_undo_write_before_reading(tmp_path):
    model = _tiny(0)
    paths = [str(tmp_path / "alice.safetensors"), str(tmp_path / "bob.safetensors")]
    for p, b in zip(paths, (1.0, 2.0)):
        _session(model, b).save(p)
    _killed_multi_write([(p, _bytes_writer(_session(model, b).to_bytes())) for p, b in zip(paths, (11.0, 12.0))])
    assert Session.load(model, paths[0]).baseline == 11.0


def test_read_only_folder_is_read_without_lock_or_recovery(tmp_path, monkeypatch):
    """Where the lock file cannot be created (a read-only folder, e.g. an installed model), loading
    proceeds without a lock and leaves any journal alone (nobody can write there)."""
    model = _tiny(0)
    folder = str(tmp_path / "model")
    model.save_pretrained(folder)
    cfg = os.path.join(folder, "config.json")
    io.write_json(io.journal_path(cfg), {"moves": [[".never-written.tmp", "config.json"]], "discard": []})
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert _digest(PlasticTransformer.from_pretrained(folder)) == _digest(model)
    assert io.recover(cfg) is False and os.path.exists(io.journal_path(cfg))


def test_lock_files_are_removed_by_their_last_holder(tmp_path):
    model = _tiny(0)
    model.save_pretrained(tmp_path / "m")
    PlasticTransformer.from_pretrained(tmp_path / "m")
    write_report(_report(1), str(tmp_path / "r" / "report.json"))
    load_report(str(tmp_path / "r" / "report.json"))
    hidden = sorted(n for _, _, files in os.walk(tmp_path) for n in files if n.startswith("."))
    assert hidden == []


# ----------------------------------------------------------------------------- file modes
def test_written_files_keep_the_umask_or_the_replaced_files_mode(tmp_path):
    """Issue 22, item 8: before, every written file ended up 0600 (mkstemp's mode)."""
    old_umask = os.umask(0o022)
    try:
        one, many = str(tmp_path / "one.json"), [str(tmp_path / "a.bin"), str(tmp_path / "b.json")]
        io.write_json(one, {"v": 1})
        io.atomic_write_many([(p, io.text_writer("v1")) for p in many])
        model_dir = tmp_path / "model"
        _tiny(0).save_pretrained(model_dir)
        session = str(tmp_path / "s.safetensors")
        _session(_tiny(0), 1.0).save(session)
        new_files = [one, *many, session] + [str(model_dir / n) for n in ("config.json", "model.safetensors")]
        assert {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in new_files} == {p: "0o644" for p in new_files}

        for p in [one, *many, session]:
            os.chmod(p, 0o640)
        io.write_json(one, {"v": 2})
        io.atomic_write_many([(p, io.text_writer("v2")) for p in many])
        _session(_tiny(0), 2.0).save(session)
        modes = {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in [one, *many, session]}
        assert modes == {p: "0o640" for p in [one, *many, session]}
        assert open(many[0]).read() == "v2"
    finally:
        os.umask(old_umask)
