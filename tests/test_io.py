"""Journaled multi-file commits (cl_arch.io): every interruption point gives the old or the new
version whole; an error (not a crash) puts the old files back."""
import json
import os

import pytest

from cl_arch import io


def _writer(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


def _read(folder, names):
    return [open(os.path.join(folder, n)).read() if os.path.exists(os.path.join(folder, n)) else None
            for n in names]


@pytest.mark.parametrize("crash_after", [0, 1])
def test_commit_interrupted_after_any_move_is_finished_by_recover(tmp_path, monkeypatch, crash_after):
    """commit_moves has no error handler of its own, so an exception raised inside os.replace
    leaves the disk as a SIGKILL at that moment would (journal written, some moves done)."""
    names = ["weights.bin", "config.json"]
    paths = [str(tmp_path / n) for n in names]
    io.atomic_write_many([(p, _writer("old " + n)) for p, n in zip(paths, names)])
    staged = []
    for p, n in zip(paths, names):
        tmp = str(tmp_path / f".{n}.tmp")
        _writer("new " + n)(tmp)
        staged.append((tmp, p))

    class Crash(BaseException):
        pass

    real, calls = os.replace, {"n": 0}

    def replace(src, dst):
        if str(dst) in paths:  # not the journal's own atomic write
            if calls["n"] == crash_after:
                raise Crash
            calls["n"] += 1
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        io.commit_moves(paths[-1], staged)
    monkeypatch.setattr(os, "replace", real)
    assert _read(tmp_path, names) == (["old " + n for n in names] if crash_after == 0
                                      else ["new weights.bin", "old config.json"])  # the mixed state
    assert io.recover(paths[-1]) is True
    assert _read(tmp_path, names) == ["new " + n for n in names]
    assert io.recover(paths[-1]) is False
    assert sorted(os.listdir(tmp_path)) == sorted(names)


def test_error_during_the_moves_restores_the_old_files(tmp_path, monkeypatch):
    names = ["a.bin", "b.json"]
    paths = [str(tmp_path / n) for n in names]
    io.atomic_write_many([(p, _writer("old " + n)) for p, n in zip(paths, names)])
    real = os.replace

    def replace(src, dst):
        if os.path.basename(str(dst)) == "b.json":
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_many([(p, _writer("new " + n)) for p, n in zip(paths, names)])
    monkeypatch.setattr(os, "replace", real)
    assert _read(tmp_path, names) == ["old " + n for n in names]
    assert sorted(os.listdir(tmp_path)) == sorted(names)


def test_error_while_writing_touches_nothing(tmp_path):
    p = str(tmp_path / "x.json")
    io.atomic_write_many([(p, _writer("old"))])

    def bad(tmp):
        raise RuntimeError("serialiser failed")

    with pytest.raises(RuntimeError, match="serialiser"):
        io.atomic_write_many([(str(tmp_path / "y.bin"), _writer("new")), (p, bad)])
    assert sorted(os.listdir(tmp_path)) == ["x.json"] and _read(tmp_path, ["x.json"]) == ["old"]


def test_folder_replacement_interrupted_between_the_two_renames(tmp_path):
    old, new, aside = tmp_path / "step_1", tmp_path / ".tmp-step_1", tmp_path / ".old-step_1"
    for d, text in ((old, "A"), (new, "B")):
        d.mkdir()
        (d / "f").write_text(text)
    # the journal is written and the old folder moved aside; the crash comes before the new one moves in
    io.write_json(io.journal_path(str(old)), {"moves": [["step_1", ".old-step_1"], [".tmp-step_1", "step_1"]],
                                             "discard": [".old-step_1"]})
    os.replace(old, aside)
    assert io.recover(str(old))
    assert (old / "f").read_text() == "B" and not aside.exists() and not new.exists()


def test_corrupt_journal_is_named(tmp_path):
    p = str(tmp_path / "config.json")
    with open(io.journal_path(p), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="unreadable commit journal"):
        io.recover(p)
    with open(io.journal_path(p), "w") as f:
        json.dump({"moves": 3}, f)
    with pytest.raises(ValueError, match="unreadable commit journal"):
        io.recover(p)
