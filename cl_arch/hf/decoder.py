"""The decode step of a retrofitted ``transformers`` model on buffers allocated once (issue 26).

``RetrofitModel(ids[:, None], state=state)`` rebuilds a ``DynamicCache`` from the state's KV tensors,
runs each added memory's general forward and returns a new ``ModelState`` every token.
:class:`RetrofitDecoder` is the :class:`~cl_arch.decode.Decoder` of a retrofit: the base's KV lives in a
``transformers`` ``StaticCache`` (``max_len`` slots, written in place by the base's own attention), the
block memories and the episodic memory step on the same in-place slots as the PlasticTransformer's
decoder (:class:`~cl_arch.decode.slots.FastSlot`, the sparse :class:`~cl_arch.decode.slots.EpisodicSlot`),
and the whole token - the base's forward with its hooks - can be one ``torch.compile`` graph.

The hooks stay those of :class:`RetrofitModel`; during a step the model's call object is a
:class:`_SlotCall`, whose ``block`` runs the slot in place of the layer's forward.
"""
from __future__ import annotations

import torch

from ..decode import Decoder, default_active
from ..decode.slots import EpisodicSlot, FastSlot
from ..state import AttnLayerState, ModelState, check_step_inputs


class _SlotCall:
    """The call object the retrofit's hooks see during a decoder step: each block memory steps its slot
    on the one new position (``x [B, 1, d_model]``), the final norm's output is kept in ``h``."""

    def __init__(self, slots: list, mod: torch.Tensor) -> None:
        self.slots, self.mod = slots, mod
        self.h: torch.Tensor | None = None

    def block(self, j: int, layer, x: torch.Tensor) -> torch.Tensor:
        return self.slots[j].step(x[:, 0], self.mod).unsqueeze(1)


def _kv_shapes(model) -> list:
    """``(heads, head_dim, dtype)`` of each block's KV cache, read off one token of the base's own forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.base.config)
    with torch.no_grad(), model.base_only() as base:
        base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=cache, use_cache=True)
    return [(int(lyr.keys.shape[1]), int(lyr.keys.shape[-1]), lyr.keys.dtype) for lyr in cache.layers]


def retrofit_decoder_unsupported(model) -> str | None:
    """Why :class:`RetrofitDecoder` cannot decode the retrofit ``model`` (a sentence), or None."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    if model.device.type != "cpu":
        return f"the decoder runs on the CPU; the model is on {model.device}"
    kinds = {type(lyr).__name__ for lyr in StaticCache(config=model.base.config, max_cache_len=1).layers
             if type(lyr) is not StaticLayer}
    if kinds:
        return f"the decoder keeps full-attention KV caches only; the base has {sorted(kinds)} layers (sliding windows)"
    return None


class RetrofitDecoder(Decoder):
    """One-token decode steps of a :class:`~cl_arch.hf.RetrofitModel` for ``batch_size`` streams at one
    common position (:meth:`Decoder.step`, :meth:`state`, :meth:`load_state` as for the PlasticTransformer).

    Args:
        model: the retrofit, in eval mode, on the CPU.
        batch_size: ``B``.
        max_len: the KV buffer's positions (required: the base's attention has no window here).
        compile: as :class:`~cl_arch.decode.Decoder` (``torch.compile`` of the base's forward with the hooks).
        lam: the forward's ``lam`` (a float, or one entry per added memory).
        n_active: active features kept per episodic key (default :func:`~cl_arch.decode.default_active`).

    Raises:
        ValueError: a base with sliding-window layers (:func:`retrofit_decoder_unsupported`), no
            ``max_len``, training mode, a bad ``lam``.
    """

    rows_own_positions = False  # one StaticCache: the rows share a position (load_rows refuses others)

    def __init__(self, model, batch_size: int, max_len: int | None = None,
                 compile: str | bool = "auto", lam=None, n_active: int | None = None) -> None:
        from transformers import StaticCache

        why = retrofit_decoder_unsupported(model)
        if why is not None:
            raise ValueError(why)
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"a retrofit's decoder needs max_len (its KV buffer's positions), got {max_len!r}")
        self._init_common(model, batch_size, max_len, compile, lam)
        lams = model._lams(lam)
        self.slots = [FastSlot(layer, batch_size, v) for layer, v in zip(model.block_layers(), lams)]
        ep = model.episodic
        if ep is not None:
            self.slots.append(EpisodicSlot(ep, batch_size, n_active if n_active is not None else default_active(ep)))
        self.cache = StaticCache(config=model.base.config, max_cache_len=max_len)
        with torch.no_grad():
            for lyr, (heads, hd, dt) in zip(self.cache.layers, _kv_shapes(model)):
                lyr.lazy_initialization(torch.zeros(batch_size, heads, 0, hd, dtype=dt),
                                        torch.zeros(batch_size, heads, 0, hd, dtype=dt))
        self._ones = torch.ones(batch_size, dtype=torch.promote_types(self._logits.dtype, torch.float32))
        self._call = _SlotCall(self.slots[:len(model.block_layers())], self._ones)
        self.load_state(model.init_state(batch_size))

    # ------------------------------------------------------------------ state
    def load_state(self, state: ModelState) -> None:
        """Copy ``state`` (``B`` rows at one position) into the KV buffers and the memories' slots."""
        model = self.model
        check_step_inputs(torch.zeros(self.B, 1, dtype=torch.long), state, None, vocab_size=model.config.vocab_size,
                          memories=model.memories(), check_values=False, layout="the decoder's retrofit")
        pos = state.position
        if pos > self.max_len:
            raise ValueError(f"state is at position {pos}, beyond max_len {self.max_len}")
        full = model.materialize_state(state, self.B)
        n = model.n_blocks
        with torch.no_grad():
            for lyr, s in zip(self.cache.layers, full.layers[:n]):
                if (s.k is None and pos) or (s.k is not None and s.k.shape[-2] != pos):
                    raise ValueError(f"a KV cache of {0 if s.k is None else s.k.shape[-2]} positions in a state at "
                                     f"position {pos}")
                if s.k is not None:
                    lyr.keys[:, :, :pos].copy_(s.k)
                    lyr.values[:, :, :pos].copy_(s.v)
                lyr.cumulative_length.fill_(pos)
            for slot, s in zip(self.slots, full.layers[n:]):
                slot.load(s)
        self.pos.fill_(pos)
        self.positions = [pos] * self.B
        self._fresh = True

    def load_rows(self, states) -> None:
        """:meth:`load_state` of ``B`` one-row states stacked; they must share a position here."""
        states = list(states)
        if len(states) != self.B:
            raise ValueError(f"load_rows needs {self.B} states (one per row), got {len(states)}")
        if len({st.position for st in states}) > 1:
            raise ValueError(f"a retrofit's decoder keeps one position for all rows; got {[s.position for s in states]}")
        self.load_state(ModelState.stack(states))

    def load_row(self, b: int, state: ModelState) -> None:
        """Not here: the ``StaticCache`` keeps one position for every row (:meth:`load_rows` of all rows)."""
        raise NotImplementedError("a retrofit's decoder keeps one position for all rows: load every row with "
                                  "load_rows or load_state")

    def row_state(self, b: int) -> ModelState:
        """Row ``b`` of :meth:`row_states`."""
        self._check_index(b)
        return self.row_states()[b]

    def state(self) -> ModelState:
        """The buffers as a :class:`ModelState` of new tensors (KV caches trimmed to the position)."""
        self.check_overflow()
        pos = self.position
        with torch.no_grad():
            layers = [AttnLayerState(lyr.keys[:, :, :pos].clone(), lyr.values[:, :, :pos].clone()) if pos
                      else AttnLayerState() for lyr in self.cache.layers]
            layers += [slot.dump() for slot in self.slots]
        return ModelState(layers, pos)

    def row_states(self) -> list:
        """One one-row :class:`ModelState` per row (:meth:`state` split)."""
        st = self.state()
        return [ModelState([lyr.apply(lambda t, b=b: t[b:b + 1].clone()) for lyr in st.layers], st.position)
                for b in range(self.B)]

    # ------------------------------------------------------------------ decoding
    def _run(self, ids: torch.Tensor, mod: torch.Tensor) -> None:
        model = self.model
        if model._call is not None:
            raise RuntimeError("RetrofitModel.forward is not re-entrant (a call is already running)")
        self._call.mod = mod
        model._call = self._call
        try:
            super()._run(ids, mod)
        finally:
            model._call = None

    def _step_impl(self, ids: torch.Tensor, mod: torch.Tensor) -> None:
        model, call = self.model, self._call
        out = model.base(input_ids=ids[:, None], cache=self.cache, use_cache=True, position_ids=self.pos[:, None])
        logits = out.logits[:, -1]
        ep = model.episodic
        if ep is not None:
            logits = logits + self.slots[-1].step(call.h[:, -1], ids, logits, mod, model.base.get_input_embeddings(),
                                                  model.base.get_output_embeddings())
        self._logits.copy_(logits)
        self.pos.add_(1)


__all__ = ["RetrofitDecoder", "retrofit_decoder_unsupported"]
