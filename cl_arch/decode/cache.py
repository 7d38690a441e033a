"""Decoders kept per model and reused, rebuilt when the weights change (sessions decode through them).

A :class:`~cl_arch.decode.Decoder` allocates its buffers once and reads the model's constant rates (decays,
``lam``, the episodic fold interval) when it is built, so a caller that decodes many short calls wants the
same decoder back each time, and a new one after anything it read has changed. :func:`cached_decoder`
keeps them on the model (one per batch size, ``lam``, compile mode and KV length) with a key over everything
a decoder depends on: every parameter's and buffer's identity, storage and in-place version counter (an
optimizer step, ``fold``, ``merge``, ``load_state_dict``, an in-place edit of ``W0`` all move it), the
model's and each fast memory's config and write rule objects (``set_write``, ``memories_off``), dtype and
device. A write through ``tensor.data`` moves no version counter and is not seen.

Several holders (sessions) may share a decoder one after another: the buffers hold one holder's state at
a time, so a holder that leaves its state in the decoder (a stream not yet finished) is told to take it
back (``holder._decoder_evicted(decoder)``) before another one loads its own.
"""
from __future__ import annotations

import json
import weakref
from typing import Any

from ..memory import FastWeightLayer
from ..memory.episodic import EpisodicMemory
from ..memory.verdict import VerdictMemory
from ..model import PlasticTransformer
from .decoder import Decoder

MAX_PER_MODEL = 4  # decoders kept per model (batch sizes, KV lengths); the least recently used goes first


def decoder_unsupported(model) -> str | None:
    """Why :class:`Decoder` cannot decode ``model`` (a sentence), or None when it can. A model of another
    kind that brings its own decoder (``model.make_decoder``, e.g. :class:`cl_arch.hf.RetrofitModel`) says
    so itself (``model.decoder_unsupported()``)."""
    if not isinstance(model, PlasticTransformer):
        if callable(getattr(model, "make_decoder", None)):
            return model.decoder_unsupported()
        return f"the Decoder decodes a PlasticTransformer, not a {type(model).__name__}"
    if model.device.type != "cpu":
        return f"the Decoder runs on the CPU; the model is on {model.device}"
    for block in model.blocks:
        if not isinstance(block.mixer, FastWeightLayer) and not hasattr(block.mixer, "qkv_proj"):
            return f"the Decoder has no step for the mixer {type(block.mixer).__name__}"
    for mem in model.output_memories():
        ok = isinstance(mem, (VerdictMemory, EpisodicMemory)) or \
            (hasattr(mem, "key_kind") and mem.write.name in ("delta", "error"))
        if not ok:
            return f"the Decoder has no step for the {type(mem).__name__} memory {mem.config.name!r}"
    return None


def weights_key(model) -> tuple:
    """What a decoder built now depends on, as ids and counters (objects it names are kept alive by the
    cache entry, so an id is not reused while the entry stands)."""
    tensors = list(model.parameters()) + list(model.buffers())
    fast = model.fast_layers()
    return (id(model.config), tensors[0].dtype if tensors else None, str(model.device),
            tuple((id(t), t.data_ptr(), t._version) for t in tensors),
            tuple((id(m), id(m.config), id(getattr(m, "write", None))) for m in fast))


class _Entry:
    __slots__ = ("decoder", "holder", "key", "refs")

    def __init__(self, decoder: Decoder, key: tuple, refs: list) -> None:
        self.decoder, self.key, self.refs = decoder, key, refs
        self.holder: weakref.ref | None = None


class DecoderCache:
    """The decoders of one model (kept on it as ``model._cl_arch_decoders``). A copy or pickle of the
    model starts with an empty cache: the buffers belong to this model object."""

    def __init__(self) -> None:
        self.entries: dict = {}

    def __deepcopy__(self, memo) -> DecoderCache:
        return DecoderCache()

    def __getstate__(self) -> dict:
        return {"entries": {}}

    def _evict(self, entry: _Entry) -> None:
        holder = entry.holder() if entry.holder is not None else None
        entry.holder = None
        if holder is not None:
            holder._decoder_evicted(entry.decoder)

    def get(self, model, batch_size: int, holder: Any, lam=None, compile="auto", max_len: int | None = None
            ) -> Decoder:
        """The decoder for these settings, built or rebuilt as needed, now held by ``holder`` (whose
        state the caller then loads). The previous holder, if another, is told to take its state back."""
        slot = (batch_size, json.dumps(lam), compile, max_len)
        key = weights_key(model)
        entry = self.entries.pop(slot, None)
        if entry is not None and entry.key != key:
            self._evict(entry)  # its holder's state is still good: only the rates the decoder read are stale
            entry = None
        if entry is None:
            refs = [model.config, *model.parameters(), *model.buffers(),
                    *[(m, m.config, getattr(m, "write", None)) for m in model.fast_layers()]]
            was = model.training
            model.eval()  # the Decoder reads the model in eval mode (no dropout)
            try:
                make = model.make_decoder if callable(getattr(model, "make_decoder", None)) else \
                    lambda *a, **k: Decoder(model, *a, **k)
                entry = _Entry(make(batch_size, max_len=max_len, compile=compile, lam=lam), key, refs)
            finally:
                model.train(was)
        elif entry.holder is not None and entry.holder() is not holder:
            self._evict(entry)
        entry.holder = weakref.ref(holder)
        self.entries[slot] = entry  # most recently used last
        while len(self.entries) > MAX_PER_MODEL:
            old = next(iter(self.entries))
            self._evict(self.entries.pop(old))
        return entry.decoder

    def clear(self) -> None:
        """Drop every decoder (their holders take their states back first)."""
        for entry in self.entries.values():
            self._evict(entry)
        self.entries.clear()


def cached_decoder(model, batch_size: int, holder: Any, lam=None, compile="auto",
                   max_len: int | None = None) -> Decoder:
    """:meth:`DecoderCache.get` on ``model``'s cache (created on first use)."""
    cache = model.__dict__.get("_cl_arch_decoders")
    if cache is None:
        cache = DecoderCache()
        model.__dict__["_cl_arch_decoders"] = cache
    return cache.get(model, batch_size, holder, lam=lam, compile=compile, max_len=max_len)


def still_current(model, decoder: Decoder) -> bool:
    """Whether ``decoder`` is the model's cached decoder for its settings and the weights it read are unchanged."""
    cache = model.__dict__.get("_cl_arch_decoders")
    if cache is None:
        return False
    key = weights_key(model)
    return any(e.decoder is decoder and e.key == key for e in cache.entries.values())


__all__ = ["DecoderCache", "cached_decoder", "decoder_unsupported", "still_current", "weights_key"]
