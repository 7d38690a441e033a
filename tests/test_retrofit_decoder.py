"""cl_arch.hf.decoder.RetrofitDecoder (issue 26): a retrofit's in-place decode step equals its forward token by
token - logits and the final ModelState (KV caches, block memories, episodic memory) - for Llama, Qwen2, Mistral
and GPT-2 bases, with and without the episodic memory, batch 1 and 3, per-row modulation, a prefilled state passed
in and out; sessions decode through it and give the forward path's tokens; what it cannot decode falls back.
The compiled step's test runs where ``CL_ARCH_TEST_COMPILE=1`` (inductor's compile of a tiny base: ~30 s)."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cl_arch import Session  # noqa: E402
from cl_arch.decode.cache import decoder_unsupported  # noqa: E402
from cl_arch.hf import retrofit  # noqa: E402
from cl_arch.hf.decoder import RetrofitDecoder  # noqa: E402
from cl_arch.state import AttnLayerState, ModelState  # noqa: E402

torch.set_num_threads(1)
V = 256


def tiny(family: str, sliding=None):
    torch.manual_seed(0)
    T = transformers
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=512)).eval()
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
    cfg, cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                "mistral": (T.MistralConfig, T.MistralForCausalLM)}[family]
    if family == "mistral":
        kw["sliding_window"] = sliding
    return cls(cfg(**kw)).eval()


def build(family: str, episodic: bool, dtype=torch.float64, sliding=None):
    """A retrofit whose added layers change the logits (their read paths given weight, as after training)."""
    kw = dict(episodic_heads=1, episodic_features=128) if episodic else {}
    model = retrofit(tiny(family, sliding), n_heads=2, head_k_dim=8, head_v_dim=8, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.block_layers():
            m.o_proj.weight.copy_(torch.randn(m.o_proj.weight.shape, generator=g) * 0.3)
        if model.episodic is not None:
            model.episodic.read_scale.fill_(2.0)
    return model.to(dtype).eval()


def assert_states(ref: ModelState, got: ModelState, tol: float) -> None:
    assert ref.position == got.position and len(ref.layers) == len(got.layers)
    for i, (a, b) in enumerate(zip(ref.layers, got.layers)):
        for f in ("k", "v") if isinstance(a, AttnLayerState) else ("S", "E", "P", "conv"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), f"layers[{i}].{f}: {x is None} vs {y is None}"
            if x is not None:
                assert x.shape == y.shape, f"layers[{i}].{f}: {tuple(x.shape)} vs {tuple(y.shape)}"
                err = (x - y).abs().max().item()
                assert err <= tol, f"layers[{i}].{f} differs by {err}"


def run_both(model, B: int, compile=False, prefill: int = 7, n_tokens: int = 13, tol: float = 1e-10):
    """Prefill with the forward, then decode ``n_tokens`` with the forward and with the decoder (row 1 with
    writes off when B > 1, the others at random strengths); compare logits every token and the final state."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (B, prefill + n_tokens), generator=g)
    mod = torch.rand(B, n_tokens, generator=g, dtype=torch.float64).to(next(model.parameters()).dtype)
    if B > 1:
        mod[1] = 0.0
    with torch.no_grad():
        _, state = model(ids[:, :prefill])
        ref, s = [], state
        for t in range(n_tokens):
            lg, s = model(ids[:, prefill + t:prefill + t + 1], state=s, modulation=mod[:, t:t + 1])
            ref.append(lg[:, 0])
    dec = RetrofitDecoder(model, B, max_len=prefill + n_tokens + 3, compile=compile)
    dec.load_state(state)
    dec._logits.fill_(float("nan"))  # a step that wrote nothing would fail below
    for t in range(n_tokens):
        got = dec.step(ids[:, prefill + t], modulation=mod[:, t])
        err = (got - ref[t]).abs().max().item()
        assert err <= tol, f"token {t}: logits differ by {err}"
    assert_states(s, dec.state(), tol)
    return dec, s


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("episodic", [False, True], ids=["blocks", "episodic"])
@pytest.mark.parametrize("B", [1, 3], ids=["B1", "B3"])
def test_step_equals_forward_float64(family, episodic, B):
    run_both(build(family, episodic), B)


def test_float32_and_state_round_trip():
    model = build("llama", True, dtype=torch.float32)
    dec, ref = run_both(model, 2, tol=2e-5)
    before = [t.clone() for t in dec.cache.layers[0].keys]
    dec.load_state(dec.state())  # a state read back and loaded again leaves the buffers as they were
    assert all(torch.equal(a, b) for a, b in zip(before, dec.cache.layers[0].keys))
    rows = dec.row_states()
    assert [r.position for r in rows] == [ref.position] * 2
    assert_states(ModelState.stack(rows), ref, 2e-5)
    fresh = RetrofitDecoder(model, 1, max_len=8, compile=False)
    assert_states(fresh.state(), model.materialize_state(model.init_state(1), 1), 0.0)


def test_errors_and_unsupported():
    model = build("llama", False)
    with pytest.raises(ValueError, match="max_len"):
        RetrofitDecoder(model, 1, compile=False)
    dec = RetrofitDecoder(model, 2, max_len=4, compile=False)
    with torch.no_grad():
        _, st = model(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond max_len"):
        dec.load_state(st)
    with pytest.raises(ValueError, match="one position"):
        dec.load_rows([_row(model, 2), _row(model, 3)])
    for _ in range(4):
        dec.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        dec.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        dec.step(torch.zeros(2, dtype=torch.int32))
    slid = build("mistral", False, sliding=4)
    assert "sliding" in decoder_unsupported(slid)
    with pytest.raises(ValueError, match="sliding"):
        RetrofitDecoder(slid, 1, max_len=8, compile=False)
    with pytest.raises(ValueError, match="sliding"):
        Session(slid, decoder="eager").generate([1, 2, 3], 4, temperature=0)
    auto = Session(slid, decoder="auto")
    assert auto.generate([1, 2, 3], 4, temperature=0) == Session(slid, decoder=None).generate([1, 2, 3], 4,
                                                                                                temperature=0)


def _row(model, n: int) -> ModelState:
    with torch.no_grad():
        return model(torch.zeros(1, n, dtype=torch.long))[1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_session_decodes_through_it(temperature):
    model = build("llama", True, dtype=torch.float32)
    runs = {}
    for mode in ("eager", None):
        s = Session(model, seed=5, decoder=mode)
        toks = s.generate([3, 1, 4, 1, 5], max_new_tokens=12, temperature=temperature)
        toks += s.generate([9, 2], max_new_tokens=6, temperature=temperature)  # a second call continues the stream
        runs[mode] = (toks, s.state)
    assert runs["eager"][0] == runs[None][0]
    assert_states(runs[None][1], runs["eager"][1], 1e-4)
    cache = model.__dict__["_cl_arch_decoders"]
    assert any(isinstance(e.decoder, RetrofitDecoder) for e in cache.entries.values())


def test_batch_generate_same_as_solo():
    model = build("gpt2", True, dtype=torch.float32)
    prompts = [[5, 6, 7], [8, 9, 10]]
    same = Session.batch_generate([Session(model, decoder="eager") for _ in prompts], prompts, 6, temperature=0)
    solo = [Session(model, decoder=None).generate(p, 6, temperature=0) for p in prompts]
    assert same == solo
    mixed = [[5, 6, 7], [8, 9, 10, 11, 12]]  # rows at two positions: the forward path
    got = Session.batch_generate([Session(model, decoder="eager") for _ in mixed], mixed, 6, temperature=0)
    assert got == [Session(model, decoder=None).generate(p, 6, temperature=0) for p in mixed]


@pytest.mark.skipif(os.environ.get("CL_ARCH_TEST_COMPILE") != "1",
                    reason="inductor's compile takes ~30 s; CL_ARCH_TEST_COMPILE=1 runs it")
def test_compiled_equals_eager():
    model = build("llama", True, dtype=torch.float32)
    dec, _ = run_both(model, 2, compile=True, tol=2e-5)
    assert dec.compile is True and dec._compiled is not None
