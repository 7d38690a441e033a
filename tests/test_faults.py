"""Fault injection (issue 11): kill -9 a writer half-way, many times, and check what is on disk.

For every format the library writes (a session state, a ``save_pretrained`` folder, a
consolidation report with its undo weights, a pretraining checkpoint folder) a writer process
writes version A completely, says "ready", then rewrites the same path forever, alternating
versions B and A. The test sleeps a seeded random 5-200 ms, sends SIGKILL, waits until the
writer is gone and reads the path back. Every file found at a real name must be whole and
exactly version A or version B (tensors compared bitwise, through a digest of dtype, shape and
bytes); when all of a format's files are present and of one version, the library's own loader
must succeed and give exactly that version. Temporary files left beside the real names are
fine, but they must use hidden temp names (never a real name).

Starting a Python that imports torch takes about 2 s, so the writers are not started one by
one: a single helper process (started with ``subprocess.Popen``) imports everything and builds
both versions of each object once, then ``os.fork()``s one writer per kill on request. The
writer is a real, separate process and the SIGKILL comes from this (the test) process.

Random kills land wherever the writer happens to be, so a narrow window between two renames is
hit only sometimes. ``test_kill_before_final_rename`` therefore also kills each writer
deterministically (the writer SIGKILLs itself when it is about to move the last file of a new
version into place, i.e. after every earlier rename). The formats made of several files commit
under a journal (:mod:`cl_arch.io`); before checking, the test runs the library's ``recover`` on
the path, as every loader does, and every format must then hold one whole version.
"""
import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cl_arch.io import recover

pytestmark = pytest.mark.skipif(os.name != "posix" or not hasattr(os, "fork"),
                                reason="fault injection needs POSIX signals and os.fork")

CFG = dict(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, n_attn_heads=2, memories=[{"kind": "readout", "heads": 1}])
KILLS_PER_FORMAT = 15
DELAY_RANGE_S = (0.005, 0.200)

# Per format: the name written (file or folder, inside the format's folder) and the files that
# make up one version, relative to that folder.
LAYOUT = {
    "session": ("session.safetensors", ["session.safetensors"]),
    "pretrained": ("model", ["model/model.safetensors", "model/config.json"]),
    "report": ("report.json", ["report.undo.safetensors", "report.json"]),
    "checkpoint": ("step_000001", ["step_000001/model.safetensors", "step_000001/config.json",
                                   "step_000001/training_state.pt", "step_000001/rng_state_0.pt"]),
}
# Files written identically by both versions (so they cannot tell versions apart), but expected there.
SAME_IN_BOTH = {"pretrained": ["model/tokenizer_config.json"], "checkpoint": ["step_000001/tokenizer_config.json"]}
# The path whose os.replace completes a new version (the deterministic kill happens just before it).
FINAL_RENAME = {"session": "session.safetensors", "pretrained": "model/config.json",
                "report": "report.json", "checkpoint": "step_000001"}

# ----------------------------------------------------------------------------- the writer side
ZYGOTE = r'''
import json, os, random, signal, sys, time, traceback
import numpy as np
import torch
torch.set_num_threads(1)
from cl_arch import PlasticConfig, PlasticTransformer, Session
from cl_arch.consolidate import fold, write_report
from cl_arch.train import checkpoint as ckpt

CFG = json.loads(sys.argv[1])
WORK = sys.argv[2]
LAYOUT = json.loads(sys.argv[3])
FINAL = json.loads(sys.argv[4])


def tiny(seed):
    torch.manual_seed(seed)
    return PlasticTransformer(PlasticConfig(**CFG))


def session_with(model, seed):
    s = Session(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    s.P = [torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01 for p in s.P]
    s.baseline = 0.25 * seed
    return s


def setup_session():
    model = tiny(0)
    a, b = session_with(model, 1), session_with(model, 2)
    return a.save, b.save


def setup_pretrained():
    return tiny(1).save_pretrained, tiny(2).save_pretrained


def setup_report():
    reports = []
    for seed, ref in ((1, "ref_a"), (2, "ref_b")):
        model = tiny(0)
        reports.append(fold(model, session_with(model, seed),
                            out=os.path.join(WORK, "report", ref, "report.json")))
    a, b = reports
    return (lambda p: write_report(a, p)), (lambda p: write_report(b, p))


def setup_checkpoint():
    writers = []
    for seed in (1, 2):
        model = tiny(10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        g = torch.Generator().manual_seed(seed)
        for _ in range(seed):  # A: one step, B: two
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
            sched.step()
        training = {"step": seed, "data_position": 100 * seed, "elapsed": 1.5 * seed}

        def write(path, model=model, opt=opt, sched=sched, training=training, seed=seed):
            random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)  # the RNG file differs too
            ckpt.save_checkpoint(path, model, opt, sched, training)
        writers.append(write)
    return tuple(writers)


SETUPS = {"session": setup_session, "pretrained": setup_pretrained,
          "report": setup_report, "checkpoint": setup_checkpoint}
WRITERS, TIMES = {}, {}
for fmt, setup in SETUPS.items():
    WRITERS[fmt] = setup()
    name = LAYOUT[fmt][0]
    for ref, w in zip(("ref_a", "ref_b"), WRITERS[fmt]):
        os.makedirs(os.path.join(WORK, fmt, ref), exist_ok=True)
        w(os.path.join(WORK, fmt, ref, name))
    os.makedirs(os.path.join(WORK, fmt, "timing"), exist_ok=True)
    os.makedirs(os.path.join(WORK, fmt, "live"), exist_ok=True)
    t0 = time.perf_counter()
    for i in range(4):
        WRITERS[fmt][i % 2](os.path.join(WORK, fmt, "timing", name))
    TIMES[fmt] = round((time.perf_counter() - t0) / 4 * 1000, 2)
print("zygote " + json.dumps(TIMES), flush=True)


def child(fmt, mode):
    write_a, write_b = WRITERS[fmt]
    live = os.path.join(WORK, fmt, "live")
    target = os.path.join(live, LAYOUT[fmt][0])
    write_a(target)
    if mode == "before_final_rename":
        final = os.path.abspath(os.path.join(live, FINAL[fmt]))
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.abspath(os.fspath(dst)) == final:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    os.write(1, ("ready %d\n" % os.getpid()).encode())
    if mode == "before_final_rename":
        write_b(target)
        os._exit(4)  # not reached: the rename above kills the process
    parent, deadline = os.getppid(), time.monotonic() + 60
    while os.getppid() == parent and time.monotonic() < deadline:  # never outlive the test
        write_b(target)
        write_a(target)
    os._exit(3)


for line in sys.stdin:
    cmd = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            child(cmd["fmt"], cmd["mode"])
        except BaseException:
            os.write(1, ("error " + json.dumps(traceback.format_exc()) + "\n").encode())
        os._exit(2)
    _, status = os.waitpid(pid, 0)
    print("exit %d %d" % (pid, status), flush=True)
'''


class Zygote:
    """The helper process: builds the versions once, forks a writer per request."""

    def __init__(self, work):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.stderr_path = os.path.join(work, "zygote.stderr")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, json.dumps(CFG), work, json.dumps(LAYOUT), json.dumps(FINAL_RENAME)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.write_ms = json.loads(self.expect("zygote", timeout=60))
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self._stderr.close()
            raise

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().rstrip("\n"))
        self.lines.put("eof")

    def expect(self, word, timeout=30.0):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {word!r} from the writer within {timeout} s; stderr:\n{self.stderr()}")
        kind, _, rest = line.partition(" ")
        if kind == "error":
            raise AssertionError("writer failed:\n" + json.loads(rest))
        if kind != word:
            raise AssertionError(f"expected {word!r} from the writer, got {line!r}; stderr:\n{self.stderr()}")
        return rest

    def stderr(self):
        with open(self.stderr_path, "rb") as f:
            return f.read()[-4000:].decode(errors="replace")

    def run(self, fmt, mode, delay=None):
        """Fork a writer; for ``mode="loop"`` SIGKILL it after ``delay`` s. Returns after it is reaped."""
        self.proc.stdin.write((json.dumps({"fmt": fmt, "mode": mode}) + "\n").encode())
        self.proc.stdin.flush()
        pid = int(self.expect("ready"))
        try:
            if mode == "loop":
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
            rest = self.expect("exit")
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
        epid, status = map(int, rest.split())
        assert epid == pid
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"writer {pid} was not killed by SIGKILL (wait status {status})"

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


# ----------------------------------------------------------------------------- reading back
def _digest(obj, h=None):
    """sha256 over a canonical form: tensors by dtype, shape and bytes; dicts by sorted keys."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            if k == "undo_pair_id":  # a per-write nonce that ties a report to its undo file
                continue
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    elif hasattr(obj, "tobytes"):  # numpy arrays
        h.update(repr((str(obj.dtype), obj.shape)).encode() + obj.tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else h


def file_digest(path):
    """Digest of one file's content as its format parses it (raises on a truncated/corrupt file)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return _digest([f.metadata(), {k: f.get_tensor(k) for k in f.keys()}])
    if path.endswith(".json"):
        with open(path) as f:
            return _digest(json.load(f))
    if path.endswith(".pt"):
        return _digest(torch.load(path, map_location="cpu", weights_only=True))
    raise AssertionError(f"unknown file type {path}")


def tiny(seed):
    from cl_arch import PlasticConfig, PlasticTransformer
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PlasticTransformer(PlasticConfig(**CFG))


def public_digest(fmt, folder):
    """Load one version with the library's own public loader; digest what it gives back."""
    target = os.path.join(folder, LAYOUT[fmt][0])
    if fmt == "session":
        from cl_arch import Session
        s = Session.load(tiny(0), target)
        return _digest([s.P, s.baseline, s.episodes, s.rewards, s.reward_sum, s.rule, s.adapt,
                        s.replay_size, len(s.replay)])
    if fmt == "pretrained":
        from cl_arch import PlasticTransformer
        m = PlasticTransformer.from_pretrained(target)  # verifies the recorded fingerprint
        return _digest([m.fingerprint(), m.state_dict()])
    if fmt == "report":
        from cl_arch.consolidate import load_report
        return _digest(load_report(target))
    if fmt == "checkpoint":
        from cl_arch.train import checkpoint as ckpt
        model = tiny(99)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        saved_rng = ckpt.rng_state()
        try:
            training = ckpt.load_checkpoint(target, model, opt, sched, restore_rng=True)
            loaded_rng = ckpt.rng_state()
        finally:
            ckpt.set_rng_state(saved_rng)
        return _digest([model.state_dict(), opt.state_dict(), sched.state_dict(), training, loaded_rng])
    raise AssertionError(fmt)


class Refs:
    """Per-file and public digests of versions A and B (written completely before any kill)."""

    def __init__(self, work, fmt):
        self.fmt = fmt
        self.files = {}
        for v, ref in (("A", "ref_a"), ("B", "ref_b")):
            folder = os.path.join(work, fmt, ref)
            for rel in LAYOUT[fmt][1]:
                p = os.path.join(folder, rel)
                self.files.setdefault(rel, {})[file_digest(p)] = (v, os.path.getsize(p))
        self.public = {public_digest(fmt, os.path.join(work, fmt, r)): v for v, r in (("A", "ref_a"), ("B", "ref_b"))}
        assert len(self.public) == 2, f"{fmt}: versions A and B must differ"
        for rel, d in self.files.items():
            assert len(d) == 2, f"{fmt}: {rel} is the same in versions A and B"


def loader_outcome(work, fmt, refs):
    """What the public loader makes of the live folder: 'loads as A/B', 'loads a mix', or the exception."""
    try:
        got = public_digest(fmt, os.path.join(work, fmt, "live"))
    except Exception as e:
        return f"raises {type(e).__name__}: {str(e)[:160]}"
    return f"loads as {refs.public[got]}" if got in refs.public else "loads without error, but neither A nor B"


def inspect(work, fmt, refs):
    """Check the live folder after a kill. Returns (version or None, files checked, problem or None,
    leftover temp names). Raises AssertionError on a corrupt file, a file of neither version, a
    loader failure on a complete version, or a stray non-temp name."""
    live = os.path.join(work, fmt, "live")
    # What any reader does first (from_pretrained, load_report, load_checkpoint, find_latest): finish
    # a journaled commit the kill interrupted. A no-op when there is none.
    recover(os.path.join(live, FINAL_RENAME[fmt]))
    versions, missing, checked = {}, [], 0
    for rel in LAYOUT[fmt][1]:
        p = os.path.join(live, rel)
        if not os.path.exists(p):
            missing.append(rel)
            continue
        try:
            d = file_digest(p)
        except Exception as e:
            sizes = [s for _, s in refs.files[rel].values()]
            lost = min(abs(s - os.path.getsize(p)) for s in sizes)
            raise AssertionError(f"{fmt}: {rel} is corrupt after a kill ({lost} bytes off): {e!r}") from e
        assert d in refs.files[rel], f"{fmt}: {rel} after a kill is neither version A nor version B"
        versions[rel] = refs.files[rel][d][0]
        checked += 1
    expected = {os.path.normpath(r) for r in LAYOUT[fmt][1]} | {os.path.dirname(r) for r in LAYOUT[fmt][1]}
    expected |= {os.path.normpath(r) for r in SAME_IN_BOTH.get(fmt, [])}
    leftovers = []
    for root, dirs, files in os.walk(live):
        for n in dirs + files:
            rel = os.path.normpath(os.path.relpath(os.path.join(root, n), live))
            if rel in expected:
                continue
            # Anything else must be a hidden temp name (".x.tmp", ".x.bak", ".tmp-step_...") or inside one.
            assert any(part.startswith(".") for part in rel.split(os.sep)), \
                f"{fmt}: unexpected non-temp name {rel!r} in {live}"
            leftovers.append(rel)
    if missing:
        return None, checked, f"missing {missing}", leftovers
    if len(set(versions.values())) > 1:
        return None, checked, f"mixed versions {versions}", leftovers
    version = next(iter(versions.values()))
    got = public_digest(fmt, live)  # must load, and be exactly that version
    assert refs.public.get(got) == version, \
        f"{fmt}: files are whole version {version} but the loader gives {refs.public.get(got, 'something else')}"
    return version, checked, None, leftovers


# ----------------------------------------------------------------------------- tests
FORMATS = list(LAYOUT)
SUMMARY = {}


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("faults"))
    z = Zygote(work)
    z.work = work
    z.refs = {fmt: Refs(work, fmt) for fmt in FORMATS}
    yield z
    z.close()
    if SUMMARY:
        tot = {k: sum(s[k] for s in SUMMARY.values()) for k in ("kills", "files_checked", "bytes_lost")}
        print(f"\n[faults] total: kills={tot['kills']} files_checked={tot['files_checked']} "
              f"bytes_lost={tot['bytes_lost']}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_kills(zygote, fmt):
    """SIGKILL the writer at seeded random moments: every file is whole version A or B, and a
    complete single-version set loads through the public loader as exactly that version."""
    rng = random.Random(1100 + FORMATS.index(fmt))
    counts = {"A": 0, "B": 0}
    problems, checked, leftovers_max = [], 0, 0
    for i in range(KILLS_PER_FORMAT):
        zygote.run(fmt, "loop", delay=rng.uniform(*DELAY_RANGE_S))
        version, n, problem, leftovers = inspect(zygote.work, fmt, zygote.refs[fmt])
        checked += n
        leftovers_max = max(leftovers_max, len(leftovers))
        if problem is None:
            counts[version] += 1
        else:
            problems.append(f"kill {i}: {problem}; loader {loader_outcome(zygote.work, fmt, zygote.refs[fmt])}")
    # bytes_lost is 0 by construction: inspect() raises on any truncated or corrupt file.
    SUMMARY[fmt] = {"kills": KILLS_PER_FORMAT, "files_checked": checked, "bytes_lost": 0}
    print(f"\n[faults] {fmt}: kills={KILLS_PER_FORMAT} files_checked={checked} whole_A={counts['A']} "
          f"whole_B={counts['B']} inconsistent_sets={len(problems)} bytes_lost=0 "
          f"max_temp_leftovers={leftovers_max} write_ms={zygote.write_ms[fmt]}")
    for p in problems:
        print(f"[faults] {fmt}: {p}")
    assert not problems, problems


# After a kill just before the rename that completes version B: a single file keeps A (the rename
# is the commit); a journaled multi-file commit has passed its commit point, so recovery gives B.
AFTER_FINAL_KILL = {"session": "A", "pretrained": "B", "report": "B", "checkpoint": "B"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_before_final_rename(zygote, fmt):
    """The writer SIGKILLs itself just before the rename that completes version B (after every
    other rename of that save): the path must hold one complete, loadable version."""
    zygote.run(fmt, "before_final_rename")
    version, n, problem, leftovers = inspect(zygote.work, fmt, zygote.refs[fmt])
    print(f"\n[faults] {fmt} killed before final rename: files_checked={n} version={version} "
          f"problem={problem} loader={loader_outcome(zygote.work, fmt, zygote.refs[fmt])} "
          f"temp_leftovers={len(leftovers)}")
    assert problem is None, f"{fmt}: {problem}"
    assert version == AFTER_FINAL_KILL[fmt]
