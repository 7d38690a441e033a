"""Decode speed (issue 26): the episodic memory's sparse step against the dense rule, and the shipped
model's single-session decode with the arithmetic ceiling beside it. One process, one thread, medians.

    python benchmarks/bench_decode.py [--tokens 100] [--repeats 7] [--check-tokens 300] [--threads 1]
    python benchmarks/bench_decode.py --part decoder [--batches 1,8,64] [--compile auto|off] [--compile-options]

1. The episodic step at the shipped size (F = 2048, V = 256, 1 head, batch 1), on the keys the shipped model
   computes over a text (``phi(h)`` of its final hidden states), per token:
   ``dense``: what a one-token call ran before the sparse step (``run_rule`` -> the recurrent backend on
   ``S - M``; the error write: ``error_write``'s loop plus the trace, which converts the state from and to the
   dense layout every call: its own lazy loop until f89d03c, ``sparse_error_write`` since), ``naive``: the dense
   reference
   (``kernels/episodic/naive.py``), ``rows``: the memory's one-token step now (``kernels/episodic/step.py``:
   new dense ``S``, ``E`` per token, rows for the rest), ``sparse``: the in-place step on the lazily decayed
   state (``kernels/episodic/sparse.py``). The outputs of every variant are compared with ``dense``'s.
   1b. The whole memory per token from the final hidden states (its keys included): its one-token call with
   the dense rule and with the sparse step, and ``kernels/episodic/decoder.py``'s in-place ``EpisodicDecoder``.
2. ``cl_arch.load_default()`` in a ``cl_arch.Session``: tokens/s of ``generate`` with adaptation on and off,
   with the episodic memory's sparse step off (as before) and on, interleaved; the generated tokens and
   logits of ``--check-tokens`` tokens with both steps, for the delta and the error write.
3. The ceiling: the core's float32 matmul rate (a 512^3 product, and the shapes of a decode step: a vector
   times a matrix) and the matmul FLOPs of one decode step (``torch.utils.flop_counter``).

4. ``--part decoder`` (``cl_arch.decode.Decoder``, issue 26's second part): tokens/s of ``Session.generate``,
   the Decoder's eager step and its ``torch.compile``d step, adaptation on (a committed ``P``: the session's
   after a reward) and off (no ``P``), aggregate tokens/s at each batch size (greedy: each step's argmax fed
   back, nothing read to the host), with the ceiling of part 3 beside them.

Prints tables; writes ``benchmarks/out/bench_decode.json`` (``--part decoder``: ``bench_decode_decoder.json``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import cl_arch
from cl_arch.decode import Decoder
from cl_arch.flops import flop_counter
from cl_arch.io import write_json
from cl_arch.kernels.episodic import (
    SparseEpisodicState,
    active,
    naive_episodic_step,
    sparse_delta_step,
    sparse_error_step,
)
from cl_arch.kernels.episodic.decoder import EpisodicDecoder
from cl_arch.kernels.episodic.step import dense_delta_step, dense_error_step
from cl_arch.kernels.error_write import error_write
from cl_arch.memory import OutputContext
from cl_arch.state import FastLayerState, StepContext

TEXT = (b"import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Parse the arguments and run.\"\"\"\n"
        b"    args = parse(argv or sys.argv[1:])\n    for name in sorted(os.listdir(args.root)):\n"
        b"        path = os.path.join(args.root, name)\n        if os.path.isfile(path):\n"
        b"            print(name, os.path.getsize(path))\n    return 0\n\n\nclass Config:\n"
        b"    def __init__(self, root, depth=1):\n        self.root = root\n        self.depth = depth\n") * 4


def interleaved(runs: dict, repeats: int, setups: dict | None = None, stat=statistics.median) -> dict:
    """Median (``stat``) seconds of each ``runs[name]()`` (``runs[name](setups[name]())`` where a setup is
    given, made outside the timing), the variants taken in turn each round so a change of load hits them
    alike; the first round is a warm-up."""
    setups = setups or {}
    ts = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, fn in runs.items():
            arg = (setups[name](),) if name in setups else ()
            t0 = time.perf_counter()
            fn(*arg)
            if i:
                ts[name].append(time.perf_counter() - t0)
    return {name: stat(t) for name, t in ts.items()}


def shipped_context(model, n_tokens: int):
    """The episodic memory's :class:`OutputContext` over TEXT (``h [1, T, d]``, ids, logits before its read)."""
    ids = torch.tensor([list(TEXT[:n_tokens + 1])])
    captured = {}

    def hook(mod, args, kwargs, out):
        captured["out"] = args[0] if args else kwargs["out"]

    handle = model.episodic.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return captured["out"]


def shipped_keys(model, n_tokens: int):
    """``q, k [T, F]`` the episodic memory's read and write keys over TEXT, ``ids [T]``, base logits ``[T, V]``."""
    ep = model.episodic
    o = shipped_context(model, n_tokens)
    with torch.no_grad():
        q, k, _, _ = ep.project_qkv(o.h, None)
    return q[0, 1:, 0], k[0, 1:, 0], o.ids[0, 1:], o.logits[0, 1:].float()


def bench_step(model, n_tokens: int, repeats: int) -> dict:
    """Part 1: per-token time of each variant of the episodic step, and their outputs against ``dense``."""
    ep = model.episodic
    q, k, ids, base = shipped_keys(model, n_tokens)
    T, Fdim = q.shape
    V = ep.head_v_dim
    gen = torch.Generator().manual_seed(0)
    M = 0.01 * torch.randn(1, 1, Fdim, V, generator=gen)  # a session's P after commits (W0 is zero)
    S0 = M + 0.01 * torch.randn(1, 1, Fdim, V, generator=gen)
    beta = torch.sigmoid(ep.beta_logit.detach()).view(1, 1)
    g = (-ep.A_log.detach().exp()).view(1, 1)
    v = F.one_hot(ids, V).float()
    qs, ks = q.view(T, 1, 1, Fdim), k.view(T, 1, 1, Fdim)
    if not torch.equal(ks[1:], qs[:-1]):
        raise RuntimeError("the write key of a token is not the read key of the one before")
    scale = torch.ones(1)
    outs = {}

    def run_dense_delta():
        st, o = FastLayerState(S=S0, E=None, P=M), []
        with torch.no_grad():
            for t in range(T):
                x, S, E = ep.run_rule(qs[t][:, None], ks[t][:, None], v[t].view(1, 1, 1, V), beta.view(1, 1, 1),
                                      g.view(1, 1, 1), st, None, True, scale=1.0)
                st = FastLayerState(S=S, E=E, P=M)
                o.append(x[0, 0])
        outs["dense"] = torch.stack(o)

    def run_naive():
        S, E, o = S0, None, []
        for t in range(T):
            x, S, E = naive_episodic_step(qs[t], ks[t], v[t].view(1, 1, V), beta, g, S, M, E)
            o.append(x)
        outs["naive"] = torch.stack(o)

    # the sparse steps find a token's active read features once: its write key is the last read key
    def run_rows():
        S, E, o, ka = S0, None, [], active(ks[0], nonneg=True)
        for t in range(T):
            qa = active(qs[t], nonneg=True)
            x, S, E = dense_delta_step(S, E, M, qa, ka, v[t].view(1, 1, V), beta, g)
            o.append(x)
            ka = qa
        outs["rows"] = torch.stack(o)

    def new_state(p=None):
        return SparseEpisodicState.from_dense(S0, M, p=p)

    def run_sparse(st):
        o, ka = torch.empty(T, 1, 1, V), active(ks[0], nonneg=True)
        for t in range(T):
            qa = active(qs[t], nonneg=True)
            sparse_delta_step(st, qa, ka, v[t].view(1, 1, V), beta, g, out=o[t])
            ka = qa
        outs["sparse"] = o

    def run_dense_error():
        S, E, p, o = S0, None, None, []
        with torch.no_grad():
            for t in range(T):
                x, S1, p = error_write(qs[t][:, None], ks[t][:, None], ids[t].view(1, 1), base[t].view(1, 1, V),
                                       beta.view(1, 1, 1), g.view(1, 1, 1), scale, S, M, p)
                E = (S1 - M) + g.exp()[..., None, None] * ((0 if E is None else E) - (S - M))
                S = S1
                o.append(x[0, 0])
        outs["error dense"] = torch.stack(o)

    def run_rows_error():
        S, E, p, o, ka = S0, None, None, [], active(ks[0], nonneg=True)
        for t in range(T):
            qa = active(qs[t], nonneg=True)
            x, S, E, p = dense_error_step(S, E, M, qa, ka, ids[t].view(1), base[t].view(1, V), beta, g, scale, p)
            o.append(x[0])
            ka = qa
        outs["error rows"] = torch.stack(o)

    def run_sparse_error(st):
        o, ka = torch.empty(T, 1, V), active(ks[0], nonneg=True)
        for t in range(T):
            qa = active(qs[t], nonneg=True)
            sparse_error_step(st, qa, ka, ids[t].view(1), base[t].view(1, V), beta, g, scale, out=o[t])
            ka = qa
        outs["error sparse"] = o[:, 0]

    runs = {"dense": run_dense_delta, "naive": run_naive, "rows": run_rows, "sparse": run_sparse,
            "error dense": run_dense_error, "error rows": run_rows_error, "error sparse": run_sparse_error}
    setups = {"sparse": new_state, "error sparse": lambda: new_state(torch.zeros(1, V))}
    per_token = {name: t / T for name, t in interleaved(runs, repeats, setups).items()}
    diffs = {name: float((outs[name].reshape(T, V) - outs["error dense" if name.startswith("error") else
                                                            "dense"].reshape(T, V)).abs().max()) for name in runs}
    nnz = (q != 0).sum(-1).float()
    return {"tokens": T, "features": Fdim, "values": V, "active_median": float(nnz.median()),
            "active_fraction": float(nnz.mean() / Fdim), "per_token_s": per_token,
            "speedup_over_dense": {n: per_token["error dense" if n.startswith("error") else "dense"] / s
                                   for n, s in per_token.items()},
            "max_abs_diff_vs_dense": diffs}


def bench_memory(model, n_tokens: int, repeats: int) -> dict:
    """Part 1b: the whole memory per token from the final hidden states (keys included): its one-token call
    with the dense rule and with the sparse step (new dense S, E per token), and :class:`EpisodicDecoder`
    (in place). Reads compared with the dense call's."""
    ep = model.episodic
    out = shipped_context(model, n_tokens)
    T, V = out.h.shape[1], ep.head_v_dim
    gen = torch.Generator().manual_seed(0)
    P = 0.01 * torch.randn(1, *ep.W0.shape, generator=gen)
    reads = {}

    def call(sparse):
        def run():
            ep.sparse_decode = sparse
            st, r = FastLayerState(S=ep.initial_state(1, P).clone(), P=P), []
            with torch.no_grad():
                for t in range(T):
                    x, st = ep(OutputContext(out.h[:, t:t + 1], out.ids[:, t:t + 1], out.embed, out.head,
                                             out.logits[:, t:t + 1]), st, StepContext())
                    r.append(x[0, 0])
            reads["memory call, sparse step" if sparse else "memory call, dense rule"] = torch.stack(r)
        return run

    def new_decoder():
        return EpisodicDecoder(ep.R, ep.key_threshold, torch.sigmoid(ep.beta_logit), -ep.A_log.exp(), ep.read_scale,
                               SparseEpisodicState.from_dense(ep.initial_state(1, P), (ep.W0, P)))

    def run_decoder(dec):
        r = torch.empty(T, V)
        for t in range(T):
            r[t] = dec.step(out.h[:, t], out.ids[:, t])
        reads["decoder, in place"] = r

    runs = {"memory call, dense rule": call(False), "memory call, sparse step": call(True),
            "decoder, in place": run_decoder}
    per_token = {name: t / T for name, t in interleaved(runs, repeats, {"decoder, in place": new_decoder}).items()}
    ep.sparse_decode = True
    ref = reads["memory call, dense rule"]
    return {"tokens": T, "per_token_s": per_token,
            "speedup_over_dense": {n: per_token["memory call, dense rule"] / t for n, t in per_token.items()},
            "max_abs_diff_vs_dense": {n: float((r - ref).abs().max()) for n, r in reads.items()}}


def session_speed(model, new_tokens: int, repeats: int) -> dict:
    """Part 2: decode tokens/s of ``Session.generate``, adaptation on/off x sparse step off/on, interleaved."""
    ep = model.episodic
    prompt = list(TEXT[:32])
    sessions = {}
    for adapt in (True, False):
        s = cl_arch.Session(model, adapt=adapt, seed=0)
        s.generate(prompt, max_new_tokens=16, seed=0)
        if adapt:
            s.reward(1.0)  # a non-zero P: the resting state the memory decays toward
        sessions["on" if adapt else "off"] = s
    times = {(a, sp): [] for a in sessions for sp in (False, True)}
    for _ in range(repeats):
        for (a, sp), ts in times.items():
            ep.sparse_decode = sp
            s = sessions[a]
            s.generate(prompt, max_new_tokens=1, seed=0)  # the prompt read outside the timing
            t0 = time.perf_counter()
            s.generate([], max_new_tokens=new_tokens, seed=0)
            ts.append(time.perf_counter() - t0)
            s.end_episode()
    ep.sparse_decode = True
    med = {f"adapt {a}, sparse {'on' if sp else 'off'}": new_tokens / statistics.median(ts)
           for (a, sp), ts in times.items()}
    return {"new_tokens": new_tokens, "repeats": repeats, "tokens_per_s": med}


def same_tokens(model, n_tokens: int) -> dict:
    """Part 2: a session's tokens and logits over ``n_tokens`` with the dense and the sparse step, per write."""
    ep = model.episodic
    out = {}
    for write in ("delta", "error"):
        if write == "error":
            model.set_write("episodic", "error", beta=0.5, scale=1.0)
        runs = []
        for sp in (False, True):
            ep.sparse_decode = sp
            s = cl_arch.Session(model, adapt=True, seed=0)
            logits = []
            absorb = s._absorb

            def keep(ids, lg, st, absorb=absorb, logits=logits):
                logits.append(lg[-1].clone())
                return absorb(ids, lg, st)

            s._absorb = keep
            toks = s.generate(list(TEXT[:24]), max_new_tokens=n_tokens, seed=0)
            runs.append((toks, torch.stack(logits)))
        (t0, z0), (t1, z1) = runs
        out[write] = {"tokens_equal": t0 == t1, "logits_max_abs_diff": float((z0 - z1).abs().max()),
                      "logits_max_rel_diff": float(((z0 - z1).abs() / z0.abs().clamp(min=1.0)).max())}
    ep.sparse_decode = True
    return out


def matmul_rate(repeats: int) -> dict:
    """Part 3: float32 GFLOP/s of the core on a 512^3 product and on a decode step's shapes (vector x matrix),
    from the fastest of the repeats."""
    gen = torch.Generator().manual_seed(0)
    rates = {}
    for name, (m, k, n) in {"512x512x512": (512, 512, 512), "1x128x512 (a decode matvec)": (1, 128, 512),
                            "1x128x256 (the head)": (1, 128, 256)}.items():
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        inner = max(1, int(2e7 // (2 * m * k * n)))

        def run(a=a, b=b, inner=inner):
            for _ in range(inner):
                torch.mm(a, b)

        # the core's rate: the fastest repeat (other jobs on the machine only ever slow a product down)
        rates[name] = 2 * m * k * n * inner / interleaved({name: run}, max(repeats, 9), stat=min)[name] / 1e9
    return rates


def step_flops(model) -> dict:
    """Part 3: matmul FLOPs of one decode token of a session (flop_counter), the sparse step off and on."""
    ep = model.episodic
    out = {}
    for sp in (False, True):
        ep.sparse_decode = sp
        s = cl_arch.Session(model, adapt=True, seed=0)
        s.generate(list(TEXT[:32]), max_new_tokens=2, seed=0)
        with flop_counter() as fc:
            s.generate([], max_new_tokens=1, seed=0)
        out["sparse" if sp else "dense"] = fc.get_total_flops()
    ep.sparse_decode = True
    return out


def decoder_speed(model, tokens: int, repeats: int, batches: list, compile_mode: str,
                  compare_options: bool = False) -> dict:
    """Part 4: tokens/s of Session.generate and of the Decoder (eager, compiled), adaptation on/off, per batch;
    every variant of one batch size timed in turn each round (``interleaved``). ``compare_options``: also the
    step compiled with inductor's default settings instead of the Decoder's ``COMPILE_OPTIONS``."""
    prompt = list(TEXT[:32])
    s = cl_arch.Session(model, adapt=True, seed=0)
    s.generate(prompt, max_new_tokens=16, seed=0)
    s.reward(1.0)  # a committed P: the resting state every memory decays toward
    P_on = [None if p is None else (p[0] if p.dim() == 4 else p) for p in s.P]
    sessions = {"on": s, "off": cl_arch.Session(model, adapt=False, seed=0)}
    res = {"tokens": tokens, "repeats": repeats, "tokens_per_s": {}, "compile_s": {}, "compile": compile_mode}

    def gen_run(sess):
        sess.generate(prompt, max_new_tokens=1, seed=0)  # the prompt read outside the timing
        return lambda: (sess.generate([], max_new_tokens=tokens, seed=0), sess.end_episode())

    sess_t = interleaved({a: (lambda a=a: gen_run(sessions[a])()) for a in sessions}, repeats)
    for a, t in sess_t.items():
        res["tokens_per_s"][f"Session.generate, batch 1, adapt {a}"] = (tokens + 1) / t  # + the prompt's sampled one
    modes = [("eager", False, None)]
    if compile_mode != "off":
        modes.append(("compiled", True, None))
        if compare_options:
            modes.append(("compiled (inductor defaults)", True, {}))
    for B in batches:
        ids = torch.tensor([prompt] * B)
        runs, setups = {}, {}
        for kind, comp, options in modes:
            # one decoder per batch size and mode, its buffers reloaded between runs: a compiled step is
            # compiled once per decoder (dynamo guards on the instance)
            dec = Decoder(model, B, compile=comp)
            if options is not None:
                dec.compile_options = options
            states = {}
            for a in ("on", "off"):
                dec.prefill(ids, model.init_state(B, P_on if a == "on" else None))
                states[a] = dec.state()
            first = ids[:, -1].clone()
            if comp:
                t0 = time.perf_counter()
                try:
                    dec.step(first)
                except Exception as e:  # noqa: BLE001 - reported, the eager rows still run
                    res["compile_s"][f"{kind}, batch {B}"] = f"failed: {type(e).__name__}: {e}"[:300]
                    continue
                res["compile_s"][f"{kind}, batch {B}"] = time.perf_counter() - t0

            def run(dec=dec, first=first):
                tok = first
                for _ in range(tokens):
                    tok = dec.step(tok).argmax(-1)

            for a in ("on", "off"):
                name = f"Decoder {kind}, batch {B}, adapt {a}"
                runs[name] = lambda _, run=run: run()
                setups[name] = lambda dec=dec, st=states[a]: dec.load_state(st)
        for name, t in interleaved(runs, repeats, setups).items():
            res["tokens_per_s"][name] = B * tokens / t
    return res


def print_decoder(res: dict, ceiling: dict) -> None:
    tps = res["tokens_per_s"]
    print(f"\nshipped model decode, {res['tokens']} tokens per run, median of {res['repeats']}, aggregate tokens/s")
    print(f"{'variant':62s}{'tokens/s':>10s}{'on/off time':>13s}")
    for name, v in tps.items():
        pair = name.replace("adapt on", "adapt off")
        ratio = f"{tps[pair] / v:13.3f}" if name.endswith("adapt on") and pair in tps else ""
        print(f"{name:62s}{v:10.1f}{ratio}")
    for kind in ("eager", "compiled", "compiled (inductor defaults)"):
        b = sorted({int(n.split("batch ")[1].split(",")[0]) for n in tps if f"Decoder {kind}" in n})
        if len(b) > 1 and f"Decoder {kind}, batch {b[0]}, adapt on" in tps:
            print(f"  {kind}: batch {b[-1]} / batch {b[0]} aggregate (adapt on): "
                  f"{tps[f'Decoder {kind}, batch {b[-1]}, adapt on'] / tps[f'Decoder {kind}, batch {b[0]}, adapt on']:.1f}x")
    for name, v in tps.items():
        dflt = name.replace("Decoder compiled,", "Decoder compiled (inductor defaults),")
        if dflt != name and dflt in tps:
            print(f"  {name}: {v / tps[dflt]:.2f}x the step compiled with inductor's defaults")
    for name, t in res["compile_s"].items():
        print(f"  first compiled step ({name}): " + (f"{t:.1f} s" if isinstance(t, float) else t))
    print("  ceiling (part 3): " + ", ".join(f"{k} step {v:,.0f} tokens/s" for k, v in ceiling.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=100, help="tokens per timed run (the step and the session)")
    ap.add_argument("--check-tokens", type=int, default=300, help="tokens compared between the dense and sparse step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_decode.json"))
    ap.add_argument("--part", choices=("all", "decoder"), default="all", help="decoder: part 4 and the ceiling only")
    ap.add_argument("--batches", default="1,8,64", help="part 4's batch sizes")
    ap.add_argument("--compile", choices=("auto", "off"), default="auto", help="part 4: time the compiled step too")
    ap.add_argument("--compile-options", action="store_true",
                    help="part 4: also time the step compiled with inductor's defaults (not Decoder.compile_options)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = cl_arch.load_default()
    if a.part == "decoder":
        rates, flops = matmul_rate(a.repeats), step_flops(model)
        ceiling = {n: rates["1x128x512 (a decode matvec)"] * 1e9 / f for n, f in flops.items()}
        res = decoder_speed(model, a.tokens, a.repeats, [int(b) for b in a.batches.split(",")], a.compile,
                           a.compile_options)
        print_decoder(res, ceiling)
        out = a.out.replace("bench_decode.json", "bench_decode_decoder.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_json(out, {"threads": a.threads, "torch": torch.__version__, "decoder": res, "matmul_gflops": rates,
                         "decode_step_matmul_flops": flops, "ceiling_tokens_per_s_matvec_rate": ceiling,
                         "targets": {"tokens_per_s_batch1_adapt_on": 1000, "on_off_time_ratio": 1.10,
                                     "batch64_over_batch1": 20}})
        print(f"wrote {out}")
        return
    step = bench_step(model, a.tokens, a.repeats)
    print(f"episodic step, F={step['features']} V={step['values']} 1 head, batch 1, {step['tokens']} tokens of the "
          f"shipped model's keys (active features: median {step['active_median']:.0f}, "
          f"{100 * step['active_fraction']:.1f}%)")
    print(f"{'variant':16s}{'us/token':>10s}{'x dense':>9s}{'max |o - dense|':>17s}")
    for name, t in step["per_token_s"].items():
        print(f"{name:16s}{1e6 * t:10.1f}{step['speedup_over_dense'][name]:9.1f}"
              f"{step['max_abs_diff_vs_dense'][name]:17.2e}")
    mem = bench_memory(model, a.tokens, a.repeats)
    print(f"\nthe episodic memory per token from the final hidden states (keys included), {mem['tokens']} tokens")
    print(f"{'variant':28s}{'us/token':>10s}{'x dense':>9s}{'max |read - dense|':>20s}")
    for name, t in mem["per_token_s"].items():
        diff = mem["max_abs_diff_vs_dense"][name]
        print(f"{name:28s}{1e6 * t:10.1f}{mem['speedup_over_dense'][name]:9.1f}{diff:20.2e}")
    speed = session_speed(model, a.tokens, a.repeats)
    rates = matmul_rate(a.repeats)
    flops = step_flops(model)
    print(f"\nshipped model, Session.generate, {a.tokens} tokens, {a.threads} thread(s), median of {a.repeats}")
    for name, tps in speed["tokens_per_s"].items():
        print(f"  {name:28s}{tps:8.1f} tokens/s")
    on_before, on_after = speed["tokens_per_s"]["adapt on, sparse off"], speed["tokens_per_s"]["adapt on, sparse on"]
    off_after = speed["tokens_per_s"]["adapt off, sparse on"]
    print(f"  sparse step: adapt-on decode {on_after / on_before:.2f}x faster; on/off time ratio "
          f"{off_after / on_after:.3f}")
    print("\nceiling: core float32 matmul GFLOP/s " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    peak, vec = rates["512x512x512"], rates["1x128x512 (a decode matvec)"]
    for name, fl in flops.items():
        print(f"  one decode token ({name} step): {fl / 1e6:.2f} MFLOP of matmul -> ceiling "
              f"{peak * 1e9 / fl:,.0f} tokens/s at the 512^3 rate, {vec * 1e9 / fl:,.0f} at the matvec rate")
    check = same_tokens(model, a.check_tokens)
    for write, r in check.items():
        print(f"{a.check_tokens} tokens, write {write!r}: tokens equal {r['tokens_equal']}, logits max |diff| "
              f"{r['logits_max_abs_diff']:.2e} (relative {r['logits_max_rel_diff']:.2e})")
    res = {"threads": a.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "fingerprint": cl_arch.load_default().fingerprint(), "step": step, "memory": mem, "session": speed,
           "matmul_gflops": rates, "decode_step_matmul_flops": flops,
           "ceiling_tokens_per_s": {n: peak * 1e9 / f for n, f in flops.items()},
           "ceiling_tokens_per_s_matvec_rate": {n: vec * 1e9 / f for n, f in flops.items()}, "same_tokens": check,
           "targets": {"sparse_step_speedup": 10.0}}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    write_json(a.out, res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
