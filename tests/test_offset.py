"""The offset benchmark (cl_arch.eval.offset): exactness of both variants, what a reset touches, the report."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_arch import PlasticConfig, PlasticTransformer, ReadoutConfig
from cl_arch.eval import offset
from cl_arch.eval.offset import OffsetConfig
from cl_arch.state import AttnLayerState, FastLayerState

W = 16


def _tiny(attn_window=W) -> PlasticTransformer:
    torch.manual_seed(0)
    cfg = PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=16, head_v_dim=16, n_attn_heads=2,
                        attn_window=attn_window, memories=[ReadoutConfig(heads=1)])
    return PlasticTransformer(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three small Python-like files: 412, 306 and 238 bytes."""
    d = tmp_path_factory.mktemp("offset_src")
    paths = []
    for i, n in enumerate((120, 90, 70)):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(n // 10)]
        text = "".join(lines).encode()
        p = d / f"m{i}.py"
        p.write_bytes(text)
        paths.append(str(p))
    return paths


def _whole_pass_bits(model, data: bytes) -> np.ndarray:
    ids = torch.tensor(list(data), dtype=torch.long).unsqueeze(0)
    with torch.no_grad():
        logits, _ = model(ids)
    ce = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
    return (ce.double() / math.log(2.0)).numpy()


def test_model_variant_equals_whole_file_pass(model, files):
    with open(files[0], "rb") as f:
        data = f.read(200)
    ref = _whole_pass_bits(model, data)
    ids = torch.tensor(list(data))
    with torch.no_grad():
        got = offset.stream_losses(model, ids, chunk=W).numpy()
        got256 = offset.stream_losses(model, ids, chunk=256).numpy()
    assert got.shape == (len(data) - 1,)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got256, ref, atol=1e-5, rtol=0)
    # run() buckets exactly these losses (bucket 32, one file): its curve is their bucket means.
    rep = offset.run(OffsetConfig(sources=(files[0],), max_file_bytes=200, min_file_bytes=64, bucket=32, out_dir=None),
                     model)
    want = [ref[b:b + 32].mean() for b in range(0, ref.size, 32)]
    np.testing.assert_allclose([p["y"] for p in rep["methods"]["model"]["curve"]], want, atol=1e-5, rtol=0)


def test_variants_identical_when_fast_memories_write_nothing(files):
    """Zero write strength: S stays at rest, so a reset of S and E must change nothing. A reset that
    also cleared the attention caches, the conv caches or the position would show up here (W0 is
    made non-zero so that the resting read ``W0^T q`` depends on the conv cache through q)."""
    model = _tiny()
    with torch.no_grad():
        for m in model.fast_layers():
            m.W0.normal_(0.0, 0.5)
    rep = offset.run(OffsetConfig(sources=tuple(files), max_file_bytes=200, min_file_bytes=64, bucket=32, out_dir=None),
                     model, _modulation=0.0)
    a = [p["y"] for p in rep["methods"]["model"]["curve"]]
    b = [p["y"] for p in rep["methods"]["reset_every_window"]["curve"]]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert abs(rep["difference"]["beyond_window"]["mean"]) < 1e-5
    with open(files[0], "rb") as f:
        data = f.read(200)
    with torch.no_grad():
        out = offset.file_losses(model, data, W, modulation=0.0)
    np.testing.assert_allclose(out["model"].numpy(), out["reset_every_window"].numpy(), atol=1e-5, rtol=0)


def test_reset_changes_losses_only_after_first_window(model, files):
    with open(files[0], "rb") as f:
        data = f.read(200)
    with torch.no_grad():
        out = offset.file_losses(model, data, W)
    m, r = out["model"].numpy(), out["reset_every_window"].numpy()
    np.testing.assert_array_equal(m[:W], r[:W])  # same computation before the first reset
    assert np.abs(m[W:] - r[W:]).max() > 1e-3


def test_reset_touches_only_fast_S_and_E(model, files):
    """The state handed in at every window after the first: fast S, E at rest; conv, P, KV caches, position kept."""
    seen = []
    orig = model.forward

    def recorder(input_ids, state=None, **kw):
        seen.append(state)
        return orig(input_ids, state=state, **kw)

    model.forward = recorder
    try:
        with torch.no_grad():
            offset.stream_losses(model, torch.arange(60) % 50 + 40, chunk=W, reset_fast=True)
    finally:
        del model.forward
    assert seen[0] is None and len(seen) == 4  # 59 inputs in windows of 16
    for k, st in enumerate(seen[1:], start=1):
        assert st.position == k * W
        for mem, s in zip(model.memories(), st.layers):
            if mem is None:
                assert isinstance(s, AttnLayerState) and s.k is not None and s.k.shape[2] == W - 1
            else:
                assert isinstance(s, FastLayerState) and s.S is None and s.E is None
                assert s.conv is not None and s.conv.abs().sum() > 0


def test_report_json_and_png(model, files, tmp_path):
    offset.run(OffsetConfig(sources=tuple(files), max_file_bytes=100, min_file_bytes=300, bucket=32,
                            out_dir=str(tmp_path), name="off"), model)
    jp, pp = tmp_path / "off.json", tmp_path / "off.png"
    assert jp.is_file() and pp.is_file() and pp.stat().st_size > 1000
    with open(jp) as f:
        j = json.load(f)
    assert set(j["methods"]) == {"model", "reset_every_window"}
    cfg = j["config"]
    assert cfg["window"] == W and cfg["bucket"] == 32 and cfg["n_files"] == 2 == j["n_files"]  # the 238-byte file is skipped
    assert cfg["bytes"] == 200 and len(cfg["files"]) == 2
    assert cfg["model_fingerprint"] == model.fingerprint()
    xs = [p["x"] for p in j["methods"]["model"]["curve"]]
    assert xs == [16.0, 48.0, 80.0, 97.5]  # bucket centres of offsets 0..98
    for d in j["difference"]["buckets"]:
        assert d["n_files"] == 2 and d["ci"][0] <= d["mean"] <= d["ci"][1]
    bw = j["difference"]["beyond_window"]
    assert bw["n_files"] == 2 and bw["bytes"] == 2 * (99 - W) and bw["ci"][0] <= bw["mean"] <= bw["ci"][1]
    assert j["methods"]["reset_every_window"]["summary"]["delta_beyond_window"] == pytest.approx(bw["mean"])


def test_no_window_raises():
    with pytest.raises(ValueError, match="attn_window"):
        offset.run(OffsetConfig(sources=("json",), out_dir=None), _tiny(attn_window=None))
