"""The Triton kernels compile for sm_90 and sm_80 and fit there (no GPU needed).

The interpreter tests check what the kernels compute; these check that every
launch the wrappers make (each autotune config, bf16 and fp32 inputs, K = V = 128)
compiles with Triton's own ptxas and stays within the block's shared memory
and a small spill budget. They run in a subprocess because the interpreter,
which other test files switch on, replaces the compiler.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

# triton is located, not imported: importing it here would fix its interpreter mode
# for the other test files in this process (test_triton_kernels switches it on).
_spec = importlib.util.find_spec("triton")
if _spec is None:
    pytest.skip("triton is not installed", allow_module_level=True)
ptxas = os.path.join(list(_spec.submodule_search_locations)[0], "backends", "nvidia", "bin", "ptxas")
if not os.path.exists(ptxas):
    pytest.skip(f"this triton wheel ships no ptxas ({ptxas})", allow_module_level=True)


def _run(code: str, tmp_path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


def test_every_kernel_launch_fits_sm90_and_sm80(tmp_path):
    # One process per input dtype, side by side: the compiles are independent and single-threaded, and
    # this is the suite's longest test (about 3 minutes in one process on 2 cores).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs, outs = [], []
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / f"resources-{dtype}.json"
        env_d = {**env, "TRITON_CACHE_DIR": str(tmp_path / f"triton-cache-{dtype}")}
        code = (f"from cl_arch.kernels.compile_check import main; "
                f"raise SystemExit(main(['--dtype', {dtype!r}, '--json', {str(out)!r}]))")
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env_d))
        outs.append(out)
    results = [p.communicate(timeout=900) for p in procs]
    rows = []
    for out, (stdout, stderr) in zip(outs, results):
        assert out.exists(), stderr[-3000:]
        rows += json.loads(out.read_text())["rows"]
    bad = [r for r in rows if not r["fits"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['dtype']} sm_{r['arch']} warps={r['num_warps']} "
                              f"stages={r['num_stages']}: stack {r['stack_bytes']} B, shared {r['shared_bytes']} B "
                              f"(limit {r['shared_limit']})" for r in bad)
    for p, (stdout, _) in zip(procs, results):
        assert p.returncode == 0, stdout[-3000:]

    from cl_arch.kernels.plastic import chunk_triton as chunk
    from cl_arch.kernels.plastic import fused_recurrent

    # Every configured launch was compiled, for both archs and both dtypes.
    expected = {(name, c["num_warps"], c["num_stages"]) for name, cfgs in chunk.LAUNCH_CONFIGS.items() for c in cfgs}
    expected |= {(f"_recurrent_{d}_kernel", c["num_warps"], c["num_stages"])
                 for d, cfgs in fused_recurrent.LAUNCH_CONFIGS.items() for c in cfgs}
    for dtype in ("bfloat16", "float32"):
        for arch in (80, 90):
            seen = {(r["kernel"], r["num_warps"], r["num_stages"]) for r in rows
                    if r["dtype"] == dtype and r["arch"] == arch}
            assert expected <= seen, (dtype, arch, sorted(expected - seen))
            assert any(r["kernel"] == "_reward_commit_kernel" for r in rows if r["arch"] == arch)
    assert all(r["registers"] > 0 for r in rows)


def test_check_flags_a_kernel_that_cannot_launch(tmp_path):
    # fp32 "ieee" dots at K = 128 are the case the check was written for: they run on
    # the FMA units and the output kernel then needs local-memory stack far over budget.
    code = """
import json
from cl_arch.kernels import compile_check as cc
import triton.language as tl
la = [l for l in cc.plastic_rule_launches(backward=False, dtype="float32") if l.name == "_chunk_out_kernel"][0]
la.kwargs.update(PREC="ieee", num_warps=4, num_stages=3)
r = cc.compile_launch(la, 90)
print(json.dumps(r.row()))
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not row["fits"], row
    assert row["stack_bytes"] > 1024 or row["shared_bytes"] > row["shared_limit"], row


def test_record_launches_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from cl_arch.kernels import compile_check

    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with compile_check.record_launches():
            pass


def test_autotune_keys_and_restored_arguments_name_kernel_parameters():
    # The autotuned wrappers only exist on a GPU; a misspelt key or restore_value
    # name would surface there first, so check the names against the signatures here.
    import inspect

    from cl_arch.kernels.plastic import chunk_triton as chunk
    from cl_arch.kernels.plastic import fused_recurrent

    for name in chunk.LAUNCH_CONFIGS:
        params = inspect.signature(getattr(chunk, name)).parameters
        assert {"K", "V", "C"} <= set(params), name
        assert set(chunk._RESTORE.get(name, [])) <= set(params), name
    assert set(chunk._RESTORE) <= set(chunk.LAUNCH_CONFIGS)
    for d in fused_recurrent.LAUNCH_CONFIGS:
        params = inspect.signature(getattr(fused_recurrent, f"_recurrent_{d}_kernel")).parameters
        assert {"K", "V", "BV"} <= set(params), d


def test_only_grid_axis_0_grows_with_batch_and_length(tmp_path):
    # CUDA caps grid axes 1 and 2 at 65535 programs; axis 0 is not capped in practice.
    # Many sessions (B * H) or long packed batches (chunks) must land on axis 0 only.
    code = """
import json
from cl_arch.kernels import compile_check as cc
grids = {}
for B, T in ((1, 40), (3, 40), (1, 130)):
    for backend in ("triton_chunk", "triton_recurrent"):
        for la in cc.plastic_rule_launches(K=16, V=32, H=2, T=T, B=B, backend=backend, chunk_size=16):
            grids.setdefault(la.name, set()).add(tuple(la.grid[1:]))
        for la in cc.plastic_rule_launches(K=16, V=32, H=2, T=1, B=B, backend=backend, chunk_size=16):
            grids.setdefault(la.name, set()).add(tuple(la.grid[1:]))
print(json.dumps({k: sorted(v) for k, v in grids.items()}))
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(grids) == 9, sorted(grids)
    for name, tails in grids.items():
        assert len(tails) == 1, (name, tails)
