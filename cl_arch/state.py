"""Recurrent state carried between forward calls.

A :class:`ModelState` holds one entry per layer, in layer order: a :class:`FastLayerState` for a
fast-weight layer, an :class:`AttnLayerState` for an attention layer, plus the absolute position
of the next token (rotary embeddings and the attention mask need it). Passing the state returned
by one call into the next makes a stream of calls equal one call over the concatenated tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

Tensor = torch.Tensor


def _map(x: Optional[Tensor], fn: Callable[[Tensor], Tensor]) -> Optional[Tensor]:
    return None if x is None else fn(x)


@dataclass(frozen=True)
class StepContext:
    """What one forward call gives every token mixer besides its input and its own state.

    Attributes:
        position: absolute index of the call's first token (rotary embeddings, window masks).
        modulation: ``[B, T]`` in [0, 1] multiplying every fast memory's write strength, or None (1).
        need_state: return the new states (False: training without carry, nothing kept).
        lam: this fast memory's trace-decay override for the call (float or ``[H]``), or None.
    """

    position: int = 0
    modulation: Optional[Tensor] = None
    need_state: bool = True
    lam: Optional[Union[float, Tensor]] = None


@dataclass
class FastLayerState:
    """State of one fast-weight layer (shapes ``[B, H, K, V]``, float32 or wider).

    Attributes:
        S: context fast weight; None means "start of episode", i.e. ``S0 = W0 + P``.
        E: eligibility trace; None means zeros.
        P: persistent fast weight of this user/task; None means zeros.
        conv: short-conv cache ``[B, conv_size - 1, channels]`` (the last inputs); None means zeros.
    """

    S: Optional[Tensor] = None
    E: Optional[Tensor] = None
    P: Optional[Tensor] = None
    conv: Optional[Tensor] = None

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "FastLayerState":
        return FastLayerState(*(_map(getattr(self, f.name), fn) for f in dataclasses.fields(self)))


@dataclass
class AttnLayerState:
    """KV cache of one attention layer: ``k``, ``v`` are ``[B, n_attn_heads, L, head_dim]`` or None.

    Keys are cached after rotary embedding, so they stay valid as the position advances.
    With a sliding window only the last ``attn_window - 1`` positions are kept.
    """

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "AttnLayerState":
        return AttnLayerState(_map(self.k, fn), _map(self.v, fn))


LayerState = Union[FastLayerState, AttnLayerState]


@dataclass
class ModelState:
    """Per-layer states plus ``position``, the absolute index of the next token."""

    layers: List[LayerState]
    position: int = 0

    # ------------------------------------------------------------------ elementwise helpers
    def _apply(self, fn: Callable[[Tensor], Tensor]) -> "ModelState":
        return ModelState([s.apply(fn) for s in self.layers], self.position)

    def detach(self) -> "ModelState":
        """Cut the autograd graph (truncated BPTT between calls)."""
        return self._apply(lambda t: t.detach())

    def clone(self) -> "ModelState":
        """Deep copy of every tensor (e.g. to branch a session)."""
        return self._apply(lambda t: t.clone())

    def to(self, device: Union[str, torch.device]) -> "ModelState":
        return self._apply(lambda t: t.to(device))

    # ------------------------------------------------------------------ episode structure
    def new_episode(self) -> "ModelState":
        """State for the next episode: keeps only ``P``; S, E, conv and KV caches cleared, position 0."""
        layers: List[LayerState] = []
        for s in self.layers:
            layers.append(FastLayerState(P=s.P) if isinstance(s, FastLayerState) else AttnLayerState())
        return ModelState(layers, 0)

    def fast(self) -> List["FastLayerState"]:
        """The fast-weight memories' states, in the order of ``model.fast_layers()`` (attention slots skipped)."""
        return [s for s in self.layers if isinstance(s, FastLayerState)]

    def persistent(self) -> List[Optional[Tensor]]:
        """``P`` of every fast-weight layer, in layer order."""
        return [s.P for s in self.fast()]

    def traces(self) -> List[Optional[Tensor]]:
        """``E`` (the episode's eligibility trace, ``[B, H, K, V]`` or None) of every fast-weight layer."""
        return [s.E for s in self.fast()]

    @property
    def batch_size(self) -> Optional[int]:
        """Batch size of the first tensor found; None when the state holds no tensor yet."""
        for s in self.layers:
            for f in dataclasses.fields(s):
                t = getattr(s, f.name)
                if t is not None:
                    return t.shape[0]
        return None

    # ------------------------------------------------------------------ batching sessions
    def select(self, i: int) -> "ModelState":
        """Row ``i`` of the batch, keeping the batch dimension (size 1)."""
        return self._apply(lambda t: t[i:i + 1])

    @staticmethod
    def stack(states: Sequence["ModelState"]) -> "ModelState":
        """Concatenate states along the batch dimension so several sessions decode together.

        All states must share a structure and a position (attention caches must then have the
        same length). ``E``, ``P`` and ``conv`` may be None in some rows (they mean zeros), but
        ``S`` must be all None or all set: ``S = None`` means ``W0 + P``, which needs the model
        (use ``PlasticTransformer.materialize_state`` first).
        """
        states = list(states)
        if not states:
            raise ValueError("ModelState.stack: states is empty")
        n = len(states[0].layers)
        if any(len(s.layers) != n for s in states):
            raise ValueError("ModelState.stack: states have different numbers of layers")
        positions = {s.position for s in states}
        if len(positions) > 1:
            raise ValueError(f"ModelState.stack: states are at different positions {sorted(positions)}; "
                             "rotary embeddings and KV caches need one position per batch")
        sizes = [s.batch_size for s in states]

        def cat(name: str, parts: List[Optional[Tensor]], zero_fill: bool) -> Optional[Tensor]:
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                if not zero_fill:
                    hint = (" (S = None means W0 + P: call PlasticTransformer.materialize_state first)"
                            if name.endswith(".S") else "")
                    raise ValueError(f"ModelState.stack: {name} is None in some states and set in others{hint}")
                ref = next(p for p in parts if p is not None)
                parts = [ref.new_zeros((sizes[j] or 1,) + ref.shape[1:]) if p is None else p
                         for j, p in enumerate(parts)]
            return torch.cat(parts, dim=0)

        layers: List[LayerState] = []
        for i in range(n):
            kinds = {type(s.layers[i]) for s in states}
            if len(kinds) > 1:
                raise ValueError(f"ModelState.stack: layer {i} has mixed state types {kinds}")
            row = [s.layers[i] for s in states]
            if isinstance(row[0], FastLayerState):
                layers.append(FastLayerState(
                    S=cat(f"layers[{i}].S", [r.S for r in row], zero_fill=False),
                    E=cat(f"layers[{i}].E", [r.E for r in row], zero_fill=True),
                    P=cat(f"layers[{i}].P", [r.P for r in row], zero_fill=True),
                    conv=cat(f"layers[{i}].conv", [r.conv for r in row], zero_fill=True),
                ))
            else:
                layers.append(AttnLayerState(
                    k=cat(f"layers[{i}].k", [r.k for r in row], zero_fill=False),
                    v=cat(f"layers[{i}].v", [r.v for r in row], zero_fill=False),
                ))
        return ModelState(layers, states[0].position)


def check_step_inputs(input_ids, state: Optional[ModelState], modulation, *, vocab_size: int,
                      memories: Sequence[object], check_values: bool, layout: str) -> None:
    """The checks every model's forward runs on what a caller hands it (``PlasticTransformer`` and
    ``cl_arch.hf.RetrofitModel`` alike), raising ``ValueError`` naming the problem.

    Args:
        input_ids: must be ``[B, T]`` integers, ``T >= 1``, values in ``[0, vocab_size)``.
        state: None or a :class:`ModelState` with one entry per slot of ``memories`` (a
            :class:`FastLayerState` where the slot has a memory, else an :class:`AttnLayerState`)
            and batch size ``B``.
        modulation: None or ``[B, T]`` in ``[0, 1]``.
        memories: the model's ``memories()`` (None for an attention slot).
        check_values: also check values (one host read each; training loops skip them).
        layout: how the model's slots read in an error, e.g. ``"4 blocks + the readout memory"``.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids must hold at least one token (T >= 1)")
    if check_values and input_ids.numel():
        lo, hi = torch.stack(list(torch.aminmax(input_ids))).tolist()  # one sync for both bounds
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    B, T = input_ids.shape
    if state is not None:
        if not isinstance(state, ModelState):
            raise ValueError(f"state must be a ModelState, got {type(state).__name__}")
        if len(state.layers) != len(memories):
            raise ValueError(f"state has {len(state.layers)} layers, the model {len(memories)} ({layout})")
        for i, (s, m) in enumerate(zip(state.layers, memories)):
            want = FastLayerState if m is not None else AttnLayerState
            if not isinstance(s, want):
                raise ValueError(f"state.layers[{i}] is {type(s).__name__}, layer {i} needs {want.__name__}")
        if state.batch_size is not None and state.batch_size != B:
            raise ValueError(f"state batch size {state.batch_size} does not match input_ids batch size {B}")
    if modulation is not None:
        if not isinstance(modulation, torch.Tensor) or tuple(modulation.shape) != (B, T):
            shape = tuple(modulation.shape) if isinstance(modulation, torch.Tensor) else type(modulation).__name__
            raise ValueError(f"modulation must be a [B, T] = {(B, T)} tensor, got {shape}")
        if check_values and bool((~torch.isfinite(modulation) | (modulation < 0) | (modulation > 1)).any()):
            raise ValueError("modulation must be finite and in [0, 1]")
