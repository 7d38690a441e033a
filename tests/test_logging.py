"""Library output goes through ``logging`` (issue 23): ``logging.getLogger("cl_arch").setLevel(logging.WARNING)``
silences a run's progress lines, and ``cl-arch`` still prints them as it always did."""
import logging
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_k_dim=16", "model.head_v_dim=16",
        "model.n_attn_heads=2", "model.chunk_size=16", "data.val_fraction=0.2", "train.max_minutes=null",
        "train.eval_every=0", "train.val_blocks=4", "train.log_with=none", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_corpus):
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), 20, 2000, 20000)


def pretrain_cli(corpus, out):
    from cl_arch.scripts.cli import main

    argv = ["pretrain", "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--seq-len", "32",
            "--sources", corpus, "--no-progress"]
    for s in TINY:
        argv += ["--set", s]
    return main(argv)


def test_the_cli_prints_the_library_progress_lines(corpus, tmp_path, capsys):
    assert pretrain_cli(corpus, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "pretrain: " in out and "M parameters" in out  # the run's opening line
    assert "pretrain: 2 steps" in out and "final validation" in out  # and its closing line
    lib = logging.getLogger("cl_arch")
    assert lib.level == logging.NOTSET and not lib.handlers  # the command's handler is gone afterwards


def test_a_warning_level_silences_the_library(corpus, tmp_path, capsys, caplog):
    lib = logging.getLogger("cl_arch")
    caplog.set_level(logging.INFO)
    lib.setLevel(logging.WARNING)
    try:
        assert pretrain_cli(corpus, tmp_path / "run") == 0
    finally:
        lib.setLevel(logging.NOTSET)
    assert "pretrain" not in capsys.readouterr().out
    assert not [r for r in caplog.records if r.name.startswith("cl_arch")]
    assert (tmp_path / "run" / "results.json").exists()  # it ran, silently


def test_finishing_an_interrupted_write_is_a_warning(tmp_path, monkeypatch, caplog):
    """cl_arch.io logs a warning when it completes a commit a crash interrupted (a reader learns the
    files changed under it); nothing when there was none."""
    from cl_arch import io

    paths = [str(tmp_path / n) for n in ("a.bin", "b.json")]
    staged = []
    for p in paths:
        with open(p + ".new", "w") as f:
            f.write("new")
        staged.append((p + ".new", p))
    real = os.replace

    class Crash(BaseException):
        pass

    def replace(src, dst):
        if str(dst) == paths[1]:  # after the journal and the first move: a crash mid-commit
            raise Crash
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        io.commit_moves(paths[-1], staged)
    monkeypatch.setattr(os, "replace", real)
    caplog.set_level(logging.WARNING, logger="cl_arch")
    assert io.recover(paths[-1]) is True
    assert [r.levelno for r in caplog.records if r.name == "cl_arch.io"] == [logging.WARNING]
    assert "interrupted" in caplog.records[-1].getMessage()
    caplog.clear()
    assert io.recover(paths[-1]) is False and not caplog.records
