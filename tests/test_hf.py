"""cl_arch.hf (issue 15): the transformers model class, retrofit into Llama / Qwen2 / Mistral /
GPT-2, saving and loading a retrofit, and fine-tuning it. Tiny random models built here and saved
to tmp folders: nothing is downloaded."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cl_arch import PlasticConfig, PlasticTransformer, Session  # noqa: E402
from cl_arch.consolidate import distill, fold, merge, undo  # noqa: E402
from cl_arch.hf import (ClArchForCausalLM, RetrofitModel, add_episodic_memory, load_retrofit,  # noqa: E402
                        retrofit, save_retrofit)
from cl_arch.hf.files import RETROFIT_CONFIG, RETROFIT_WEIGHTS  # noqa: E402
from cl_arch.protocols import FastMemory, PlasticModel  # noqa: E402

V = 256


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    T = transformers
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2)
        return T.GPT2LMHeadModel(cfg).eval()
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
    cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
           "mistral": (T.MistralConfig, T.MistralForCausalLM)}[family]
    if family == "mistral":
        kw["sliding_window"] = None
    return cls[1](cls[0](**kw)).eval()


def perturb(model: RetrofitModel, std: float = 0.2, seed: int = 1) -> None:
    """Give the added read paths weight, so the memories change the logits (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.block_layers():
            m.o_proj.weight.copy_(torch.randn(m.o_proj.weight.shape, generator=g) * std)
        if model.episodic is not None:
            model.episodic.read_scale.fill_(1.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama"))
    tiny("llama").save_pretrained(d)
    return d


def test_core_does_not_import_transformers():
    code = "import sys, cl_arch, cl_arch.session, cl_arch.consolidate; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_retrofit_keeps_logits_at_insertion_and_streams(family):
    base = tiny(family)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        names = {n: p.clone() for n, p in base.state_dict().items()}
        model = retrofit(base, layers=[1], n_heads=2, head_k_dim=16, head_v_dim=16)
        logits, state = model(ids)
        assert (logits - ref).abs().max().item() <= 1e-6
        assert set(base.state_dict()) == set(names)  # base names and values untouched
        assert all(torch.equal(base.state_dict()[n], t) for n, t in names.items())
        perturb(model)
        whole, _ = model(ids)
        assert (whole - ref).abs().max().item() > 1e-3  # the memory reads into the logits once o_proj moves
        a, s1 = model(ids[:, :10])
        b, s2 = model(ids[:, 10:], state=s1)
        assert s2.position == 24
        torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=2e-5, rtol=1e-4)
        with model.base_only():
            torch.testing.assert_close(base(ids).logits, ref, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="RetrofitModel"):
        base(ids)


def test_protocol_and_bad_input():
    model = retrofit(tiny("llama"), layers=[0, 1], n_heads=2)
    assert isinstance(model, PlasticModel) and all(isinstance(m, FastMemory) for m in model.fast_layers())
    assert isinstance(PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, memories=[])), PlasticModel)
    assert model.memories()[:2] == [None, None] and len(model.fast_layers()) == 2
    with pytest.raises(ValueError, match="families"):
        retrofit(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers"):
        retrofit(tiny("llama"), layers=[5])
    with pytest.raises(ValueError, match="unknown retrofit settings"):
        retrofit(tiny("llama"), lamda=0.5)
    with pytest.raises(ValueError, match="FastLayerConfig.gamma"):
        retrofit(tiny("llama"), gamma=0.0)
    with pytest.raises(ValueError, match="already a RetrofitModel"):
        retrofit(model)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 256\)"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="state has"):
        model(torch.tensor([[1, 2]]), state=PlasticTransformer(PlasticConfig(d_model=32, n_layers=2)).init_state(1))


def test_session_fold_merge_distill_on_retrofit():
    model = retrofit(tiny("llama"), layers=[1], n_heads=2, eta_s=1.0)
    perturb(model)
    text = list(b"def add(a, b):\n    return a + b\n" * 3)
    s = Session(model, seed=0)
    s.observe(text)
    assert s.end_episode() and float(s.P[0].norm()) > 0
    ids = torch.tensor([text[:40]])
    with torch.no_grad():
        with_P, _ = model(ids, state=model.init_state(1, s.P))
    fp = model.fingerprint()
    report = fold(model, s)
    assert report["fingerprint_before"] == fp != model.fingerprint()
    with torch.no_grad():
        after, _ = model(ids)
    torch.testing.assert_close(after, with_P, atol=1e-5, rtol=1e-5)
    undo(model, report)
    assert model.fingerprint() == fp

    sessions = []
    for k in range(2):
        t = Session(model, seed=k)
        t.observe(text[k * 8:])
        t.end_episode()
        sessions.append(t)
    rep = merge(model, sessions, method="mean")
    assert rep["fingerprint_after"] != fp
    undo(model, rep)
    t = Session(model, seed=3)
    t.observe(text)
    t.end_episode()
    rep = distill(model, t, steps=3, lr=1e-3)
    assert not rep["rolled_back"] and any(n.startswith("base.model.layers") for n in rep["params_trained"])
    undo(model, rep)
    assert model.fingerprint() == fp


def test_session_generate_and_save_on_retrofit(tmp_path):
    model = retrofit(tiny("gpt2"), layers=[0], n_heads=2)
    perturb(model)
    s = Session(model, seed=0)
    out = s.generate([10, 20, 30], max_new_tokens=6, temperature=0)
    s.reward(1.0)
    s.save(tmp_path / "s.safetensors")
    t = Session.load(model, tmp_path / "s.safetensors")
    assert torch.equal(t.P[0], s.P[0]) and len(out) == 6
    a, b = Session(model, seed=1), Session(model, seed=2)
    batched = Session.batch_generate([a, b], [[5, 6, 7], [8, 9, 10]], max_new_tokens=4, temperature=0)
    solo = [Session(model).generate(p, 4, temperature=0) for p in ([5, 6, 7], [8, 9, 10])]
    assert batched == solo


def test_save_load_retrofit_and_refuse_other_base(tmp_path, llama_dir):
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model = retrofit(base, layers=[0], n_heads=2)
    perturb(model)
    d = tmp_path / "rf"
    save_retrofit(model, d, base_name=llama_dir)
    assert sorted(os.listdir(d)) == sorted([RETROFIT_CONFIG, RETROFIT_WEIGHTS])
    meta = json.loads((d / RETROFIT_CONFIG).read_text())
    assert meta["base"]["name_or_path"] == llama_dir and meta["base"]["fingerprint"] == model.base_fingerprint()
    loaded = load_retrofit(d)  # base loaded from the recorded path
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=0, rtol=0)
    assert loaded.fingerprint() == model.fingerprint()
    other = tiny("llama", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        load_retrofit(d, other)
    other(ids)  # the refused base keeps no hook
    with pytest.raises(ValueError, match="made for a llama"):
        load_retrofit(d, tiny("gpt2"))


def test_hf_model_roundtrip_and_generate_equals_session(tmp_path):
    import cl_arch

    # the shipped stdlib model: trained, so greedy decoding writes varied text (and uses its readout memory)
    pm = PlasticTransformer.from_pretrained(os.path.join(os.path.dirname(cl_arch.__file__), "assets", "default_model"))
    pm.eval()
    hm = ClArchForCausalLM.from_plastic(pm)
    hm.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ClArchForCausalLM) and loaded.model.fingerprint() == pm.fingerprint()
    prompt = list(b"import os\ndef main(")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pm(ids)[0], atol=0, rtol=0)
    out = loaded.generate(ids, max_new_tokens=20, do_sample=False)
    want = Session(pm).generate(prompt, max_new_tokens=20, temperature=0)
    assert out[0, len(prompt):].tolist() == want
    assert len(set(want)) > 1
    out = loaded(ids, labels=ids)
    assert out.loss is not None and out.cache.get_seq_length() == len(prompt)
    with pytest.raises(ValueError, match="padding"):
        loaded(ids, attention_mask=torch.tensor([[0] + [1] * (len(prompt) - 1)]))


def test_finetune_hf_trains_only_added_layers(tmp_path, llama_dir):
    from cl_arch.train.finetune_hf import HFFinetuneConfig, episode_losses, finetune_hf, token_blocks

    cfg = HFFinetuneConfig(hf_model=llama_dir, n_heads=2, head_k_dim=16, head_v_dim=16, seq_len=64, episodes=2,
                           batch_size=4, max_steps=4, max_bytes=60_000, output_dir=str(tmp_path / "run"), log_every=100)
    base_before = {n: p.clone() for n, p in
                   transformers.AutoModelForCausalLM.from_pretrained(llama_dir).state_dict().items()}
    r = finetune_hf(cfg, log=lambda s: None)
    model = r["model"]
    assert all(n.startswith("fast.") for n in r["trainable_parameters"])
    assert any("eta_s" in n for n in r["trainable_parameters"])  # trainable="all": plasticity too
    assert all(torch.equal(model.base.state_dict()[n], t) for n, t in base_before.items())
    assert any(float(m.o_proj.weight.detach().abs().max()) > 0 for m in model.fast_layers())
    again = load_retrofit(tmp_path / "run" / "retrofit")
    assert again.fingerprint() == model.fingerprint()
    blocks = token_blocks("stdlib", lambda b: list(b), 65, 60_000)["val"][:4]
    c = episode_losses(model, blocks, 2, carry=True)
    z = episode_losses(model, blocks, 2, carry=False)
    torch.testing.assert_close(c[:, 0], z[:, 0], atol=0, rtol=0)  # episode 1 identical by construction
    assert not torch.equal(c[:, 1], z[:, 1])  # P reaches episode 2
    with pytest.raises(ValueError, match="trainable"):
        HFFinetuneConfig(hf_model=llama_dir, trainable="base")


def test_cli_finetune_hf(tmp_path, llama_dir):
    from cl_arch.scripts.cli import main

    rc = main(["finetune", "--hf-model", llama_dir, "--fast-heads", "2", "--fast-head-dim", "16", "--seq-len", "32",
               "--episodes", "2", "--batch-size", "2", "--max-steps", "2", "--output-dir", str(tmp_path),
               "--fast-rule", "eta_s=0.5", "--retrofit-layers", "1", "--no-progress"])
    assert rc == 0
    meta = json.loads((tmp_path / "retrofit" / RETROFIT_CONFIG).read_text())
    assert meta["retrofit"]["layers"] == [1] and meta["retrofit"]["fast"]["eta_s"] == 0.5
    assert main(["finetune", "--hf-model", llama_dir, "--fast-rule", "nonsense", "--max-steps", "1"]) == 2


# ---------------------------------------------------------------------- the episodic memory (issue 12 into issue 15)
@pytest.mark.parametrize("family,values", [("llama", "onehot"), ("qwen2", "embed"), ("mistral", "onehot"),
                                           ("gpt2", "embed")])
def test_episodic_retrofit_keeps_logits_reads_final_norm_and_streams(family, values):
    from cl_arch.memory import EpisodicMemory

    base = tiny(family)
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        model = retrofit(base, layers=[0], n_heads=2, head_k_dim=16, head_v_dim=16, episodic_heads=1,
                         episodic_features=256, episodic_values=values)
        assert isinstance(model.fast_layers()[-1], EpisodicMemory) and model.fast_layers()[-1] is model.episodic
        assert model.memories() == [None, None] + model.fast_layers() and len(model.fast_layers()) == 2
        assert model.episodic.head_v_dim == (V if values == "onehot" else 64)
        logits, state, h = model.run(ids)
        assert (logits - ref).abs().max().item() <= 1e-6  # read scale 0 at insertion
        # h is what the output head reads: the final norm's output (model.norm / transformer.ln_f)
        torch.testing.assert_close(model.base.get_output_embeddings()(h), ref, atol=1e-5, rtol=1e-5)
        assert len(state.layers) == 4 and state.layers[-1].S is not None and float(state.layers[-1].S.norm()) > 0
        perturb(model)
        whole, _ = model(ids)
        skip = model.run(ids, episodic=False)[0]
        assert (whole - skip).abs().max().item() > 1e-3  # the episodic read reaches the logits
        a, s1 = model(ids[:, :17])
        b, s2 = model(ids[:, 17:], state=s1)
        torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=2e-5, rtol=1e-4)


def test_episodic_retrofit_settings_and_errors():
    from cl_arch.hf.retrofit import episodic_settings

    assert episodic_settings(64, 256)["values"] == "onehot" and episodic_settings(64, 32000)["values"] == "embed"
    only = retrofit(tiny("llama"), layers=[], episodic_heads=1, episodic_features=128)
    assert only.block_layers() == [] and only.fast_layers() == [only.episodic]
    assert only(torch.tensor([[1, 2, 3]]))[1].layers[-1].S is not None
    with pytest.raises(ValueError, match="layers is empty"):
        retrofit(tiny("llama"), layers=[])
    with pytest.raises(ValueError, match="EpisodicConfig.values"):
        retrofit(tiny("llama"), layers=[0], episodic_heads=1, episodic_values="sparse")
    with pytest.raises(ValueError, match="episodic_heads=0"):
        retrofit(tiny("llama"), layers=[0], episodic_threshold=2.0)
    with pytest.raises(ValueError, match="already has an episodic"):
        add_episodic_memory(only)
    with pytest.raises(ValueError, match="episodic_heads must be"):
        retrofit(tiny("llama"), layers=[0], episodic_heads=-1)


def test_episodic_retrofit_session_commit_save_load_fold(tmp_path, llama_dir):
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    plain = retrofit(base, layers=[1], n_heads=2, eta_s=1.0)
    perturb(plain)
    blocks_before = {k: v.clone() for k, v in plain.fast.state_dict().items()}
    model = add_episodic_memory(plain, features=256)
    assert all(torch.equal(model.fast.state_dict()[k], v) for k, v in blocks_before.items())
    perturb(model)
    text = list(b"def add(a, b):\n    return a + b\n" * 4)
    s = Session(model, seed=0)
    first = s.observe(text)
    assert s.end_episode()
    assert float(s.P[-1].norm()) > 0  # the state commit: P <- S_T - W0
    t = Session.from_bytes(model, s.to_bytes())
    second = t.observe(text)
    assert float(second[1:].mean()) < float(first[1:].mean())  # a second session starts where the first ended
    d = tmp_path / "rf"
    save_retrofit(model, d, base_name=llama_dir)
    meta = json.loads((d / RETROFIT_CONFIG).read_text())
    assert meta["retrofit"]["episodic"]["features"] == 256
    loaded = load_retrofit(d)
    assert torch.equal(loaded.episodic.R, model.episodic.R)
    assert loaded.episodic.read_scale.item() == 1.0 and loaded.fingerprint() == model.fingerprint()
    ids = torch.tensor([text[:30]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, state=loaded.init_state(1, s.P))[0],
                                   model(ids, state=model.init_state(1, s.P))[0], atol=0, rtol=0)
    fp = model.fingerprint()
    report = fold(model, s)
    assert float(model.episodic.W0.norm()) > 0  # P written into the episodic memory's W0 too
    undo(model, report)
    assert model.fingerprint() == fp


def test_train_episodic_hf_learns_only_its_settings():
    from cl_arch.train.finetune_hf import HFEpisodicConfig, select_trainable_hf, train_episodic_hf

    model = retrofit(tiny("llama"), layers=[1], n_heads=2, episodic_heads=1, episodic_features=256)
    names = select_trainable_hf(model, "fast")
    assert "fast.episodic.read_scale" in names and "fast.episodic.W0" not in names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # spans that repeat a random 48-token phrase: a memory written as it reads predicts the repeats
    g = torch.Generator().manual_seed(0)
    spans = torch.stack([torch.randint(0, V, (48,), generator=g).repeat(6)[:257] for _ in range(4)])
    rec = train_episodic_hf(model, spans, HFEpisodicConfig(steps=25, seq_len=192, chunk=64, lr=5e-2),
                            log=lambda s: None)
    assert rec["learned"]["scale"][0] > 0.3 and rec["final_gain_last10"] > 0.05
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= {"fast.episodic." + n for n in ("key_threshold", "A_log", "beta_logit", "read_scale")}
    assert "fast.episodic.read_scale" in changed
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    with pytest.raises(ValueError, match="seq_len"):
        train_episodic_hf(model, spans[:, :100], HFEpisodicConfig(seq_len=192))


def test_retrofit_add_and_remove_memory_in_place():
    """RetrofitModel.add_memory(EpisodicConfig) adds the episodic memory in place (blocks and base
    unchanged, read scale 0 keeps the logits), memory_states names the slots, remove_memory undoes it."""
    from cl_arch import EpisodicConfig

    model = retrofit(tiny("llama"), layers=[0, 1], n_heads=2)
    perturb(model)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        before = model(ids)[0]
    blocks = {k: v.clone() for k, v in model.fast.state_dict().items()}
    with pytest.raises(ValueError, match="EpisodicConfig"):
        model.add_memory(object())
    with pytest.raises(ValueError, match="named 'episodic'"):
        model.add_memory(EpisodicConfig(name="cache", features=64))
    mem = model.add_memory(EpisodicConfig(features=64, scale=0.0))
    assert model.episodic is mem and model.fast_layer_names() == ["blocks.0", "blocks.1", "episodic"]
    assert all(torch.equal(model.fast.state_dict()[k], v) for k, v in blocks.items())
    with torch.no_grad():
        logits, state = model(ids)
    torch.testing.assert_close(logits, before, atol=0, rtol=0)
    slots = model.memory_states(state)
    assert slots["episodic"].S is not None and slots["episodic"] is state.fast()[-1]
    with pytest.raises(ValueError, match="already has"):
        model.add_memory(EpisodicConfig(features=64))
    assert model.remove_memory("episodic") is mem and model.episodic is None
    with pytest.raises(KeyError, match="no memory named"):
        model.remove_memory("episodic")
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], before, atol=0, rtol=0)
