"""Overhead of retrofitted fast memories (issue 15): decode ms/token and training tokens/s of a
transformers Llama with and without the added layers, in one process, rows interleaved.

Rows:
- ``decode``: a prompt, then one token per step with the cache carried. ``base``: the Llama alone,
  a ``DynamicCache`` kept across steps (how transformers decodes). ``retrofit``: the
  :class:`cl_arch.hf.RetrofitModel` (its KV caches converted to and from the ModelState each step,
  plus the fast memories' recurrent step).
- ``decode retrofit + episodic``: the retrofit with an episodic memory after the final norm too
  (``--episodic-features`` F, one head, one-hot values over the 256 bytes; 0 skips the row).
- ``... decoder`` / ``... decoder compiled``: the same retrofits through :class:`cl_arch.hf.decoder.RetrofitDecoder`
  (what sessions decode through: the KV in a ``StaticCache``, the memories' in-place slots), eager and
  ``torch.compile``-d; ``base static compiled``: the Llama alone with a ``StaticCache`` under ``torch.compile``
  (transformers' own fastest decode), the baseline of the compiled rows.
- ``matmul MFLOP/token``: ``torch.utils.flop_counter`` over one decode token of the base and of each retrofit's
  decoder (the episodic memory's sparse step), whose ratio is the arithmetic floor of the decode ratios.
- ``train``: forward + backward + AdamW step of the next-token loss on ``[batch, seq]`` blocks.
  ``base (all)``: every base weight trained; ``retrofit (all)``: the same plus the added layers;
  ``retrofit (added only)``: the base frozen, as ``cl-arch finetune --hf-model`` trains.

    OMP_NUM_THREADS=1 python benchmarks/bench_retrofit.py

Prints the medians and ratios and writes ``benchmarks/out/bench_retrofit.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cl_arch.decode.decoder import COMPILE_OPTIONS
from cl_arch.hf import retrofit
from cl_arch.io import write_json


def build(d: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)).eval()


@torch.no_grad()
def decode_base(base, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per decoded token, the Llama alone with a DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    out = base(input_ids=prompt, cache=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = base(input_ids=tok, cache=out.cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def decode_retrofit(model, prompt: torch.Tensor, steps: int) -> float:
    logits, state = model(prompt)
    tok = logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = model(tok, state=state)
        tok = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def decode_base_static(base, prompt: torch.Tensor, steps: int, compiled) -> float:
    """Seconds per decoded token, the Llama alone with a StaticCache, its forward ``compiled`` (or eager)."""
    from transformers import StaticCache

    cache = StaticCache(config=base.config, max_cache_len=prompt.shape[1] + steps + 8)
    out = base(input_ids=prompt, cache=cache, use_cache=True)
    fn = compiled if compiled is not None else base
    tok, pos = out.logits[:, -1:].argmax(-1), torch.tensor([[prompt.shape[1]]])
    for i in range(3):  # the compile (first call) and warm-up, outside the timing
        tok = fn(input_ids=tok, cache=cache, use_cache=True, position_ids=pos + i).logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for i in range(3, steps):
        tok = fn(input_ids=tok, cache=cache, use_cache=True, position_ids=pos + i).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / (steps - 3)


@torch.no_grad()
def decode_decoder(dec, model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per decoded token through a RetrofitDecoder (the prompt read by the model's forward)."""
    logits, state = model(prompt)
    dec.load_state(state)
    tok = logits[:, -1].argmax(-1)
    for _ in range(3):
        tok = dec.step(tok).argmax(-1)
    t0 = time.perf_counter()
    for _ in range(3, steps):
        tok = dec.step(tok).argmax(-1)
    return (time.perf_counter() - t0) / (steps - 3)


@torch.no_grad()
def token_flops(fn) -> float:
    """Matmul FLOPs of ``fn()`` (one decode token)."""
    from cl_arch.flops import flop_counter

    with flop_counter() as fc:
        fn()
    return fc.get_total_flops()


def train_rate(step_fn, block: torch.Tensor, steps: int) -> float:
    """Tokens per second of ``steps`` training steps (one warm-up step first)."""
    step_fn(block)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn(block)
    return steps * block.shape[0] * (block.shape[1] - 1) / (time.perf_counter() - t0)


def trainer(forward, params):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(block):
        logits = forward(block[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--fast-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--episodic-features", type=int, default=2048, help="0: no episodic-memory row")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "bench_retrofit.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = build(args.d_model, args.layers)
    model = retrofit(build(args.d_model, args.layers), n_heads=args.fast_heads, head_k_dim=args.head_dim,
                     head_v_dim=args.head_dim)  # a second copy: the base row runs without any hook
    model.check_inputs = False  # as in training and serving loops: no host read per call
    model_ep = None
    if args.episodic_features:
        model_ep = retrofit(build(args.d_model, args.layers), n_heads=args.fast_heads, head_k_dim=args.head_dim,
                            head_v_dim=args.head_dim, episodic_heads=1, episodic_features=args.episodic_features)
        model_ep.check_inputs = False
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (1, args.prompt), generator=g)
    block = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)

    base.train()
    model.train()
    train_base = trainer(lambda x: base(input_ids=x).logits, list(base.parameters()))
    train_all = trainer(lambda x: model(x, return_state=False)[0], list(model.parameters()))
    added = [p for n, p in model.named_parameters() if n.startswith("fast.")]

    def frozen_forward(x):
        return model(x, return_state=False)[0]
    train_added = trainer(frozen_forward, added)

    from cl_arch.hf.decoder import RetrofitDecoder

    max_len = args.prompt + args.decode_steps + 8
    retros = {"retrofit": model} if model_ep is None else {"retrofit": model, "retrofit + episodic": model_ep}
    decoders = {}
    for name, m in retros.items():
        m.eval()
        decoders[f"{name} decoder"] = (RetrofitDecoder(m, 1, max_len=max_len, compile=False), m)
        decoders[f"{name} decoder compiled"] = (RetrofitDecoder(m, 1, max_len=max_len, compile=True), m)
    base.eval()
    # the decoder's inductor settings for the base too, so the ratio compares the hooks and not the settings
    base_compiled = torch.compile(base, dynamic=False, options=dict(COMPILE_OPTIONS))
    rows = {k: [] for k in ("decode base", "decode base static compiled", *[f"decode {n}" for n in retros],
                            *[f"decode {n}" for n in decoders], "train base (all)", "train retrofit (all)",
                            "train retrofit (added only)")}
    one = prompt[:, :1]
    flops = {"base": token_flops(lambda: base(input_ids=one))}
    flops.update({n: token_flops(lambda n=n: decoders[f"{n} decoder"][0].step(one[:, 0])) for n in retros})
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every row alike
        base.eval()
        model.eval()
        rows["decode base"].append(1e3 * decode_base(base, prompt, args.decode_steps))
        rows["decode base static compiled"].append(1e3 * decode_base_static(base, prompt, args.decode_steps,
                                                                            base_compiled))
        for name, m in retros.items():
            rows[f"decode {name}"].append(1e3 * decode_retrofit(m, prompt, args.decode_steps))
        for name, (dec, m) in decoders.items():
            rows[f"decode {name}"].append(1e3 * decode_decoder(dec, m, prompt, args.decode_steps))
        base.train()
        model.train()
        rows["train base (all)"].append(train_rate(train_base, block, args.train_steps))
        for p in model.base.parameters():
            p.requires_grad_(True)
        rows["train retrofit (all)"].append(train_rate(train_all, block, args.train_steps))
        for p in model.base.parameters():
            p.requires_grad_(False)
        rows["train retrofit (added only)"].append(train_rate(train_added, block, args.train_steps))
        for p in model.base.parameters():
            p.requires_grad_(True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = {"train retrofit (all) / base (tokens/s)": med["train retrofit (all)"] / med["train base (all)"],
              "train retrofit (added only) / base (all) (tokens/s)":
                  med["train retrofit (added only)"] / med["train base (all)"]}
    for name in retros:
        ratios[f"decode {name} / base (ms per token)"] = med[f"decode {name}"] / med["decode base"]
        ratios[f"decode {name} decoder / base"] = med[f"decode {name} decoder"] / med["decode base"]
        ratios[f"decode {name} decoder compiled / base static compiled"] = \
            med[f"decode {name} decoder compiled"] / med["decode base static compiled"]
        ratios[f"matmul FLOPs {name} / base (the floor)"] = flops[name] / flops["base"]
    n_base = sum(p.numel() for p in base.parameters())
    n_added = sum(p.numel() for n, p in model.named_parameters() if n.startswith("fast."))
    print(f"Llama d={args.d_model} x {args.layers} blocks ({n_base / 1e6:.2f} M params); fast memories in every block, "
          f"{args.fast_heads} heads x {args.head_dim}x{args.head_dim} (+{n_added / 1e6:.2f} M params); "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'row':40s} {'median':>10s}  unit")
    for k, v in med.items():
        print(f"{k:40s} {v:10.2f}  {'ms/token' if k.startswith('decode') else 'tokens/s'}")
    for k, v in flops.items():
        print(f"matmul MFLOP/token {k:22s} {v / 1e6:10.2f}")
    for k, v in ratios.items():
        print(f"{k:64s} {v:6.2f}x")
    write_json(args.out, {"args": vars(args), "rows": rows, "median": med, "ratios": ratios, "flops": flops,
                          "params_base": n_base, "params_added": n_added, "torch": torch.__version__})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
