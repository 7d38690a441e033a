"""cl_arch.hf against hostile or careless input (issue 22, items 5 and 6 and the retrofit base path):
a failed ``load_retrofit`` leaves the caller's base exactly as it was, retrofitting twice is refused,
the base fingerprint follows every edit of the base weights, and ``load_retrofit`` finds its base by
the resolved path and fingerprint it recorded (never by a download). Tiny random Llama models
(2 layers, hidden 32, vocabulary 64) built here: nothing is downloaded."""
import json
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cl_arch import Session  # noqa: E402
from cl_arch.hf import load_retrofit, retrofit, save_retrofit  # noqa: E402
from cl_arch.hf.files import RETROFIT_CONFIG, RETROFIT_WEIGHTS  # noqa: E402
from test_hf import perturb  # noqa: E402

V = 64
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def snapshot(base):
    """Everything a retrofit could leave behind on ``base``: logits, weights, modules and hooks."""
    with torch.no_grad():
        logits = base(IDS).logits.clone()
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in base.named_modules()}
    return {"logits": logits, "params": {n: p.detach().clone() for n, p in base.state_dict().items()},
            "modules": [(n, type(m).__name__) for n, m in base.named_modules()], "hooks": hooks}


def assert_untouched(base, before):
    after = snapshot(base)  # calling base() raises if a retrofit hook is left on it
    assert torch.equal(after["logits"], before["logits"])  # bitwise
    assert after["params"].keys() == before["params"].keys()
    assert all(torch.equal(after["params"][n], t) for n, t in before["params"].items())
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    fresh = retrofit(base, layers=[0], n_heads=2)  # the base takes a new retrofit and runs
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS)[0], before["logits"], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama"))
    tiny_llama().save_pretrained(d)
    return d


@pytest.fixture
def saved(tmp_path, llama_dir):
    """A retrofit of the model in ``llama_dir`` saved to ``tmp_path/rf``: (folder, its model)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model = retrofit(base, layers=[0, 1], n_heads=2, head_k_dim=8, head_v_dim=8)
    perturb(model)
    d = tmp_path / "rf"
    save_retrofit(model, d)
    return d, model


def fresh_base(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()


# ---------------------------------------------------------------------- item 5: a failed load leaves no trace
def _rewrite_tensors(d, edit):
    from safetensors.torch import load_file, save_file

    path = os.path.join(d, RETROFIT_WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_load_with_corrupt_tensor_file_leaves_base_untouched(saved, llama_dir):
    d, _ = saved
    with open(d / RETROFIT_WEIGHTS, "r+b") as f:  # a header length pointing past the end of the file
        f.write((10 ** 9).to_bytes(8, "little"))
    base = fresh_base(llama_dir)
    before = snapshot(base)
    with pytest.raises(ValueError, match="corrupt retrofit weights"):
        load_retrofit(d, base)
    assert_untouched(base, before)


def test_load_with_wrong_shapes_leaves_base_untouched(saved, llama_dir):
    d, _ = saved
    _rewrite_tensors(d, lambda t: t.update({"0.o_proj.weight": torch.zeros(3, 3)}))
    base = fresh_base(llama_dir)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"wrong shapes \['0.o_proj.weight'\]"):
        load_retrofit(d, base)
    assert_untouched(base, before)


def test_load_with_missing_tensor_leaves_base_untouched(saved, llama_dir):
    d, _ = saved
    _rewrite_tensors(d, lambda t: t.pop("1.o_proj.weight"))
    base = fresh_base(llama_dir)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"missing \['1.o_proj.weight'\]"):
        load_retrofit(d, base)
    assert_untouched(base, before)


def test_load_with_edited_tensor_values_leaves_base_untouched(saved, llama_dir):
    d, _ = saved
    _rewrite_tensors(d, lambda t: t["0.o_proj.weight"].add_(1.0))  # fits, but is not what was saved
    base = fresh_base(llama_dir)
    before = snapshot(base)
    with pytest.raises(ValueError, match="differs from the recorded"):
        load_retrofit(d, base)
    assert_untouched(base, before)


def test_load_over_other_base_leaves_base_untouched(saved):
    d, _ = saved
    other = tiny_llama(seed=1)
    before = snapshot(other)
    with pytest.raises(ValueError, match="fingerprint"):
        load_retrofit(d, other)
    assert_untouched(other, before)


def test_load_with_layer_index_out_of_range_leaves_base_untouched(saved, llama_dir):
    d, _ = saved
    meta = json.loads((d / RETROFIT_CONFIG).read_text())
    meta["retrofit"]["layers"] = [0, 7]  # a hand-edited config and weights: block 7 does not exist
    (d / RETROFIT_CONFIG).write_text(json.dumps(meta))
    _rewrite_tensors(d, lambda t: t.update({"7." + k[2:]: t.pop(k) for k in [k for k in t if k.startswith("1.")]}))
    base = fresh_base(llama_dir)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"block 7.*2 decoder blocks"):
        load_retrofit(d, base)
    assert_untouched(base, before)


def test_retrofit_twice_is_refused_and_unload_frees_the_base():
    base = tiny_llama()
    before = snapshot(base)
    first = retrofit(base, layers=[0], n_heads=2)
    with pytest.raises(ValueError, match="already carries a retrofit"):
        retrofit(base, layers=[1], n_heads=2)
    with torch.no_grad():
        first(IDS)  # the refused second retrofit left the first one working
    assert first.unload() is base
    assert_untouched(base, before)


def test_load_onto_retrofitted_base_is_refused(saved, llama_dir):
    d, _ = saved
    base = fresh_base(llama_dir)
    first = retrofit(base, layers=[1], n_heads=2)
    with pytest.raises(ValueError, match="already carries a retrofit"):
        load_retrofit(d, base)
    with torch.no_grad():
        first(IDS)


# ---------------------------------------------------------------------- item 6: the base fingerprint follows edits
@pytest.mark.parametrize("edit", ["data_inplace", "data_assign", "to_float64"])
def test_base_fingerprint_follows_base_edits_and_refuses_stale_session(tmp_path, edit):
    model = retrofit(tiny_llama(), layers=[0], n_heads=2, head_k_dim=8, head_v_dim=8)
    s = Session(model, seed=0)
    s.observe(list(range(20)))
    s.end_episode()
    s.save(tmp_path / "s.safetensors")
    base_fp, fp = model.base_fingerprint(), model.fingerprint()
    p = model.base.model.layers[0].mlp.up_proj.weight
    if edit == "data_inplace":
        p.data.add_(1)  # bumps no version counter
    elif edit == "data_assign":
        p.data = p.data.clone() + 1  # a new tensor under the same Parameter
    else:
        model.base.to(torch.float64)  # the same Parameter objects, new dtype
    assert model.base_fingerprint() != base_fp and model.fingerprint() != fp
    with pytest.raises(ValueError, match="belongs to another model"):
        Session.load(model, tmp_path / "s.safetensors")


def test_base_fingerprint_each_edit_in_turn():
    model = retrofit(tiny_llama(), layers=[0], n_heads=2)
    p = model.base.lm_head.weight
    original = p.detach().clone()
    seen = [model.base_fingerprint()]
    p.data.add_(1)
    seen.append(model.base_fingerprint())
    p.data = p.data.clone() + 1
    seen.append(model.base_fingerprint())
    model.base.to(torch.float64)
    seen.append(model.base_fingerprint())
    assert len(set(seen)) == 4
    model.base.to(torch.float32)  # float32 -> float64 -> float32 is exact for the other weights
    p.data.copy_(original)  # back to the first weights: the first fingerprint
    assert model.base_fingerprint() == seen[0]


# ---------------------------------------------------------------------- the base, found by resolved path and fingerprint
@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection, recorded and refused: a recorded name must never be downloaded."""
    import socket

    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _save_from(folder, out):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = retrofit(base, layers=[1], n_heads=2, head_k_dim=8, head_v_dim=8)
    perturb(model)
    save_retrofit(model, out)
    return model


def _edit_meta(d, **base_fields):
    meta = json.loads((d / RETROFIT_CONFIG).read_text())
    meta["base"].update(base_fields)
    (d / RETROFIT_CONFIG).write_text(json.dumps(meta))
    return meta


def test_base_path_recorded_resolved_and_found_from_another_folder(tmp_path, monkeypatch, no_network):
    real = tmp_path / "models" / "llama-v1"
    tiny_llama().save_pretrained(real)
    (tmp_path / "current").symlink_to(real, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    model = _save_from("current", tmp_path / "rf")  # a relative path through a symlink, as users type it
    meta = json.loads((tmp_path / "rf" / RETROFIT_CONFIG).read_text())
    assert meta["base"]["name_or_path"] == "current" and meta["base"]["path"] == os.path.realpath(real)
    assert meta["base"]["fingerprint"] == model.base_fingerprint()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_retrofit(tmp_path / "rf")
    assert loaded.fingerprint() == model.fingerprint()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS)[0], model(IDS)[0], atol=0, rtol=0)
    assert no_network == []


def test_missing_recorded_base_names_path_and_fingerprint(tmp_path, no_network):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = _save_from(str(tmp_path / "base"), tmp_path / "rf")
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError) as e:
        load_retrofit(tmp_path / "rf")
    msg = str(e.value)
    assert str(tmp_path / "base") in msg and model.base_fingerprint() in msg and "pass the base explicitly" in msg
    assert load_retrofit(tmp_path / "rf", tmp_path / "moved").fingerprint() == model.fingerprint()
    assert no_network == []


def test_recorded_base_folder_with_other_weights_names_both_fingerprints(tmp_path, no_network):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = _save_from(str(tmp_path / "base"), tmp_path / "rf")
    tiny_llama(seed=1).save_pretrained(tmp_path / "base")  # the folder now holds another model
    other_fp = retrofit(tiny_llama(seed=1), layers=[0], n_heads=2).base_fingerprint()
    with pytest.raises(ValueError) as e:
        load_retrofit(tmp_path / "rf")
    msg = str(e.value)
    assert model.base_fingerprint() in msg and other_fp in msg
    assert f"the base loaded from {str(tmp_path / 'base')!r} has fingerprint {other_fp}" in msg
    assert no_network == []


def test_explicit_base_with_other_weights_names_both_fingerprints(saved):
    d, model = saved
    other = tiny_llama(seed=1)
    other_fp = retrofit(tiny_llama(seed=1), layers=[0], n_heads=2).base_fingerprint()
    with pytest.raises(ValueError, match=f"fingerprint {model.base_fingerprint()}.*the base given has "
                                         f"fingerprint {other_fp}"):
        load_retrofit(d, other)


def test_recorded_hub_id_is_never_downloaded(saved, no_network):
    d, model = saved
    _edit_meta(d, name_or_path="some-org/some-model-not-in-any-cache", path=None)
    with pytest.raises(FileNotFoundError, match=r"'some-org/some-model-not-in-any-cache' \(weights fingerprint "
                                                rf"{model.base_fingerprint()}\).*never downloaded.*pass the base"):
        load_retrofit(d)
    assert no_network == []


def test_recorded_path_is_untrusted_input(saved, tmp_path, no_network):
    d, _ = saved
    _edit_meta(d, path="../../some/where")
    with pytest.raises(ValueError, match=r"recorded base path '../../some/where' is not absolute"):
        load_retrofit(d)
    target = tmp_path / "not-a-model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    before = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in target.iterdir())
    _edit_meta(d, path=str(target))
    with pytest.raises(ValueError, match=f"recorded base folder {re.escape(str(target))} .*could not be loaded"):
        load_retrofit(d)
    assert sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in target.iterdir()) == before
    assert no_network == []


def test_retrofit_saved_before_paths_were_recorded_still_loads(saved, llama_dir, no_network):
    d, model = saved
    meta = json.loads((d / RETROFIT_CONFIG).read_text())
    del meta["base"]["path"]  # the file format before this field: name_or_path only
    meta["base"]["name_or_path"] = llama_dir
    (d / RETROFIT_CONFIG).write_text(json.dumps(meta))
    assert load_retrofit(d).fingerprint() == model.fingerprint()
    assert no_network == []
