"""Counting matmul FLOPs with ``torch.utils.flop_counter`` including the in-place products.

``FlopCounterMode`` knows ``mm``, ``addmm``, ``bmm``, ``baddbmm`` but not their in-place forms, which the
no-grad paths use to update a state without a copy (the chunked error write's ``baddbmm_``, the decoder's
readout write): counted with the stock mode, a reading row's FLOPs fell by about a sixth the day its state update
went in place. :func:`flop_counter` is the stock mode with those forms added.
"""
from __future__ import annotations

from math import prod

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``self += a [M, K] @ b [K, N]``: 2 M K N."""
    return 2 * prod(a_shape) * b_shape[-1]


def _baddbmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``self += a [B, M, K] @ b [B, K, N]``: 2 B M K N."""
    return 2 * prod(a_shape) * b_shape[-1]


def _addbmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``self += sum_b a [B, M, K] @ b [B, K, N]``: 2 B M K N."""
    return 2 * prod(a_shape) * b_shape[-1]


IN_PLACE_MATMULS = {aten.addmm_: _addmm_, aten.baddbmm_: _baddbmm_, aten.addbmm_: _addbmm_,
                    aten.addbmm: _addbmm_}


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts ``addmm_``, ``baddbmm_`` and ``addbmm(_)``."""
    return FlopCounterMode(display=display, custom_mapping=dict(IN_PLACE_MATMULS))


__all__ = ["IN_PLACE_MATMULS", "flop_counter"]
