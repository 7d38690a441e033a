"""``cost``: what remembering costs, per token, as interactions accumulate.

Two ways to carry ``n`` past interactions (each ``interaction_tokens`` long) into the next one:

* ``adapted``: the plastic model keeps them in fixed-size memories (``P``, plus the episode's
  ``S``, ``E`` and conv caches); each interaction starts a fresh episode, so its cost does not
  grow with ``n``.
* ``in_context``: a frozen model holding all past interactions in its context: attention over a
  KV cache of ``(n - 1) * interaction_tokens`` positions (full attention, no window), plus the fast
  layers' running state. Cost grows linearly per token (quadratically in total).

Measured: wall seconds per token of one interaction's forward pass (median of ``repeats``), the
bytes of state carried, and the estimated FLOPs per token (:func:`flops_per_token`). The KV cache
is filled with random keys/values of the right size: the arithmetic, and so the time, does not
depend on their values, and building a 32k-token cache by prefill would cost minutes on CPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from tqdm import tqdm

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.state import AttnLayerState, FastLayerState, ModelState

from .lib.compute import flops_per_token, state_bytes
from .lib.models import text_model
from .lib.options import add_model_options
from .lib.options import TextModelOptions
from .lib.options import config_from_args as options_config
from .lib.report import curve, format_table, write_report


def _full_context(model: PlasticTransformer) -> PlasticTransformer:
    """The same weights with the attention window removed (holds everything in context)."""
    if model.config.attn_window is None:
        return model
    cfg = PlasticConfig.from_dict({**model.config.to_dict(), "attn_window": None})
    m = PlasticTransformer(cfg)
    m.load_state_dict(copy.deepcopy(model.state_dict()))
    return m.eval()


def _in_context_state(model: PlasticTransformer, past_tokens: int, gen: torch.Generator) -> ModelState:
    """A state as if ``past_tokens`` had been read: random KV caches of that length, running S/E."""
    st = model.materialize_state(model.init_state(1), 1)
    layers = []
    for s in st.layers:  # the blocks' states, then the readout memory's
        if isinstance(s, FastLayerState):
            layers.append(s)
        elif past_tokens == 0:
            layers.append(AttnLayerState())
        else:
            shape = (1, model.config.n_attn_heads, past_tokens, model.config.attn_head_dim)
            layers.append(AttnLayerState(k=torch.randn(shape, generator=gen), v=torch.randn(shape, generator=gen)))
    return ModelState(layers, past_tokens)


@torch.no_grad()
def _time_forward(model, ids, state, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, state=state, return_state=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class CostConfig(TextModelOptions):
    """Every setting of one cost run (:func:`run`): one interaction of ``interaction_tokens`` timed
    (median of ``repeats``) after each count of ``interactions``; ``cache_dir``, ``pretrain_seconds``,
    ``no_readout``, ``no_episodic``: the default model (:func:`~cl_arch.eval.lib.models.text_model`)."""
    interactions: Tuple[int, ...] = (1, 10, 100, 1000)
    interaction_tokens: int = 32
    repeats: int = 5


HELP = "what remembering costs per token as interactions accumulate, against a growing context"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval cost``'s options (defaults: :class:`CostConfig`'s)."""
    add_model_options(p)


def config_from_args(args: argparse.Namespace) -> CostConfig:
    """The parsed options of :func:`add_arguments` as a :class:`CostConfig`."""
    return options_config(CostConfig, args)


def run(cfg: Optional[CostConfig] = None, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Time one interaction of ``interaction_tokens`` after ``n`` earlier ones, for each ``n``.

    Returns the report (methods ``adapted`` and ``in_context``; curves of ms/token vs ``n``;
    summaries with bytes of state and FLOPs per token at the largest ``n``).
    """
    cfg = cfg or CostConfig()
    interactions, interaction_tokens, repeats, seed = cfg.interactions, cfg.interaction_tokens, cfg.repeats, cfg.seed
    model = text_model(model, cfg.cache_dir, cfg.pretrain_seconds, cfg.no_readout, cfg.no_episodic)
    model.eval()
    full = _full_context(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, interaction_tokens), generator=gen)
    rows: Dict[str, Dict[str, list]] = {"adapted": {"ms": [], "bytes": [], "flops": []},
                                        "in_context": {"ms": [], "bytes": [], "flops": []}}
    for n in tqdm(list(interactions), desc="cost", unit="n"):
        # adapted: a fresh episode whose S starts at W0 + P; P has a fixed size whatever n is
        P = [torch.randn(1, m.n_heads, m.head_k_dim, m.head_v_dim, generator=gen) * 0.01
             for m in model.fast_layers()]
        st = model.materialize_state(model.init_state(1, P), 1)
        rows["adapted"]["ms"].append(1e3 * _time_forward(model, ids, st, repeats) / interaction_tokens)
        _, after = model(ids, state=st)
        rows["adapted"]["bytes"].append(state_bytes(after))
        rows["adapted"]["flops"].append(flops_per_token(model, interaction_tokens))
        # in context: everything said so far is attended to
        past = (n - 1) * interaction_tokens
        st = _in_context_state(full, past, gen)
        rows["in_context"]["ms"].append(1e3 * _time_forward(full, ids, st, repeats) / interaction_tokens)
        _, after = full(ids, state=st)
        rows["in_context"]["bytes"].append(state_bytes(after))
        rows["in_context"]["flops"].append(flops_per_token(full, past + interaction_tokens))
    xs = list(interactions)
    methods = {}
    for name_, r in rows.items():
        methods[name_] = {"curve": curve(xs, r["ms"]),
                          "summary": {"ms_per_token": dict(zip(map(str, xs), r["ms"])),
                                      "state_bytes": dict(zip(map(str, xs), r["bytes"])),
                                      "flops_per_token": dict(zip(map(str, xs), r["flops"]))}}
    last = str(xs[-1])
    methods["in_context"]["summary"]["slowdown_vs_adapted"] = (
        methods["in_context"]["summary"]["ms_per_token"][last] / methods["adapted"]["summary"]["ms_per_token"][last])
    report = {"benchmark": "cost",
              "config": {"interactions": xs, "interaction_tokens": interaction_tokens, "repeats": repeats,
                         "threads": torch.get_num_threads(), "model_config": model.config.to_dict(), "seed": seed},
              "x_label": "interactions held", "y_label": "ms per token", "log_x": True, "methods": methods}
    report["table"] = format_table(
        [[n, f"{rows['adapted']['ms'][i]:.3f}", f"{rows['in_context']['ms'][i]:.3f}",
          f"{rows['adapted']['bytes'][i] / 1024:.0f}", f"{rows['in_context']['bytes'][i] / 1024:.0f}",
          f"{rows['adapted']['flops'][i] / 1e6:.2f}", f"{rows['in_context']['flops'][i] / 1e6:.2f}"]
         for i, n in enumerate(xs)],
        ["interactions", "adapted ms/tok", "in-context ms/tok", "adapted state KiB", "in-context state KiB",
         "adapted MFLOP/tok", "in-context MFLOP/tok"])
    if cfg.out_dir:
        write_report(report, cfg.out_dir, cfg.name or "cost")
    return report


__all__ = ["HELP", "CostConfig", "add_arguments", "config_from_args", "run"]
