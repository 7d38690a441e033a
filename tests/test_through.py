"""Training through adaptation (cl_arch.train.through): the stream reader, its gradients, the run's
files, exact resume and the guards. A tiny model on generated files; ~10 s."""
import json
import os

import pytest
import torch

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.memory import ReadoutConfig
from cl_arch.train.through import ThroughConfig, read_stream, set_target, train_through


def tiny(target="same", seed=0):
    torch.manual_seed(seed)
    cfg = PlasticConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                        n_attn_heads=2, layer_types=["fast", "attn"], attn_window=16, chunk_size=16,
                        conv_size=4, target=target, memories=[ReadoutConfig(heads=1)])
    return PlasticTransformer(cfg)


@pytest.fixture
def corpus(tmp_path):
    files = []
    for i in range(3):
        p = tmp_path / f"f{i}.py"
        p.write_bytes(("".join(f"def f{j}(x):\n    return x * {j % 7} + {i}\n" for j in range(60))).encode())
        files.append(str(p))
    return files


def test_read_stream_scores_every_episode_and_backpropagates_per_window():
    model = tiny()
    rows = torch.randint(0, 256, (2, 4 * 32 + 1))
    calls = []

    def backward(loss):
        calls.append(loss.item())
        loss.backward()

    losses = read_stream(model, rows, 32, 2, backward=backward)
    assert len(losses) == 4 and len(calls) == 2
    assert abs(sum(calls) - sum(x.item() for x in losses) / 4) < 1e-5
    assert model.embed.weight.grad is not None and torch.isfinite(model.embed.weight.grad).all()
    fast = model.blocks[0].mixer
    assert fast.k_proj.weight.grad.abs().sum() > 0


def test_later_episodes_read_what_earlier_ones_wrote():
    """Without commits carrying anything (a fresh state per episode) the second reading of a
    repeated episode scores as the first; with the stream's commits it differs."""
    model = tiny().eval()
    ep = torch.randint(0, 256, (1, 33))
    rows = torch.cat([ep[:, :-1], ep], dim=1)  # the same 32 bytes twice
    with torch.no_grad():
        l1, l2 = read_stream(model, rows, 32, 1)
    assert abs(l1.item() - l2.item()) > 1e-6


def test_set_target_equals_a_model_built_with_it():
    a, b = tiny("same", seed=1), tiny("next", seed=2)
    b.load_state_dict(a.state_dict())
    set_target(a, "next")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(a(ids)[0], b(ids)[0], rtol=0, atol=0)
    assert a.config.target == "next"


def test_run_writes_its_files_resumes_and_refuses_another_target(tmp_path, corpus):
    out = str(tmp_path / "run")
    cfg = dict(context_bytes=128, episode_bytes=64, batch_size=2, save_every=1, val_windows=1, warmup_steps=1)
    r1 = train_through(tiny(), ThroughConfig(steps=2, target="next", **cfg), out, files=corpus)
    assert r1["steps"] == 2 and len(r1["val_after"]) == 2
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["through"]["target"] == "next"
    loaded = PlasticTransformer.from_pretrained(os.path.join(out, "final"))
    assert loaded.config.target == "next"
    r2 = train_through(tiny(), ThroughConfig(steps=3, target="next", **cfg), out, files=corpus)
    assert r2["steps"] == 3 and len(r2["train"]) == 1  # one more step, from the checkpoint
    with pytest.raises(ValueError, match="target"):
        train_through(tiny(), ThroughConfig(steps=4, target="same", **cfg), out, files=corpus)


@pytest.mark.parametrize("bad,msg", [(dict(episode_bytes=3000), "divide"), (dict(tbptt=0), "tbptt"),
                                     (dict(target="prev"), "target"), (dict(lr=float("nan")), "lr")])
def test_bad_settings_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ThroughConfig(**bad)
