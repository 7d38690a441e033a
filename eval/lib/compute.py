"""What a reader costs: estimated FLOPs per token, the bytes of state it holds, and each row's
measured seconds and counted FLOPs per token at batch 1 (:func:`time_rows`)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cl_arch import PlasticTransformer
from cl_arch.memory import EpisodicMemory
from cl_arch.state import ModelState

from .learners import DynamicEval, RowPolicy
from .reading import run_stream


def flops_per_token(model: PlasticTransformer, context: int) -> float:
    """Estimated forward FLOPs per token with ``context`` attended positions.

    ``2 * (weights of every Linear, lm_head included)`` for the matmuls,
    ``+ 10 * H * K * V`` per fast layer (decay, read-before-write, outer-product write,
    read-after-write and trace update on the ``[K, V]`` state of each head; the readout
    memory's heads alike; the episodic memory's plus ``2 F d_model`` for its keys),
    ``+ 4 * d_model * context`` per attention layer (scores and weighted sum).
    Embedding lookups, norms and activations are ignored (they are O(d), not O(d^2)).
    """
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = 2.0 * matmul
    for t in cfg.layer_types:
        if t == "fast":
            total += 10.0 * cfg.n_heads * cfg.head_k_dim * cfg.head_v_dim
        else:
            ctx = context if cfg.attn_window is None else min(context, cfg.attn_window)
            total += 4.0 * cfg.d_model * ctx
    for m in model.output_memories():  # the same rule on [K, V] per head, plus its read-out
        total += 10.0 * m.n_heads * m.head_k_dim * m.head_v_dim
        if isinstance(m, EpisodicMemory):  # its key features R h
            total += 2.0 * m.head_k_dim * cfg.d_model
        if m.value_kind == "embed":  # the read goes back through the head
            total += 2.0 * cfg.d_model * cfg.vocab_size
    return total



def state_bytes(state: ModelState) -> int:
    """Bytes of every tensor a :class:`ModelState` holds."""
    n = 0
    for s in state.layers:
        for t in (vars(s).values()):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n


def _cache_len(state) -> int:
    """Keys in the first attention cache of ``state`` (0 for none)."""
    for s in (state.layers if state is not None else []):
        if getattr(s, "k", None) is not None:
            return int(s.k.shape[2])
    return 0


def _attention_flops(cfg, cache: int, T: int) -> float:
    """``softmax(q k^T) v`` FLOPs of ``T`` new tokens over ``cache`` cached keys, all attention
    layers: ``4 * heads * head_dim`` per (query, key) pair inside the window. Counted from the
    cache length because ``torch.utils.flop_counter`` does not see the CPU SDPA kernel."""
    n_attn = sum(1 for t in cfg.layer_types if t == "attn")
    W = cfg.attn_window
    pairs = sum(min(cache + t + 1, W) if W is not None else cache + t + 1 for t in range(T))
    return 4.0 * cfg.d_model * pairs * n_attn


def time_rows(model: PlasticTransformer, segments: Sequence[Tuple[bytes, int]], policies: Sequence[RowPolicy],
              make_solo: Dict[str, Any], chunk: int = 256, repeats: int = 3, lam: Optional[float] = None
              ) -> Dict[str, Dict[str, float]]:
    """Per-row cost at batch 1, in this process and thread count: every row reads ``segments``
    (a few episodes) alone, ``repeats`` times from a fresh start; returns per row the median
    ``sec_per_token`` and the FLOPs per token counted by ``torch.utils.flop_counter`` on one chunk
    (forward, plus backward and update for a reader that learns by gradient).

    ``make_solo``: ``name -> callable`` returning a fresh solo reader (as for :func:`run_stream`).
    """
    from cl_arch.flops import flop_counter

    n_bytes = sum(len(s) for s, _ in segments)
    out: Dict[str, Dict[str, float]] = {}
    rows: List[Tuple[str, Any]] = [(p.name, p) for p in policies] + list(make_solo.items())
    ids = torch.tensor(list(segments[-1][0][:chunk]), dtype=torch.long)[None]
    for name, what in rows:
        times = []
        for _ in range(repeats):
            solo, pols = ({}, [what]) if isinstance(what, RowPolicy) else ({name: what()}, [])
            res = run_stream(model, segments, pols, chunk=chunk, desc=f"timing {name}", lam=lam, solo=solo)
            times.append(res["seconds"][name] if solo else res["seconds"]["batched"])
        # FLOPs of one more chunk read after the timed episodes (a growing context costs more)
        reader = solo[name] if solo else res["learner"]
        attn = _attention_flops(reader.model.config, _cache_len(reader.state), ids.shape[1])
        counter = flop_counter()  # the in-place products of the no-grad paths counted too
        with counter:
            if solo:
                reader.step(ids, ids)
            else:
                reader.step(ids)
        grad = 3 if isinstance(reader, DynamicEval) else 1  # its backward pass repeats attention twice
        out[name] = {"sec_per_token": float(np.median(times)) / n_bytes,
                     "flops_per_token": (counter.get_total_flops() + grad * attn) / ids.shape[1]}
    return out
