"""The command line as a user meets it (issue 22): a user error is one line on stderr,
``cl-arch <sub>: error: ...``, exit status 2, no traceback and no file created or changed;
``adapt`` takes rewards only as ``/`` commands; ``--model`` defaults to the shipped model; an
output that is an input is refused; kept sessions never overwrite each other; the default
consolidation anchor is the training corpus, never the held-out evaluation packages.

Every command runs in-process through ``cl_arch.scripts.cli.main`` on a 2-layer d=32 model.
"""
import hashlib
import io
import json
import os
import sys

import pytest
import torch

from cl_arch import PlasticConfig, PlasticTransformer, Session
from cl_arch.scripts import cli


def run_cli(capsys, argv, stdin=None, monkeypatch=None):
    """``cl-arch argv`` in-process -> (exit status, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse and config errors exit as argparse does
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root):
    """Every file under ``root`` with its content hash and mode, and every folder (not their
    mtimes: probing a folder for writability creates and removes a file there)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                snap[os.path.relpath(p, root)] = ("link", os.readlink(p))
                continue
            with open(p, "rb") as fh:
                snap[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mode)
    return snap


def assert_user_error(result, sub, contains=None):
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"cl-arch {sub}: error: "), err
    assert "Traceback" not in err
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working folder: a tiny model ``m/``, a folder that is no model, a file that is no session
    or config, a small corpus; the current folder is the workspace (relative paths as a user types)."""
    torch.manual_seed(0)
    PlasticTransformer(PlasticConfig(d_model=32, n_layers=2)).save_pretrained(tmp_path / "m")
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "notes.txt").write_text("not a model\n")
    (tmp_path / "junk.bin").write_bytes(b"junk")
    (tmp_path / "corpus.py").write_text("def f(x):\n    return x + 1\n" * 200)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def rewarded_session(model, prompt: bytes, seed: int) -> Session:
    s = Session(model, seed=seed)
    s.generate(prompt, max_new_tokens=4)
    s.reward(1.0)
    return s


# ---------------------------------------------------------------------- bad paths, every sub-command
BAD = {
    "adapt": [
        (["--model", "missing", "--session", "s.safetensors"], "missing"),
        (["--model", "notmodel", "--session", "s.safetensors"], "notmodel"),
        (["--model", "junk.bin", "--session", "s.safetensors"], "junk.bin"),
        (["--model", "m", "--session", "no/such/dir/s.safetensors"], "no/such/dir"),
        (["--model", "m", "--session", "notmodel"], "notmodel"),
        (["--model", "m", "--session", "junk.bin"], "junk.bin"),
        (["--model", "m", "--session", "m/model.safetensors"], "m/model.safetensors"),
    ],
    "consolidate": [
        (["--model", "missing", "--sessions", "s.safetensors", "--out", "out"], "missing"),
        (["--model", "notmodel", "--sessions", "s.safetensors", "--out", "out"], "notmodel"),
        (["--model", "m", "--sessions", "no/such/dir/s.safetensors", "--out", "out"], "no/such/dir"),
        (["--model", "m", "--sessions", "junk.bin", "--out", "out"], "junk.bin"),
        (["--model", "m", "--sessions", "s.safetensors", "--out", "m"], "--in-place"),
        (["--model", "m", "--sessions", "s.safetensors", "--out", "./m/../m/"], "--in-place"),
        (["--model", "m", "--sessions", "s.safetensors", "--out", "link_to_m"], "--in-place"),
        (["--model", "m", "--sessions", "s.safetensors", "--out", "junk.bin"], "junk.bin"),
        (["--model", "m", "--undo", "missing.json", "--out", "out"], "missing.json"),
    ],
    "eval": [
        (["codebase", "--model", "missing", "--out", "out"], "missing"),
        (["codebase", "--model", "notmodel", "--out", "out"], "notmodel"),
        (["codebase", "--model", "m", "--out", "m"], "--in-place"),
        (["codebase", "--model", "m", "--out", "link_to_m"], "--in-place"),
        (["codebase", "--model", "m", "--out", "junk.bin"], "junk.bin"),
    ],
    "pretrain": [
        (["--init-from", "missing", "--sources", "corpus.py", "--output-dir", "out", "--max-steps", "1"], "missing"),
        (["--init-from", "notmodel", "--sources", "corpus.py", "--output-dir", "out", "--max-steps", "1"],
         "notmodel"),
        (["--config", "missing.yaml", "--output-dir", "out"], "missing.yaml"),
        (["--config", "junk.bin", "--output-dir", "out"], "junk.bin"),
        (["--init-from", "m", "--sources", "corpus.py", "--output-dir", "m", "--max-steps", "1"], "--in-place"),
        (["--init-from", "m/", "--sources", "corpus.py", "--output-dir", ".", "--max-steps", "1"], "--in-place"),
        (["--sources", "corpus.py", "--output-dir", "junk.bin", "--max-steps", "1"], "junk.bin"),
        (["--sources", "missing", "--output-dir", "out"], "missing"),
    ],
    "finetune": [
        (["--init-from", "missing", "--sources", "corpus.py", "--output-dir", "out", "--max-steps", "1"], "missing"),
        (["--init-from", "notmodel", "--sources", "corpus.py", "--output-dir", "out", "--max-steps", "1"],
         "notmodel"),
        (["--init-from", "m", "--sources", "corpus.py", "--output-dir", "m", "--max-steps", "1"], "--in-place"),
        (["--init-from", "m", "--sources", "corpus.py", "--output-dir", "junk.bin", "--max-steps", "1"],
         "junk.bin"),
        (["--sources", "corpus.py", "--output-dir", "out", "--max-steps", "1"], "needs a checkpoint"),
        (["--hf-model", "missing", "--output-dir", "out", "--max-steps", "1"], "missing"),
    ],
}


@pytest.mark.parametrize("sub,argv,contains", [(sub, argv, c) for sub, cases in BAD.items() for argv, c in cases],
                         ids=[f"{sub}:{' '.join(a)}" for sub, cases in BAD.items() for a, _ in cases])
def test_a_bad_path_is_one_line_exit_2_and_leaves_every_file_alone(ws, capsys, monkeypatch, sub, argv, contains):
    rewarded_session(PlasticTransformer.from_pretrained(ws / "m"), b"hello", 0).save(ws / "s.safetensors")
    os.symlink("m", ws / "link_to_m")
    before = snapshot(ws)
    res = run_cli(capsys, [sub, *argv], stdin="hello\n/reward 1\n", monkeypatch=monkeypatch)
    assert_user_error(res, sub, contains)
    assert res[1] == "" or sub != "adapt"  # adapt generated nothing
    assert snapshot(ws) == before


def test_debug_shows_the_traceback(ws, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing"):
        cli.main(["--debug", "adapt", "--model", "missing", "--session", "s.safetensors"])


def test_duplicate_sessions_are_refused(ws, capsys):
    rewarded_session(PlasticTransformer.from_pretrained(ws / "m"), b"hello", 0).save(ws / "s.safetensors")
    before = snapshot(ws)
    line = assert_user_error(run_cli(capsys, ["consolidate", "--model", "m", "--sessions", "s.safetensors",
                                              "./s.safetensors", "--out", "out"]), "consolidate")
    assert "same file" in line
    assert snapshot(ws) == before


def test_in_place_allows_output_equal_to_input(ws, capsys):
    model = PlasticTransformer.from_pretrained(ws / "m")
    rewarded_session(model, b"hello", 0).save(ws / "s.safetensors")
    code, _, err = run_cli(capsys, ["consolidate", "--model", "m", "--sessions", "s.safetensors", "--out", "m",
                                    "--in-place"])
    assert code == 0, err
    assert json.loads((ws / "m" / "report.json").read_text())["fingerprint_before"] == model.fingerprint()


# ---------------------------------------------------------------------- adapt
def adapt(capsys, monkeypatch, stdin, *extra):
    return run_cli(capsys, ["adapt", "--model", "m", "--session", "s.safetensors", "--max-new-tokens", "3",
                            "--seed", "0", *extra], stdin=stdin, monkeypatch=monkeypatch)


def test_adapt_a_number_or_plus_is_a_prompt_and_rewards_are_commands(ws, capsys, monkeypatch):
    code, out, err = adapt(capsys, monkeypatch, "1984\n/reward 1\n+\n/reward -\n//reward 5\n/reward 0.25\n")
    assert code == 0, err
    assert out.count("\n") >= 3  # three prompts, three completions
    s = Session.load(PlasticTransformer.from_pretrained(ws / "m"), ws / "s.safetensors")
    assert (s.episodes, s.rewards) == (3, 3) and s.reward_sum == pytest.approx(0.25)


def test_adapt_nan_reward_and_unknown_command_are_reported_and_exit_2(ws, capsys, monkeypatch):
    code, _, err = adapt(capsys, monkeypatch, "hello\n/reward nan\n/reward inf\n/frobnicate\n/reward 0.5\n")
    assert code == 2
    assert "cl-arch adapt: error: line 2: " in err and "finite" in err
    assert "cl-arch adapt: error: line 3: " in err and "cl-arch adapt: error: line 4: " in err
    assert "Traceback" not in err
    s = Session.load(PlasticTransformer.from_pretrained(ws / "m"), ws / "s.safetensors")
    assert (s.episodes, s.rewards, s.reward_sum) == (1, 1, 0.5)  # the loop went on after the bad lines


def test_adapt_saves_after_every_commit(ws, capsys, monkeypatch):
    """A crash after a commit loses nothing committed."""
    calls = []
    real = Session.generate

    def generate(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash")
        return real(self, *a, **k)

    monkeypatch.setattr(Session, "generate", generate)
    with pytest.raises(RuntimeError, match="crash"):  # a bug keeps its traceback
        adapt(capsys, monkeypatch, "first\n/reward 1\nsecond\n")
    s = Session.load(PlasticTransformer.from_pretrained(ws / "m"), ws / "s.safetensors")
    assert (s.episodes, s.rewards) == (1, 1)


def test_adapt_defaults_to_the_shipped_model(ws, capsys, monkeypatch):
    from cl_arch.eval.lib.models import default_model

    code, out, err = run_cli(capsys, ["adapt", "--session", "s.safetensors", "--max-new-tokens", "2", "--seed", "0"],
                             stdin="1984\n/reward 1\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert "shipped default model" in err and "shipped" not in out  # stdout holds completions only
    assert Session.load(default_model(log=lambda s: None), ws / "s.safetensors").rewards == 1


# ---------------------------------------------------------------------- consolidate
def test_consolidate_keeps_same_named_sessions_apart(ws, capsys):
    """alice/session.safetensors and bob/session.safetensors: each kept rest is its own user's P."""
    model = PlasticTransformer.from_pretrained(ws / "m")
    P = {}
    for i, who in enumerate(("alice", "bob")):
        (ws / who).mkdir()
        s = rewarded_session(model, f"hello from {who}".encode(), seed=i)
        # One episode's P on a random model lowers the anchor loss; 10x costs bits, so budget 0 binds.
        s.P = [10 * p for p in s.P]
        s.save(ws / who / "session.safetensors")
        P[who] = [p.clone() for p in s.P]
    assert not all(torch.equal(a, b) for a, b in zip(P["alice"], P["bob"]))
    torch.save({"input_ids": torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))},
               ws / "anchor.pt")
    code, out, err = run_cli(capsys, ["consolidate", "--model", "m", "--sessions", "alice/session.safetensors",
                                      "bob/session.safetensors", "--budget", "0", "--anchor", "anchor.pt",
                                      "--out", "out"])
    assert code == 0, err
    report = json.loads((ws / "out" / "report.json").read_text())
    c = report["fold_fraction"]
    assert c < 1.0  # the budget kept part of each P out of the weights
    new = PlasticTransformer.from_pretrained(ws / "out")
    for who in ("alice", "bob"):
        path = os.path.join("out", "sessions", who, "session.safetensors")
        assert path in report["sessions_kept"] and path in out  # said where each went
        kept = Session.load(new, ws / path)
        for p, p0 in zip(kept.P, P[who]):
            torch.testing.assert_close(p, (1 - c) * p0)


def test_consolidate_defaults_to_the_shipped_model(ws, capsys):
    from cl_arch.eval.lib.models import default_model

    model = default_model(log=lambda s: None)
    rewarded_session(model, b"def f(x):", 0).save(ws / "s.safetensors")
    code, _, err = run_cli(capsys, ["consolidate", "--sessions", "s.safetensors", "--out", "out"])
    assert code == 0, err
    assert json.loads((ws / "out" / "report.json").read_text())["fingerprint_before"] == model.fingerprint()


def test_consolidate_default_anchor_is_the_training_corpus(monkeypatch):
    """Distill and a guarded fold train or measure on the default anchor: it must be files the
    model was trained on, none from the held-out packages the benchmarks report (nor validation)."""
    from cl_arch.scripts import consolidate
    from cl_arch.train import data

    seen = []
    real = data.read_bytes

    def read_bytes(files, *a, **k):
        files = list(files)
        seen.extend(files)
        return real(files, *a, **k)

    monkeypatch.setattr(data, "read_bytes", read_bytes)
    model = PlasticTransformer(PlasticConfig(d_model=32, n_layers=2))
    args = type("Args", (), {"anchor_seqs": 4, "seq_len": 32, "seed": 0})()
    anchor = consolidate.default_anchor(model, args)
    assert anchor.shape == (4, 32) and seen
    read = {os.path.realpath(f) for f in seen}
    held_out = {os.path.realpath(f) for f in data.stdlib_files("held_out")}
    val = {os.path.realpath(f) for f in data.split_files(data.stdlib_files("train"))[1]}
    assert held_out and not read & held_out and not read & val
    root = data.stdlib_dir()
    tops = {os.path.relpath(f, root).split(os.sep)[0].removesuffix(".py") for f in read}
    assert not tops & set(data.HELD_OUT_STDLIB)


# ---------------------------------------------------------------------- eval
def test_eval_model_default_is_the_shipped_model():
    from cl_arch.eval.lib.models import default_model
    from cl_arch.scripts import eval as eval_cli

    model = eval_cli._model(type("Args", (), {"model": "default"})())
    assert model.fingerprint() == default_model(log=lambda s: None).fingerprint()


# ---------------------------------------------------------------------- review findings
def test_adapt_no_adapt_wins_over_the_session_file(ws, capsys, monkeypatch):
    """A session saved with adaptation on, resumed with --no-adapt (the frozen control): P must not move."""
    model = PlasticTransformer.from_pretrained(ws / "m")
    rewarded_session(model, b"def f(x):", seed=0).save(ws / "s.safetensors")
    before = [p.clone() for p in Session.load(model, ws / "s.safetensors").P]
    code, _, err = adapt(capsys, monkeypatch, "def g(y):\n/reward 1\n", "--no-adapt")
    assert code == 0, err
    after = Session.load(model, ws / "s.safetensors")
    assert after.rewards == 2 and all(torch.equal(a, b) for a, b in zip(after.P, before))


@pytest.mark.parametrize("argv,contains", [
    (["eval", "codebase", "--threads", "-1"], "--threads"),
    (["demo", "--threads", "0"], "--threads"),
    (["consolidate", "--model", "m", "--sessions", "s.safetensors", "--budget", "0.1", "--anchor", "corpus.py",
      "--anchor-seqs", "0", "--out", "o"], "--anchor-seqs"),
])
def test_counts_below_one_are_usage_errors(ws, capsys, monkeypatch, argv, contains):
    Session(PlasticTransformer.from_pretrained(ws / "m")).save(ws / "s.safetensors")
    before = snapshot(ws)
    code, _, err = run_cli(capsys, argv, monkeypatch=monkeypatch)
    last = err.strip().splitlines()[-1]  # argparse's usage lines, then its one error line
    assert code == 2 and "Traceback" not in err and last.startswith(f"cl-arch {argv[0]}") and contains in last, err
    assert snapshot(ws) == before


@pytest.mark.parametrize("undo_file", [5, "../outside.undo.safetensors", "/etc/passwd"])
def test_a_report_naming_an_undo_file_elsewhere_is_refused(ws, capsys, undo_file):
    (ws / "r.json").write_text(json.dumps({"fingerprint_before": "x", "undo_file": undo_file}))
    assert_user_error(run_cli(capsys, ["consolidate", "--model", "m", "--undo", "r.json", "--out", "u"]),
                      "consolidate", "undo_file must be a file name beside the report")
