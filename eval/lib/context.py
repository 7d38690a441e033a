"""The in-context alternative: the frozen model reading a stream with a longer attention window.

A user who wants a model to know a codebase first puts more of it in the context. :class:`FullContext`
is that row of the codebase benchmark: the same weights, the attention window widened to
``window`` bytes, and the attention caches carried across episode boundaries, so every byte
attends to up to ``window - 1`` bytes read before it (across files). The fast memories are reset
at every episode as in the ``frozen`` row, so its gain over ``frozen`` is what the longer context
alone buys. Its cost grows with the window (attention over the cache per token), which the
benchmark's cost columns show.
"""
from __future__ import annotations

from typing import Optional

import torch

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.state import AttnLayerState, ModelState


def widen_window(model: PlasticTransformer, window: Optional[int]) -> PlasticTransformer:
    """A copy of ``model`` with attention window ``window`` (None: unbounded); same weights, eval mode."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    cfg = PlasticConfig.from_dict({**model.config.to_dict(), "attn_window": window})
    m = PlasticTransformer(cfg).to(next(model.parameters()).dtype)
    m.load_state_dict(model.state_dict())
    return m.eval()


class FullContext:
    """``logits = reader.step(ids [1, T], targets [1, T])``; ``reader.new_episode()`` resets the fast
    memories and keeps the attention caches (and the position), so attention spans episodes."""

    def __init__(self, model: PlasticTransformer, window: Optional[int] = 4096):
        self.window = window
        self.model = widen_window(model, window)
        self.state: Optional[ModelState] = None

    @torch.no_grad()
    def step(self, ids: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Score ``ids [1, T]`` (``targets`` unused: this row never learns); returns ``[1, T, V]``."""
        logits, self.state = self.model(ids, state=self.state)
        return logits

    def new_episode(self) -> None:
        if self.state is None:
            return
        fresh = self.model.materialize_state(self.model.init_state(1), 1)
        layers = [s if isinstance(s, AttnLayerState) else f for s, f in zip(self.state.layers, fresh.layers)]
        self.state = ModelState(layers, self.state.position)

    def context_bytes(self) -> int:
        """Keys held by the first attention layer's cache (what the next byte can attend to)."""
        if self.state is None:
            return 0
        for s in self.state.layers:
            if isinstance(s, AttnLayerState) and s.k is not None:
                return int(s.k.shape[2])
        return 0


__all__ = ["widen_window", "FullContext"]
