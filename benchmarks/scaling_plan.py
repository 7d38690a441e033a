"""Memory per GPU and tokens/s predicted for 125M / 350M / 1.3B PlasticTransformers on 1 and 8 H100s.

Everything is counted from a :class:`~cl_arch.PlasticConfig` (parameters exactly, FLOPs and bytes from
the layers as written), then turned into predictions with the hardware figures and the one
assumption listed in ``HARDWARE`` (the fraction of peak a step reaches, ``mfu``). ``docs/scaling.md``
quotes this script's output and states which figures a GPU run must confirm. Writes
``benchmarks/out/scaling_plan.json`` and prints the table.

    python benchmarks/scaling_plan.py [--batch 8] [--seq-len 2048] [--out benchmarks/out/scaling_plan.json]

Conventions: bf16 autocast with fp32 master weights (what ``train.mixed_precision: bf16`` does: the
weights, gradients and AdamW moments stay fp32, matmuls run in bf16); FSDP shards weights,
gradients and optimizer state over G GPUs (ZeRO-3); 1 GB = 1e9 bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Dict

from cl_arch import EpisodicConfig, PlasticConfig, ReadoutConfig

# Nominal shapes of GPT-3 Small / Medium / XL with a byte vocabulary; fast and attention layers
# alternate (PlasticConfig's default), fast heads of K = V = 128.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "125M": dict(d_model=768, n_layers=12, n_heads=6, head_k_dim=128, head_v_dim=128, n_attn_heads=12),
    "350M": dict(d_model=1024, n_layers=24, n_heads=8, head_k_dim=128, head_v_dim=128, n_attn_heads=16),
    "1.3B": dict(d_model=2048, n_layers=24, n_heads=16, head_k_dim=128, head_v_dim=128, n_attn_heads=16),
}

HARDWARE = {
    "gpu": "H100 SXM 80GB",
    "hbm_bytes": 80e9,
    "peak_bf16_flops": 989e12,     # dense bf16 tensor-core peak (datasheet)
    "nvlink_bytes_per_s": 450e9,   # per GPU, one direction (NVLink 4, 900 GB/s both ways)
    "mfu": 0.40,                   # assumed fraction of peak a training step reaches: to be measured
}
FP32, BF16 = 4, 2


# ============================================================================ parameters

def _output_memories(c: PlasticConfig):
    """(the readout memory's config or None, the episodic memory's or None)."""
    ro = next((m for m in c.memories if isinstance(m, ReadoutConfig)), None)
    ep = next((m for m in c.memories if isinstance(m, EpisodicConfig)), None)
    return ro, ep

def parameter_count(c: PlasticConfig) -> Dict[str, int]:
    """Parameters by component, exactly as :class:`~cl_arch.PlasticTransformer` builds them.

    Returns ``{"embedding", "lm_head", "attention", "fast", "mlp", "norms", "readout", "episodic",
    "total", "matmul"}``; ``matmul`` counts the weights a token multiplies (every projection and the head,
    not the embedding lookup, norms or per-head vectors), which sets the FLOPs.
    """
    d, V, hid = c.d_model, c.vocab_size, c.mlp_hidden
    H, K, Vh = c.n_heads, c.head_k_dim, c.head_v_dim
    types = c.layer_types
    n_fast, n_attn = types.count("fast"), types.count("attn")
    plastic = 3 + (1 if c.lam is not None else 0)  # gamma, eta_s, eta_r (+ lam): [H] each
    fast_matmul = d * H * K * 2 + d * H * Vh + 2 * d * H + H * Vh * d + (d * H * Vh if c.use_gate else 0)
    fast = (fast_matmul + (2 * H * K + H * Vh) * c.conv_size + Vh + H * K * Vh + (plastic + 2) * H)
    attn_matmul = 4 * d * d
    n = {"embedding": V * d, "lm_head": 0 if c.tie_embeddings else V * d,
         "attention": n_attn * attn_matmul, "fast": n_fast * fast, "mlp": c.n_layers * 3 * d * hid,
         "norms": 2 * d * c.n_layers + d, "readout": 0, "episodic": 0}
    ro, ep = _output_memories(c)
    if ro is not None:
        Hr, Vr = ro.heads, (V if ro.values == "onehot" else d)
        n["readout"] = Hr * d * Vr + (plastic + 3) * Hr  # W0; rates, A_log, beta_logit, read_scale
    if ep is not None:  # W0 [H, F, V]; the same per-head vectors; the key threshold (R is a buffer)
        He, Ve = ep.heads, (V if ep.values == "onehot" else d)
        n["episodic"] = He * ep.features * Ve + (plastic + 3) * He + 1
    n["total"] = sum(n.values())
    n["matmul"] = n_attn * attn_matmul + n_fast * fast_matmul + c.n_layers * 3 * d * hid + V * d
    return n


# ============================================================================ FLOPs
def flops_per_token(c: PlasticConfig, seq_len: int) -> Dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward).

    - matmuls: ``6 N_matmul`` (2 per weight forward, 4 backward);
    - attention: ``3 * 2 * T * d`` per attention layer (QK^T and AV, ``4 T d`` forward, halved by the
      causal mask that FlashAttention skips; T = seq_len, or the window);
    - the fast-weight rule, chunkwise (chunk C, per head and token, forward): intra-chunk ``K K^T``,
      ``Q K^T`` and the WY products ``2 C (2K + 2V)``, state reads by queries and keys and the state
      update ``6 K V``, the eligibility trace ``2 K V``; times 3 for the backward;
    - the readout memory: the same rule with ``C = 1`` (per-token), K = d, V = vocab (one-hot) or d
      (``"embed"``, read back through the head: ``6 d vocab``);
    - the episodic memory: the same with K = F (``episodic_features``), plus its keys ``R h``
      (``6 F d``: a fixed ``[F, d]`` buffer, not among the matmul weights).
    """
    d, H, K, Vh, C = c.d_model, c.n_heads, c.head_k_dim, c.head_v_dim, c.chunk_size
    types = c.layer_types
    ctx = min(seq_len, c.attn_window or seq_len)
    p = parameter_count(c)
    out = {"matmul": 6.0 * p["matmul"], "attention": 3 * 2.0 * ctx * d * types.count("attn")}
    rule = 2 * C * (2 * K + 2 * Vh) + 6 * K * Vh + (2 * K * Vh if c.lam is not None else 0)
    out["fast_rule"] = 3.0 * rule * H * types.count("fast")
    ro, ep = _output_memories(c)
    if ro is not None:
        Vr = c.vocab_size if ro.values == "onehot" else d
        out["readout_rule"] = 3.0 * (8 * d * Vr) * ro.heads
        if ro.values == "embed":  # the read goes back through the tied head
            out["readout_readback"] = 6.0 * d * c.vocab_size
    if ep is not None:
        Ve = c.vocab_size if ep.values == "onehot" else d
        out["episodic_rule"] = 3.0 * (8 * ep.features * Ve) * ep.heads
        out["episodic_keys"] = 6.0 * ep.features * d
        if ep.values == "embed":
            out["episodic_readback"] = 6.0 * d * c.vocab_size
    out["total"] = sum(out.values())
    return out


# ============================================================================ memory
def activation_bytes_per_token(c: PlasticConfig) -> Dict[str, float]:
    """Bytes saved for the backward per token, per block type, under bf16 autocast.

    Counted tensors (``B = bf16`` 2 bytes, ``F = fp32`` 4 bytes): the fp32 residual stream into each
    norm (2 x d F), norm outputs (2 x d B), the MLP's gate, up and their product (3 x hidden B);
    attention: qkv (3d B), its output and log-sum-exp (d B + heads F); fast layer: q/k/v before and
    after the short conv (2 x (2HK + HV) B), unit q and k (2HK F), beta and g (2H F), the rule's
    output (HV F), the gate and the gated norm (2 HV B), plus the chunk-boundary states the chunked
    backward keeps (``H K V`` F per chunk, i.e. ``4 H K V / C`` per token) and their traces.
    With activation checkpointing only each block's input (d F) stays per token, and one block's
    activations exist at a time during its recompute.
    """
    d, hid, H, K, Vh, C = c.d_model, c.mlp_hidden, c.n_heads, c.head_k_dim, c.head_v_dim, c.chunk_size
    common = 2 * d * FP32 + 2 * d * BF16 + 3 * hid * BF16
    attn = common + 3 * d * BF16 + d * BF16 + c.n_attn_heads * FP32
    qkv = 2 * H * K + H * Vh
    states = (2 if c.lam is not None else 1) * H * K * Vh * FP32 / C
    fast = common + 2 * qkv * BF16 + 2 * H * K * FP32 + 2 * H * FP32 + H * Vh * FP32 + 2 * H * Vh * BF16 + states
    logits = c.vocab_size * (BF16 + FP32)  # bf16 logits and their fp32 upcast for the loss
    return {"attn_block": attn, "fast_block": fast, "logits": logits, "checkpointed_block": d * FP32}


def fast_state_bytes(c: PlasticConfig, batch: int) -> Dict[str, float]:
    """Fast memories ``S, E, P`` of one fast layer, ``B x H x K x V`` fp32 each, and of the readout.

    Pretraining keeps none across steps (``return_state=False``; the chunk-boundary states are
    activations above). Meta-training, episodic fine-tuning and sessions hold S, E and P per row.
    """
    per = batch * c.n_heads * c.head_k_dim * c.head_v_dim * FP32
    out = {"S_per_layer": per, "E_per_layer": per if c.lam is not None else 0, "P_per_layer": per}
    out["all_layers_SEP"] = c.layer_types.count("fast") * (out["S_per_layer"] + out["E_per_layer"] + out["P_per_layer"])
    ro, ep = _output_memories(c)
    if ro is not None:
        Vr = c.vocab_size if ro.values == "onehot" else c.d_model
        out["readout_SEP"] = 3 * batch * ro.heads * c.d_model * Vr * FP32
        out["all_layers_SEP"] += out["readout_SEP"]
    if ep is not None:
        Ve = c.vocab_size if ep.values == "onehot" else c.d_model
        out["episodic_SEP"] = 3 * batch * ep.heads * ep.features * Ve * FP32
        out["all_layers_SEP"] += out["episodic_SEP"]
    return out


def plan(name: str, c: PlasticConfig, batch: int, seq_len: int, hw=HARDWARE) -> Dict[str, Any]:
    """Predictions for one config at ``batch`` sequences of ``seq_len`` tokens per GPU per step."""
    p = parameter_count(c)
    f = flops_per_token(c, seq_len)
    a = activation_bytes_per_token(c)
    s = fast_state_bytes(c, batch)
    N, tokens = p["total"], batch * seq_len
    types = c.layer_types
    acts = tokens * (types.count("attn") * a["attn_block"] + types.count("fast") * a["fast_block"] + a["logits"])
    biggest_block = max(a["attn_block"], a["fast_block"])
    acts_ckpt = tokens * (c.n_layers * a["checkpointed_block"] + biggest_block + a["logits"])
    t_compute = tokens * f["total"] / (hw["mfu"] * hw["peak_bf16_flops"])
    rows = {}
    for gpus in (1, 8):
        for mode in (("single",) if gpus == 1 else ("ddp", "fsdp")):
            shard = gpus if mode == "fsdp" else 1
            states = {"weights": FP32 * N / shard, "grads": FP32 * N / shard, "adamw": 2 * FP32 * N / shard}
            if mode == "fsdp":  # one unit's weights gathered (fp32: autocast, no FSDP mp_policy), x2 with prefetch
                unit = max(p["matmul"] / c.n_layers, p["embedding"])
                states["gathered_unit"] = 2 * FP32 * unit
            # bytes each GPU sends per step: DDP all-reduces fp32 grads (2 (G-1)/G x 4N); FSDP all-gathers
            # weights for forward and backward and reduce-scatters grads (3 (G-1)/G x 4N)
            comm = 0.0 if gpus == 1 else (2 if mode == "ddp" else 3) * (gpus - 1) / gpus * FP32 * N
            t_comm = comm / hw["nvlink_bytes_per_s"]
            row = {"gpus": gpus, "mode": mode, "model_states_GB": sum(states.values()) / 1e9,
                   "states_detail_GB": {k: v / 1e9 for k, v in states.items()},
                   "activations_GB": acts / 1e9, "activations_checkpointed_GB": acts_ckpt / 1e9,
                   "total_GB": (sum(states.values()) + acts) / 1e9,
                   "total_checkpointed_GB": (sum(states.values()) + acts_ckpt) / 1e9,
                   "step_compute_s": t_compute, "step_comm_s": t_comm,
                   # overlapped: comm hidden behind compute; serial: nothing overlaps (the two bounds)
                   "tokens_per_s_overlapped": gpus * tokens / max(t_compute, t_comm),
                   "tokens_per_s_serial": gpus * tokens / (t_compute + t_comm)}
            row["fits_80GB"] = row["total_GB"] < hw["hbm_bytes"] / 1e9
            row["fits_80GB_checkpointed"] = row["total_checkpointed_GB"] < hw["hbm_bytes"] / 1e9
            rows[f"{gpus}x_{mode}"] = row
    return {"name": name, "config": {k: getattr(c, k) for k in CONFIGS[name]} if name in CONFIGS else {},
            "parameters": p, "flops_per_token": f, "activation_bytes_per_token": a,
            "fast_state_bytes": s, "batch": batch, "seq_len": seq_len, "tokens_per_gpu_step": tokens,
            "runs": rows}


def table(plans) -> str:
    """A Markdown table of the main figures of each plan."""
    lines = ["| model | params | GFLOP/token | GPUs | mode | states GB | act GB (ckpt) | total GB (ckpt) | "
             "fast S+E+P GB | tokens/s |", "|" + " --- |" * 10]
    for pl in plans:
        for key, r in pl["runs"].items():
            lines.append(f"| {pl['name']} | {pl['parameters']['total'] / 1e6:.1f}M | "
                         f"{pl['flops_per_token']['total'] / 1e9:.2f} | {r['gpus']} | {r['mode']} | "
                         f"{r['model_states_GB']:.2f} | {r['activations_GB']:.1f} ({r['activations_checkpointed_GB']:.2f}) | "
                         f"{r['total_GB']:.1f} ({r['total_checkpointed_GB']:.1f}) | "
                         f"{pl['fast_state_bytes']['all_layers_SEP'] / 1e9:.3f} | {r['tokens_per_s_overlapped']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                  "scaling_plan.json"))
    args = ap.parse_args(argv)
    if args.batch < 1 or args.seq_len < 1:
        raise SystemExit("--batch and --seq-len must be >= 1")
    plans = [plan(n, PlasticConfig(**kw), args.batch, args.seq_len) for n, kw in CONFIGS.items()]
    print(table(plans))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"hardware": HARDWARE, "batch": args.batch, "seq_len": args.seq_len, "plans": plans}, f, indent=2)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
