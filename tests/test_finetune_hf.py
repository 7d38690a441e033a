"""finetune_hf on the Trainer (issue 23): a resumed run equals an uninterrupted one bit for bit, and two
gloo processes (accelerate launch, DDP) equal one. Tiny random Llama saved to a tmp folder: nothing is
downloaded."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cl_arch.train.finetune_hf import HFFinetuneConfig, finetune_hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    d = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return d


def config(llama_dir, out, **kw):
    return HFFinetuneConfig(**{"hf_model": llama_dir, "n_heads": 2, "head_k_dim": 8, "head_v_dim": 8, "seq_len": 32,
                               "episodes": 2, "batch_size": 4, "max_steps": 4, "max_bytes": 20_000,
                               "output_dir": str(out), "log_every": 1, **kw})


@pytest.fixture(scope="module")
def straight(llama_dir, tmp_path_factory):
    """An uninterrupted 4-step run with a checkpoint every 2 steps: the reference of both tests."""
    out = tmp_path_factory.mktemp("straight")
    return out, finetune_hf(config(llama_dir, out, save_every=2, keep_checkpoints=0), log=lambda s: None)


def fast_weights(model):
    return {k: v.detach().clone() for k, v in model.fast.state_dict().items()}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(llama_dir, tmp_path, straight):
    folder, straight = straight
    ck = folder / "checkpoints" / "step_000002"
    assert (ck / "training_state.pt").exists()
    resumed = finetune_hf(config(llama_dir, tmp_path / "b", resume=str(ck)), log=lambda s: None)
    assert resumed["steps"] == 4 and [c["step"] for c in resumed["curve"]] == [3, 4]
    assert resumed["curve"] == straight["curve"][2:]  # bit-exact losses
    a, b = fast_weights(straight["model"]), fast_weights(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["curve"][0]["loss"] != straight["curve"][-1]["loss"]  # it trained
    # "auto" continues from the newest checkpoint of the folder: nothing left to do at max_steps
    again = finetune_hf(config(llama_dir, folder, resume="auto"), log=lambda s: None)
    assert again["steps"] == 4 and again["curve"] == []
    with pytest.raises(ValueError, match="output_dir"):
        config(llama_dir, None, output_dir=None, resume="auto")


def test_two_processes_match_one(tmp_path, straight):
    single = straight[1]
    script = tmp_path / "run.py"
    script.write_text(
        "import torch\ntorch.set_num_threads(1)\nfrom cl_arch.train.finetune_hf import HFFinetuneConfig, finetune_hf\n"
        f"finetune_hf(HFFinetuneConfig(**{ {**single['config'], 'output_dir': str(tmp_path / 'two')}!r}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29571", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and single["processes"] == 1
    # The same global batches, gradients averaged over the halves: equal up to float reduction order.
    torch.testing.assert_close(torch.tensor([c["loss"] for c in two["curve"]]),
                               torch.tensor([c["loss"] for c in single["curve"]]), rtol=1e-4, atol=1e-5)
    assert abs(two["val_loss_after"] - single["val_loss_after"]) < 1e-4
    assert two["val_loss_after"] != two["val_loss_before"]
