"""``cl-arch eval NAME`` (issue 23): one sub-parser per benchmark, declared by the benchmark module
itself (``add_arguments`` / ``config_from_args`` / ``run(config, model)``). ``cl-arch eval NAME --help``
lists NAME's options only; an option NAME does not take is argparse's error under NAME's usage
(exit 2); every option of the former single parser still exists, with its default, for the
benchmarks that use it; each benchmark's options reach its config.

Nothing here runs a benchmark: the mapping tests replace each benchmark's ``run`` by a recorder.
"""
import re

import pytest
import torch

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.scripts import cli
from cl_arch.scripts import eval as eval_cli

COMMON = {"--out", "--report-name", "--model", "--in-place", "--threads", "--seed"}
STDLIB_MODEL = {"--cache-dir", "--pretrain-seconds", "--no-readout", "--no-episodic"}
STREAM = {"--source", "--package", "--max-bytes", "--episode-bytes"}
RATES = {"--lam", "--eta-s", "--gamma", "--eta-r"}
RECALL = {"--episodes", "--seeds", "--recall-steps"}

# What each benchmark takes besides COMMON: written out here, independently of the registry.
EXPECTED = {
    "codebase": STDLIB_MODEL | STREAM | RATES | {
        "--dyn-lr", "--dyn-rule", "--dyn-decay", "--dyn-params", "--dyn-tuned", "--no-dynamic-eval",
        "--full-context-window", "--methods", "--second-session", "--fold-budget"},
    "tabcomplete": STDLIB_MODEL | STREAM | RATES | {
        "--users", "--suggestions", "--window", "--style", "--reward", "--min-chars", "--rows",
        "--user-episode-bytes"},
    "preferences": {"--packages", "--users", "--suggestions", "--max-len", "--window", "--eta", "--scale",
                    "--threshold", "--decode-tokens"},
    "games": RECALL | {"--reward-memory", "--tokens", "--reward-fit", "--reward-delay", "--credit", "--no-yoked"},
    "sutton": RECALL | STREAM | {"--cache-dir", "--pretrain-seconds"},
    "retention": RECALL,
    "cost": STDLIB_MODEL,
    "offset": STDLIB_MODEL | {"--source", "--package", "--max-file-bytes", "--min-file-bytes", "--bucket",
                              "--max-files"},
    "tune-dynamic": STDLIB_MODEL | {"--package", "--max-bytes", "--dyn-params"},
}

# The single parser's 49 options before the split (besides --help).
FORMER = {
    "--out", "--report-name", "--model", "--in-place", "--cache-dir", "--pretrain-seconds", "--source", "--package",
    "--lam", "--max-bytes", "--episode-bytes", "--eta-s", "--gamma", "--eta-r", "--dyn-lr", "--dyn-rule",
    "--dyn-decay", "--full-context-window", "--dyn-params", "--dyn-tuned", "--no-dynamic-eval", "--methods",
    "--second-session", "--fold-budget", "--no-readout", "--no-episodic", "--episodes", "--seeds", "--reward-memory",
    "--tokens", "--reward-fit", "--reward-delay", "--credit", "--no-yoked", "--recall-steps", "--max-file-bytes",
    "--min-file-bytes", "--bucket", "--max-files", "--users", "--suggestions", "--window", "--style", "--reward",
    "--min-chars", "--rows", "--user-episode-bytes", "--threads", "--seed",
}

# Options of benchmarks added after the split.
ADDED = {"--packages", "--max-len", "--eta", "--scale", "--threshold", "--decode-tokens"}

# (benchmark, an option it takes, another benchmark's option it does not take)
DISTINCT = [
    ("codebase", "--methods", "--users"),
    ("tabcomplete", "--users", "--methods"),
    ("preferences", "--max-len", "--methods"),
    ("games", "--reward-memory", "--source"),
    ("sutton", "--episodes", "--reward-memory"),
    ("retention", "--recall-steps", "--package"),
    ("cost", "--cache-dir", "--source"),
    ("offset", "--bucket", "--max-bytes"),
    ("tune-dynamic", "--dyn-params", "--source"),
]


def run_cli(capsys, argv):
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def help_options(text):
    """The options a --help lists (each at the start of its line, not in the usage)."""
    return set(re.findall(r"(?m)^  (--[a-z][\w-]*)", text))


def test_every_benchmark_has_a_sub_parser(capsys):
    assert set(eval_cli.BENCHMARKS) == set(EXPECTED)
    assert set().union(*EXPECTED.values()) | COMMON == FORMER | ADDED
    for name in EXPECTED:
        mod = eval_cli.benchmark(name)
        assert all(callable(getattr(mod, f)) for f in ("add_arguments", "config_from_args", "run")), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_help_lists_the_benchmarks_options_only(capsys, name):
    code, out, _ = run_cli(capsys, ["eval", name, "--help"])
    assert code == 0
    assert out.startswith(f"usage: cl-arch eval {name} ")
    assert help_options(out) == COMMON | EXPECTED[name]


@pytest.mark.parametrize("name,takes,lacks", DISTINCT, ids=[d[0] for d in DISTINCT])
def test_help_shows_its_option_and_not_anothers(capsys, name, takes, lacks):
    _, out, _ = run_cli(capsys, ["eval", name, "--help"])
    assert takes in help_options(out) and lacks not in help_options(out)


def test_eval_help_lists_the_benchmarks_not_their_options(capsys):
    code, out, _ = run_cli(capsys, ["eval", "--help"])
    assert code == 0
    assert not help_options(out)
    for name in EXPECTED:
        assert re.search(rf"(?m)^    {re.escape(name)}\b", out), name


@pytest.mark.parametrize("name,takes,lacks", DISTINCT, ids=[d[0] for d in DISTINCT])
def test_an_option_the_benchmark_does_not_take_exits_2(capsys, name, takes, lacks):
    code, out, err = run_cli(capsys, ["eval", name, lacks, "1"])
    assert code == 2 and not out
    assert err.startswith(f"usage: cl-arch eval {name} ")
    assert err.strip().splitlines()[-1] == f"cl-arch eval {name}: error: unrecognized arguments: {lacks} 1"
    assert "Traceback" not in err


def test_command_line_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, ["eval", "codebase", "--frobnicate"])
    assert code == 2
    assert err.strip().splitlines()[-1] == "cl-arch eval codebase: error: unrecognized arguments: --frobnicate"
    code, _, err = run_cli(capsys, ["eval", "codebase", "--dyn-rule", "adam"])
    assert code == 2 and "cl-arch eval codebase: error: argument --dyn-rule: invalid choice: 'adam'" in err
    code, _, err = run_cli(capsys, ["eval", "codebase", "--eta-s", "fast"])
    assert code == 2 and "expected a number or 'model', got 'fast'" in err
    code, _, err = run_cli(capsys, ["eval", "nope"])
    assert code == 2 and "cl-arch eval: error: argument NAME: invalid choice: 'nope'" in err
    code, _, err = run_cli(capsys, ["eval"])
    assert code == 2 and "cl-arch eval: error: the following arguments are required: NAME" in err


def test_defaults_are_the_former_parsers():
    """The defaults a run gets without options are the former parser's, now each benchmark's own
    (``--max-bytes``, ``--episodes``, ``--seeds``: what the former parser's None stood for)."""
    parser = cli.build_parser()
    for name in EXPECTED:
        args = parser.parse_args(["eval", name])
        assert args.command == "eval" and args.name == name and args.func is eval_cli.run
        assert (args.out, args.report_name, args.model, args.in_place, args.threads, args.seed) == \
            ("runs/eval", None, None, False, None, 0)
    c = parser.parse_args(["eval", "codebase"])
    assert (c.max_bytes, c.episode_bytes, c.dyn_lr, c.dyn_rule, c.dyn_decay, c.full_context_window, c.methods) == \
        (100_000, 2048, 3e-4, "rms", 1e-3, 4096, "frozen,adapt,adapt+reward,no_persist")
    t = parser.parse_args(["eval", "tabcomplete"])
    assert (t.users, t.suggestions, t.window, t.reward, t.min_chars, t.rows, t.user_episode_bytes) == \
        (8, 500, 100, "binary", 4, "kept,reset,yoked,unrewarded", 256)
    g = parser.parse_args(["eval", "games"])
    assert (g.episodes, g.seeds, g.recall_steps, g.tokens, g.reward_fit, g.reward_delay, g.credit) == \
        (300, 8, 600, "default", "search", 0, "stored")
    assert (parser.parse_args(["eval", "sutton"]).max_bytes, parser.parse_args(["eval", "sutton"]).episodes) == \
        (40_000, 200)
    assert (parser.parse_args(["eval", "retention"]).episodes, parser.parse_args(["eval", "retention"]).seeds) == \
        (150, 4)
    o = parser.parse_args(["eval", "offset"])
    assert (o.max_file_bytes, o.min_file_bytes, o.bucket, o.max_files) == (4096, 1024, 128, None)
    td = parser.parse_args(["eval", "tune-dynamic"])
    assert (td.package, td.max_bytes, td.dyn_params) == ("asyncio", 30_000, "all")
    assert parser.parse_args(["eval", "codebase", "--eta-s", "model"]).eta_s is None


def test_a_default_config_is_the_command_lines_default():
    """``config_from_args`` of the bare command gives the config class's own defaults (bar --out)."""
    import dataclasses

    parser = cli.build_parser()
    for name in EXPECTED:
        mod = eval_cli.benchmark(name)
        cfg = mod.config_from_args(parser.parse_args(["eval", name]))
        default = type(cfg)()
        assert dataclasses.replace(cfg, out_dir=default.out_dir) == default, name


# ---------------------------------------------------------------------- each benchmark's run(...) call
REPORT = {"methods": {}, "table": "", "json": None, "plot": None}
TUNE_REPORT = dict(REPORT, params="all", tuned_on="asyncio", max_bytes=30000, frozen_bpb=1.0,
                   best={"lr": 1e-3, "decay": 0.0, "gain_bpb": 0.0}, cached=True, cache_path="x")

# (argv after --model/--out, module, function, expected config fields)
MAPPING = [
    (["codebase", "--max-bytes", "500", "--dyn-params", "fast_W0", "--lam", "0.5", "--eta-s", "model"],
     "codebase", "run", dict(max_bytes=500, lam=0.5, eta_s=None, seed=0, with_dynamic_eval=True,
                             methods=("frozen", "adapt", "adapt+reward", "no_persist", "sparse_dynamic_eval"))),
    (["codebase", "--no-dynamic-eval", "--package", "email"], "codebase", "run",
     dict(max_bytes=100_000, with_dynamic_eval=False)),
    (["tabcomplete", "--users", "2", "--rows", "kept, reset", "--gamma", "0.9"], "tabcomplete", "run_users",
     dict(users=2, rows=("kept", "reset"), gamma=0.9, user_episode_bytes=256)),
    (["tabcomplete", "--users", "0", "--episode-bytes", "512"], "tabcomplete", "run_single",
     dict(max_bytes=100_000, episode_bytes=512)),
    (["games", "--episodes", "5", "--no-yoked", "--reward-delay", "2"], "games", "run",
     dict(episodes=5, yoked=False, delay=2, credit="stored", recall_steps=600)),
    (["sutton", "--seeds", "2"], "sutton", "run", dict(seeds=2, max_bytes=40_000, episode_bytes=2048)),
    (["retention", "--recall-steps", "10"], "retention", "run", dict(recall_steps=10)),
    (["cost", "--seed", "3", "--pretrain-seconds", "5"], "cost", "run",
     dict(seed=3, cache_dir=None, pretrain_seconds=5.0)),
    (["offset", "--package", "json,email", "--bucket", "64"], "offset", "run",
     dict(sources=("json", "email"), bucket=64, name="offset")),
    (["tune-dynamic", "--dyn-params", "fast_W0", "--no-readout"], "tune_dynamic", "run",
     dict(package="asyncio", max_bytes=30_000, params="fast_W0", no_readout=True)),
]


@pytest.mark.parametrize("argv,module,func,expected", MAPPING, ids=[" ".join(m[0]) for m in MAPPING])
def test_options_reach_the_benchmarks_config(tmp_path, monkeypatch, capsys, argv, module, func, expected):
    import importlib

    torch.manual_seed(0)
    PlasticTransformer(PlasticConfig(d_model=32, n_layers=2)).save_pretrained(tmp_path / "m")
    calls = []

    def record(*a, **kw):
        calls.append((a, kw))
        return TUNE_REPORT if module == "tune_dynamic" else REPORT

    monkeypatch.setattr(importlib.import_module(f"cl_arch.eval.{module}"), func, record)
    code, out, err = run_cli(capsys, ["eval", argv[0], "--model", tmp_path / "m", "--out", tmp_path / "out",
                                      *argv[1:]])
    assert code == 0, err
    assert len(calls) == 1
    (cfg, model), kw = calls[0]
    assert not kw and isinstance(model, PlasticTransformer)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.out_dir == str(tmp_path / "out")
    if "--package" in argv and module == "codebase":
        assert cfg.source.endswith("email")
