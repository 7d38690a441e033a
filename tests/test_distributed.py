"""Scale-out (issue 16): FSDP2 on 2 CPU processes (gloo) equals one process, sharded and full
checkpoints resume, meta-training under DDP and FSDP equals one process, the accelerate configs
parse, the plan follows the launcher, and the progress bar follows a wall-clock budget.

The 2-process runs go through ``accelerate launch --config_file configs/accelerate/fsdp.yaml``:
accelerate forms the gloo group, and cl_arch shards with ``fully_shard`` itself
(:mod:`cl_arch.train.distributed` says why).
"""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cl_arch.memory import EpisodicConfig, ReadoutConfig  # noqa: E402
from cl_arch.train.config import PretrainRunConfig, load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCEL = os.path.join(REPO, "configs", "accelerate")
TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_k_dim=16",
              "model.head_v_dim=16", "model.n_attn_heads=2", "model.chunk_size=16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_corpus):
    """~30 KB of stdlib Python source."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), 30, 2000, 30000)


def tiny(corpus, *extra):
    return TINY_MODEL + [f"data.sources={corpus}", "data.seq_len=32", "data.val_fraction=0.2",
                         "train.batch_size=4", "train.max_steps=4", "train.max_minutes=null", "train.eval_every=0",
                         "train.val_blocks=6", "train.progress=false", "train.log_with=none",
                         "optim.warmup_steps=1", *extra]


def launch(tmp_path, body: str, port: int, config: str = "fsdp.yaml"):
    """Run ``body`` (Python) on 2 CPU processes with ``accelerate launch --config_file <config>``."""
    script = tmp_path / "run.py"
    script.write_text("import json, sys\nimport torch\ntorch.set_num_threads(1)\n" + body)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ACCEL, config),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--main_process_port",
           str(port), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def test_fsdp_two_processes_match_one_and_checkpoints_resume(corpus, tmp_path):
    """FSDP2 on 2 processes: the per-step losses equal one process's (same global batches; only the
    order of float reductions differs); a sharded and a full checkpoint resume under FSDP bit for bit;
    a one-process checkpoint resumes under FSDP and a full FSDP checkpoint (a save_pretrained folder)
    in one process, both to float tolerance."""
    from cl_arch import PlasticTransformer
    from cl_arch.train import checkpoint as ckpt
    from cl_arch.train.pretrain import pretrain

    one = pretrain(load_config(PretrainRunConfig, None, tiny(corpus, f"train.output_dir={tmp_path / 'one'}",
                                                             "train.save_every=2", "train.keep_checkpoints=0")))
    out = tmp_path / "fsdp"
    base = tiny(corpus)
    launch(tmp_path, f"""
from cl_arch.train.config import load_config, PretrainRunConfig
from cl_arch.train.pretrain import pretrain
base, out = {base!r}, {str(out)!r}
run = lambda *extra: pretrain(load_config(PretrainRunConfig, None, base + list(extra)))
run(f"train.output_dir={{out}}/straight", "train.save_every=2", "train.keep_checkpoints=0")
run(f"train.output_dir={{out}}/resumed", f"train.resume={{out}}/straight/checkpoints/step_000002")
run(f"train.output_dir={{out}}/full", "train.save_every=2", "train.keep_checkpoints=0",
    "train.checkpoint_format=full")
run(f"train.output_dir={{out}}/from_full", f"train.resume={{out}}/full/checkpoints/step_000002")
run(f"train.output_dir={{out}}/from_one", f"train.resume={str(tmp_path / 'one')}/checkpoints/step_000002")
""", port=29571)
    straight, resumed, full = (results(out / n) for n in ("straight", "resumed", "full"))
    # a full checkpoint (gathered weights, optimizer state by name) resumes under FSDP bit for bit
    assert results(out / "from_full")["train_losses"] == straight["train_losses"][2:]
    # a one-process checkpoint (numbered optimizer state) resumes under FSDP: one process's losses
    assert torch.allclose(torch.tensor(results(out / "from_one")["train_losses"]),
                          torch.tensor(one["train_losses"][2:]), rtol=1e-5, atol=1e-5)
    assert straight["processes"] == 2 and straight["parallel"] == "fsdp"
    assert straight["checkpoint_format"] == "sharded" and full["checkpoint_format"] == "full"
    # one process vs FSDP: float tolerance (measured: max |diff| 4.8e-7 nats on losses of 3.3-5.1)
    assert torch.allclose(torch.tensor(straight["train_losses"]), torch.tensor(one["train_losses"]),
                          rtol=1e-5, atol=1e-5)
    assert abs(straight["final_val_bpb"] - one["final_val_bpb"]) < 1e-4
    assert one["train_losses"][0] != one["train_losses"][-1]  # the loss moved: not comparing constants
    # sharded checkpoint: one file set per rank, no gathered weights; resumes exactly
    sharded_ck = out / "straight" / "checkpoints" / "step_000002"
    assert (sharded_ck / "sharded").is_dir() and not (sharded_ck / "model.safetensors").exists()
    assert resumed["steps_this_run"] == 2
    assert resumed["train_losses"] == straight["train_losses"][2:]  # bit for bit
    assert resumed["final_val_bpb"] == straight["final_val_bpb"]
    assert full["train_losses"] == straight["train_losses"]  # the checkpoint format changes nothing
    # the final model of an FSDP run is a whole save_pretrained folder (weights gathered)
    final = PlasticTransformer.from_pretrained(out / "straight" / "final")
    ref = PlasticTransformer.from_pretrained(tmp_path / "one" / "final")
    for (name, a), b in zip(final.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    # a full checkpoint written under FSDP (optimizer state by parameter name) resumes in one process
    full_ck = out / "full" / "checkpoints" / "step_000002"
    PlasticTransformer.from_pretrained(full_ck)
    assert "optimizer_by_name" in torch.load(full_ck / ckpt.TRAINING_STATE, weights_only=True)
    back = pretrain(load_config(PretrainRunConfig, None, tiny(corpus, f"train.output_dir={tmp_path / 'back'}",
                                                              f"train.resume={full_ck}")))
    assert torch.allclose(torch.tensor(back["train_losses"]), torch.tensor(one["train_losses"][2:]),
                          rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_refused_without_fsdp(corpus, tmp_path):
    with pytest.raises(ValueError, match="train.checkpoint_format: 'sharded' needs FSDP"):
        from cl_arch.train.pretrain import pretrain

        pretrain(load_config(PretrainRunConfig, None, tiny(corpus, f"train.output_dir={tmp_path}",
                                                           "train.checkpoint_format=sharded")))


META = ["model.d_model=32", "model.head_k_dim=16", "model.head_v_dim=16", "meta.base_recall_steps=0",
        "meta.games_per_step=4", "meta.episodes=4", "meta.tbptt=2", "meta.eval_games=2", "meta.eval_episodes=2",
        "meta.n_cues=4", "meta.n_answers=4", "meta.recall_batch=4", "meta.recall_pairs=6", "meta.lm_weight=0.5",
        "train.max_steps=2", "train.progress=false", "train.log_with=none", "optim.lr=0.01"]


def test_meta_training_two_processes_match_one(tmp_path):
    """Meta-training (4 episodes, truncated backprop every 2, commits between episodes, the recall
    loss) on 2 processes, DDP and FSDP, gives one process's rewards and weights: each process
    plays half of the same games and the gradients are averaged."""
    from cl_arch import PlasticTransformer
    from cl_arch.train.meta import MetaRunConfig, meta_train

    one = meta_train(load_config(MetaRunConfig, None, META + [f"train.output_dir={tmp_path / 'one'}"]))
    out = tmp_path / "two"
    launch(tmp_path, f"""
from cl_arch.train.config import load_config
from cl_arch.train.meta import MetaRunConfig, meta_train
for mode in ("ddp", "fsdp"):
    meta_train(load_config(MetaRunConfig, None, {META!r} + [f"train.output_dir={str(out)}/{{mode}}",
                                                            f"train.parallel={{mode}}"]))
""", port=29573)
    ref = PlasticTransformer.from_pretrained(tmp_path / "one" / "final").state_dict()
    start = one["plasticity_before"]
    assert one["plasticity"] != start  # the plasticity moved: not comparing two untouched models
    for mode in ("ddp", "fsdp"):
        r = results(out / mode)
        assert r["processes"] == 2 and r["parallel"] == mode
        assert torch.allclose(torch.tensor(r["rewards"]), torch.tensor(one["rewards"]), rtol=1e-5, atol=1e-6), mode
        assert r["after"]["kept"] == pytest.approx(one["after"]["kept"], abs=1e-5)
        got = PlasticTransformer.from_pretrained(out / mode / "final").state_dict()
        for name, a in got.items():
            assert torch.allclose(a, ref[name], atol=1e-5), (mode, name)


def test_episodic_finetune_through_the_cli_under_fsdp(corpus, tmp_path):
    """`accelerate launch ... -m cl_arch.scripts.cli finetune` under FSDP: plasticity-only episodic
    fine-tuning (3 episodes per row, differentiable commits between them; every sharded weight frozen,
    only the replicated per-head vectors train) gives one process's losses and plasticity."""
    from cl_arch import PlasticConfig, PlasticTransformer
    from cl_arch.train.config import FinetuneRunConfig
    from cl_arch.train.finetune import finetune

    torch.manual_seed(0)
    PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=16, head_v_dim=16, n_attn_heads=2,
                                     chunk_size=16, eta_s=0.5)).save_pretrained(tmp_path / "base")
    sets = tiny(corpus, f"train.init_from={tmp_path / 'base'}", "finetune.trainable=plasticity",
                "finetune.episodes=3", "optim.lr=0.05", "train.max_steps=3")[len(TINY_MODEL):]
    one = finetune(load_config(FinetuneRunConfig, None, sets + [f"train.output_dir={tmp_path / 'one'}"]))
    args = [a for kv in sets + [f"train.output_dir={tmp_path / 'two'}"] for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ACCEL, "fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29575",
           "-m", "cl_arch.scripts.cli", "finetune", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = results(tmp_path / "two")
    assert two["parallel"] == "fsdp" and two["processes"] == 2
    assert torch.allclose(torch.tensor(two["train_losses"]), torch.tensor(one["train_losses"]), rtol=1e-5, atol=1e-5)
    a = PlasticTransformer.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = PlasticTransformer.from_pretrained(tmp_path / "two" / "final").state_dict()
    base = PlasticTransformer.from_pretrained(tmp_path / "base").state_dict()
    moved = [k for k in a if not torch.equal(a[k], base[k])]
    assert "blocks.0.mixer.eta_s" in moved  # the commit rates learned
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_meta_training_refuses_an_uneven_split():
    from cl_arch.train.distributed import split_rows

    assert split_rows(8, 1, 2, "meta.games_per_step") == slice(4, 8)
    with pytest.raises(ValueError, match="meta.games_per_step=5 is not divisible by 2 processes"):
        split_rows(5, 0, 2, "meta.games_per_step")


def test_plan_follows_the_accelerate_launch(monkeypatch):
    from cl_arch.train.distributed import resolve_plan

    for var in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_STATE_DICT_TYPE", "FSDP_RESHARD_AFTER_FORWARD"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_plan("auto", "auto", 1).mode == "single"
    assert resolve_plan("auto", "auto", 2).mode == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for fsdp.yaml
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    plan = resolve_plan("auto", "auto", 2)
    assert (plan.mode, plan.checkpoint_format) == ("fsdp", "sharded")
    assert resolve_plan("ddp", "auto", 2).mode == "ddp"  # the run config wins over the launcher
    assert resolve_plan("auto", "full", 2).checkpoint_format == "full"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 2 only"):
        resolve_plan("auto", "auto", 2)
    with pytest.raises(ValueError, match="train.parallel: must be one of"):
        resolve_plan("zero3", "auto", 2)


def test_replicated_parameters_are_what_the_commit_reads(monkeypatch):
    """The commit runs outside any forward, where FSDP leaves sharded parameters sharded: it must
    read only the replicated set. Every other parameter of a memory set to NaN leaves the commit
    unchanged; redrawing the replicated ones changes it (so the check sees what the commit reads).
    Both commits: a fast layer's trace commit and the readout's state commit (which reads A_log)."""
    import copy

    from cl_arch import PlasticConfig, PlasticTransformer
    from cl_arch.kernels import checks
    from cl_arch.train.distributed import replicated_parameters

    monkeypatch.setattr(checks, "VALUE_CHECKS", False)  # let a NaN through to the result
    model = PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=16, head_v_dim=16,
                                             n_attn_heads=2))
    assert all(p.dim() <= 1 for p in replicated_parameters(model))

    def commit(m, i):
        memory = m.fast_layers()[i]
        P = torch.zeros(1, memory.n_heads, memory.head_k_dim, memory.head_v_dim)
        E = torch.randn(P.shape, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            return memory.commit(P, E, torch.ones(1), torch.zeros(1), backend="naive")[0]

    for i, memory in enumerate(model.fast_layers()):
        ref = commit(model, i)
        rep = {id(p) for p in replicated_parameters(model)}
        assert id(memory.W0) not in rep
        for redraw_replicated in (False, True):
            m = copy.deepcopy(model)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p, p0 in zip(m.fast_layers()[i].parameters(), memory.parameters()):
                    if (id(p0) in rep) == redraw_replicated:
                        p.copy_(torch.randn(p.shape, generator=g) * 3 if redraw_replicated else torch.nan)
            same = torch.equal(commit(m, i), ref)
            assert same != redraw_replicated, (type(memory).__name__, redraw_replicated)


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp", "multi_node"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(os.path.join(ACCEL, f"{name}.yaml"))
    want = {"single_gpu": ("NO", 1), "ddp": ("MULTI_GPU", 8), "fsdp": ("FSDP", 8), "multi_node": ("FSDP", 16)}[name]
    assert (str(c.distributed_type).split(".")[-1], c.num_processes) == want
    if want[0] == "FSDP":
        assert c.fsdp_config["fsdp_version"] == 2


def test_progress_bar_follows_the_budget():
    """With a budget the bar counts seconds of it (progress = max(step / max_steps, elapsed / budget)),
    not steps toward a max_steps the run will never reach."""
    from cl_arch.train.progress import RunProgress

    buf = io.StringIO()
    bar = RunProgress("pretrain", max_steps=5000, budget_s=150.0, file=buf)
    bar.update(10, 75.0, loss="1.0")
    assert bar.bar.total == 150.0 and bar.bar.n == pytest.approx(75.0)
    bar.update(4000, 80.0)  # steps ahead of the clock: the step share wins
    assert bar.bar.n == pytest.approx(120.0)
    bar.close()
    text = buf.getvalue()
    assert "/150 s of budget" in text and "step=4000/5000" in text and "/5000 [" not in text
    buf = io.StringIO()
    bar = RunProgress("pretrain", max_steps=40, budget_s=None, file=buf)  # no budget: steps
    bar.update(3, 1.0)
    bar.close()
    assert bar.bar.total == 40 and "3/40" in buf.getvalue()


def test_pretrain_bar_under_a_budget(corpus, tmp_path, capsys):
    """A pretraining run stopped by its budget ends with the bar at the budget, not at 4 of 10^6 steps."""
    from cl_arch.train.pretrain import pretrain

    r = pretrain(load_config(PretrainRunConfig, None, tiny(corpus, f"train.output_dir={tmp_path}",
                                                           "train.max_steps=1000000", "train.max_minutes=0.03",
                                                           "train.progress=true")))
    err = capsys.readouterr().err
    assert r["stopped"] == "max_minutes"
    assert "/2 s of budget" in err and "1000000 [" not in err
    assert f"step={r['steps']}/1000000" in err


def _scaling_plan():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_plan", os.path.join(REPO, "benchmarks", "scaling_plan.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kw", [
    dict(d_model=64, n_layers=3, n_heads=2, head_k_dim=16, head_v_dim=24, n_attn_heads=4),
    dict(d_model=64, n_layers=2, n_heads=2, head_k_dim=16, head_v_dim=16, n_attn_heads=2, use_gate=False,
         conv_size=0, lam=None, tie_embeddings=False, memories=[ReadoutConfig(values="embed")]),
    dict(d_model=32, n_layers=4, memories=[], layer_types=["fast", "fast", "attn", "fast"], attn_window=64),
    dict(d_model=32, n_layers=2, memories=[ReadoutConfig(), EpisodicConfig(heads=2, features=96)]),
    dict(d_model=32, n_layers=2, lam=None, memories=[ReadoutConfig(), EpisodicConfig(features=64, values="embed")]),
])
def test_scaling_plan_counts_the_instantiated_model(kw, tmp_path):
    """docs/scaling.md's parameter counts come from benchmarks/scaling_plan.py: its count must equal
    the built model's for every variant it claims to cover; the script writes its JSON."""
    from cl_arch import PlasticConfig, PlasticTransformer

    sp = _scaling_plan()
    c = PlasticConfig(**kw)
    n = sp.parameter_count(c)
    assert n["total"] == PlasticTransformer(c).num_parameters()
    assert n["matmul"] < n["total"]
    out = tmp_path / "plan.json"
    assert sp.main(["--batch", "2", "--seq-len", "128", "--out", str(out)]) == 0
    plans = json.load(open(out))["plans"]
    assert [p["name"] for p in plans] == ["125M", "350M", "1.3B"]
    one, eight = plans[2]["runs"]["1x_single"], plans[2]["runs"]["8x_fsdp"]
    assert eight["model_states_GB"] < one["model_states_GB"] / 4  # sharding divides the model states


def test_scaling_plan_matmul_weights_are_the_linear_layers_a_token_passes():
    """The FLOPs' main term, ``6 N_matmul``, counts exactly the nn.Linear weights a forward uses
    (every projection and the tied head; not the embedding lookup, convs, norms or memories)."""
    from cl_arch import PlasticConfig, PlasticTransformer

    sp = _scaling_plan()
    c = PlasticConfig(d_model=64, n_layers=3, n_heads=2, head_k_dim=16, head_v_dim=24, n_attn_heads=4)
    model = PlasticTransformer(c)
    used = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: used.__setitem__(id(mod), mod.weight.numel()))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model(torch.randint(0, 256, (1, 8)), return_state=False)
    for h in hooks:
        h.remove()
    assert sum(used.values()) == sp.parameter_count(c)["matmul"]
