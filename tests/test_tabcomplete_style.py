"""Tab completion as a reward task: the simulated users' style transforms, the reward mapping, the
yoked row's rewards and a tiny end-to-end run (eval/lib/user_style.py, eval/tabcomplete.py)."""
import ast
import glob
import os

import numpy as np
import pytest

from cl_arch.eval import tabcomplete as T
from cl_arch.eval.lib import user_style as U
from cl_arch.eval.lib.streams import held_out_package

SRC = b'''import os
from json import dumps as json_dumps

MAX_SIZE = 10


class Box:
    """A box.

    Holds things.
    """

    def __init__(self, item_count=0):
        self.item_count = item_count
        label = 'box'
        self.long_name = ('a', "b",
                          'it\\'s')

    def add_items(self, new_items):
        # a comment
        total_size = self.item_count + len(new_items)
        text = """keep
    this"""
        return json_dumps({'n': total_size}), f'{total_size}', text
'''


def json_files():
    return sorted(glob.glob(os.path.join(held_out_package("json"), "*.py")))


def strip_docstrings(tree):
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0].value.value = [line.strip() for line in body[0].value.value.splitlines()]
    return ast.dump(tree)


# ---------------------------------------------------------------------------- transforms
def test_style_parse_draw_and_validation():
    assert U.Style.parse("indent=2,naming=camel") == U.Style("2", "keep", "camel")
    assert U.Style().is_identity and U.apply_style(SRC, U.Style()) == SRC
    with pytest.raises(ValueError, match="indent"):
        U.Style(indent="3")
    with pytest.raises(ValueError, match="unknown"):
        U.Style.parse("colour=red")
    draws = [U.draw_style(s) for s in range(8)]
    assert draws == [U.draw_style(s) for s in range(8)]  # a pure function of the seed
    assert all(d.indent in ("2", "tab") for d in draws) and len(set(draws)) > 1


def test_snake_to_camel_examples():
    assert U.snake_to_camel("parse_float") == "parseFloat"
    assert U.snake_to_camel("_scan_once") == "_scanOnce"
    assert U.snake_to_camel("a__b_") == "aB_"
    for same in ("MAX_SIZE", "name", "__init__", "_", "Box"):
        assert U.snake_to_camel(same) == same


def test_quotes_examples_idempotent_and_swap_involution():
    text = SRC.decode()
    dbl = U.restyle_quotes(text, "double")
    assert "label = \"box\"" in dbl and "f\"{total_size}\"" in dbl and "'it\\'s'" in dbl  # a quote inside: kept
    assert '"""A box.' in dbl and 'text = """keep' in dbl  # triple quotes untouched
    assert U.restyle_quotes(dbl, "double") == dbl
    assert U.restyle_quotes(U.restyle_quotes(text, "swap"), "swap") == text
    assert "label = 'box'" in U.restyle_quotes(dbl, "single")


def test_names_examples_and_consistency():
    text = U.restyle_names(SRC.decode(), "camel")
    assert "def addItems(self, newItems):" in text and "self.itemCount = itemCount" in text
    assert "totalSize = self.itemCount + len(newItems)" in text
    assert "json_dumps" in text and "MAX_SIZE" in text and "__init__" in text  # imported, constant, dunder
    assert "# a comment" in text and U.restyle_names(text, "camel") == text  # idempotent


def test_indent_examples():
    two = U.restyle_indent(SRC.decode(), "2")
    assert "\n  def __init__(self, item_count=0):\n    self.item_count" in two
    assert "\n    self.long_name = ('a', \"b\",\n" + " " * 22 + "'it" in two  # still aligned under the bracket
    assert '\n  """A box.\n\n  Holds things.\n  """' in two  # docstring shifted with its statement
    assert 'text = """keep\n    this"""' in two  # another multi-line string: untouched
    tab = U.restyle_indent(SRC.decode(), "tab")
    assert "\n\tdef add_items(self, new_items):\n\t\t# a comment\n\t\ttotal_size" in tab


@pytest.mark.parametrize("style", [U.Style("2", "double", "camel"), U.Style("tab", "swap", "keep"),
                                   U.Style("tab", "single", "camel")])
def test_styled_stdlib_files_compile_to_the_same_program(style):
    """On real held-out files: the styled code compiles, and its AST equals the original's up to the
    renaming (names) and the docstrings' indentation."""
    for path in json_files():
        with open(path, "rb") as f:
            data = f.read()
        out = U.apply_style(data, style)
        assert U.apply_style(data, style) == out  # deterministic
        assert out != data
        compile(out, path, "exec")
        ref = U.restyle_names(data.decode(), style.naming)  # the renaming alone, as the reference
        assert strip_docstrings(ast.parse(out)) == strip_docstrings(ast.parse(ref))
        # the non-blank lines correspond one to one (every suggestion has a styled counterpart)
        assert len(out.splitlines()) == len(data.splitlines())


def test_untokenizable_bytes_pass_through():
    bad = b"def f(:\n  x = '\n"
    assert U.apply_style(bad, U.Style("2", "double", "camel")) == bad
    assert U.apply_style(b"\xff\xfe", U.Style("tab")) == b"\xff\xfe"


# ---------------------------------------------------------------------------- rewards
def test_accepts_and_reward_kinds():
    acc = np.array([0, 4, 11, 12, 30])
    # line of 30 bytes with 4 leading blanks: accepted from 4 + 8 = 12 bytes on
    assert T.accepts(acc, 30, 4, 8).tolist() == [False, False, False, True, True]
    assert T.accepts(np.array([5, 6]), 6, 0, 8).tolist() == [False, True]  # a short line: the whole of it
    assert T.suggestion_rewards(acc, 30, 4, "binary", 8).tolist() == [0, 0, 0, 1, 1]
    assert T.suggestion_rewards(acc, 30, 4, "signed", 8).tolist() == [-1, -1, -1, 1, 1]
    assert np.allclose(T.suggestion_rewards(acc, 30, 4, "fraction"), acc / 30)
    with pytest.raises(ValueError, match="reward kind"):
        T.suggestion_rewards(acc, 30, 4, "maybe")


def test_cluster_bootstrap_ci():
    d = np.r_[np.ones(10), np.zeros(10)]
    mean, (lo, hi) = T.cluster_bootstrap_ci(d, np.r_[np.zeros(10), np.ones(10)])
    assert mean == 0.5 and lo == 0.0 and hi == 1.0  # two clusters: all, none or half of the ones
    mean, (lo, hi) = T.cluster_bootstrap_ci(np.full(6, 0.25), np.arange(6))
    assert mean == lo == hi == 0.25


def test_user_segments_count_suggestions_and_keep_lines(tmp_path):
    p = tmp_path / "m.py"
    p.write_bytes(SRC)
    segs = T.user_segments([str(p)], U.Style("2"), None, suggestions=7, episode_bytes=120)
    text = b"".join(s for s, _ in segs)
    assert sum(1 for line in text.split(b"\n") if line.strip()) == 7
    assert U.apply_style(SRC, U.Style("2")).startswith(text) and all(len(s) <= 120 for s, _ in segs)
    assert segs[0][1] == 10 and all(prev == segs[i][0][-1] for i, (_, prev) in enumerate(segs[1:]))


# ---------------------------------------------------------------------------- end to end
@pytest.fixture()
def tiny_tree(tmp_path):
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "a.py").write_bytes(SRC)
    (d / "b.py").write_bytes(SRC.replace(b"Box", b"Crate").replace(b"item", b"thing"))
    return str(d)


def test_run_users_end_to_end_and_yoked_gets_the_partners_rewards(tiny_lm, tiny_tree, tmp_path, monkeypatch):
    commits = []
    orig = T.EpisodeLearner.end_episode

    def spy(self, rewards=None):
        commits.append((id(self), list(rewards)))
        return orig(self, rewards)

    monkeypatch.setattr(T.EpisodeLearner, "end_episode", spy)
    rep = T.run_users(T.TabcompleteConfig(source=tiny_tree, users=3, suggestions=24, window=8, user_episode_bytes=160,
                                          reward="signed", min_chars=2, rows=("kept", "reset", "yoked", "static"),
                                          out_dir=str(tmp_path), name="t"), tiny_lm)
    assert os.path.exists(rep["json"]) and os.path.exists(rep["plot"])
    names = rep["config"]["rows"]
    ki, yi, ri = names.index("kept"), names.index("yoked"), names.index("reset")
    given = [u["rewards_given"] for u in rep["users"]]
    for u in range(3):
        partner = given[(u + 1) % 3]
        for k, r in enumerate(given[u]):
            assert r[yi] == partner[k % len(partner)][ki]  # the partner's kept reward at the same episode
            assert r[ki] in (None,) or -1.0 <= r[ki] <= 1.0
    # what the learners were given is what the report says, user by user in lock step
    learners = list(dict.fromkeys(i for i, _ in commits))
    assert len(learners) == 3
    for u, lid in enumerate(learners):
        assert [r for i, r in commits if i == lid] == given[u]
    for u in rep["users"]:
        assert u["suggestions"] == 24
    # the first episode is identical for every row that writes (nothing carried yet)
    st = rep["stats"]["kept - reset/all"]
    assert st["n"] == 72 and st["ci"][0] <= st["delta"] <= st["ci"][1]
    assert "kept - reset" in rep["table"] and "yoked - reset" in rep["table"]


def test_run_users_rejects_bad_settings(tiny_lm, tiny_tree):
    with pytest.raises(ValueError, match="rows"):
        T.run_users(T.TabcompleteConfig(source=tiny_tree, users=1, suggestions=4, window=2, rows=("kept",),
                                        out_dir=None), tiny_lm)
    with pytest.raises(ValueError, match="reward"):
        T.run_users(T.TabcompleteConfig(source=tiny_tree, users=1, suggestions=4, window=2, reward="x", out_dir=None),
                    tiny_lm)
