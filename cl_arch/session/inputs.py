"""Checks of what a session is given and what its model returns.

Token ids (:func:`_as_ids`), rewards (:func:`_as_reward`, bounded by ``MAX_ABS_REWARD``),
rule settings (:func:`_check_rule`, named in ``RULE_KEYS``), sampling arguments
(:func:`_check_sampling`) and the model's logits (:func:`_check_logits`). Each raises a
``ValueError`` naming the problem before the session changes.
"""
import math
import numbers
from typing import Any, Sequence

import torch

RULE_KEYS = ("lam", "gamma", "eta_s", "eta_r", "clip", "rho")


def _as_ids(ids: Any, vocab_size: int, what: str = "ids", allow_empty: bool = False) -> torch.Tensor:
    """Token ids as a ``[1, T]`` long tensor; ValueError naming the problem otherwise.

    Accepts a sequence of ints, ``bytes``, or an integer tensor ``[T]`` / ``[1, T]``.
    """
    if isinstance(ids, str):
        raise ValueError(f"{what} must be token ids, got a str (encode it first, e.g. text.encode())")
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{what} must have an integer dtype, got {ids.dtype}")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"{what} must be 1-D [T] (or [1, T]), got shape {tuple(ids.shape)}")
        t = ids.detach().to("cpu", torch.long)
    elif isinstance(ids, (bytes, bytearray)):
        t = torch.tensor(list(ids), dtype=torch.long)
    elif isinstance(ids, Sequence):
        for x in ids:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise ValueError(f"{what} must hold integers, got {type(x).__name__} {x!r}")
        t = torch.tensor([int(x) for x in ids], dtype=torch.long)
    else:
        raise ValueError(f"{what} must be a list of ints, bytes or an integer tensor, got {type(ids).__name__}")
    if t.numel() == 0 and not allow_empty:
        raise ValueError(f"{what} is empty")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"{what} out of vocabulary: values must lie in [0, {vocab_size}), got "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t.reshape(1, -1)


# The advantage r - b multiplies the clipped eligibility trace in float32, so a reward near the
# float32 range (3.4e38) turns P into inf even though the float is finite. Rewards are meant to be
# O(1) (docs/design.md, "The commit": the running baseline centres them, it does not rescale them);
# anything beyond this bound is a scale bug.
MAX_ABS_REWARD = 1e6


def _as_reward(r: Any) -> float:
    """A finite Python float with ``|r| <= MAX_ABS_REWARD``, or ValueError (NaN, inf, too large,
    bool, non-numeric, non-scalar tensor)."""
    if isinstance(r, torch.Tensor):
        if r.numel() != 1 or r.dtype == torch.bool or r.dtype.is_complex:
            raise ValueError(f"reward must be a finite real number, got a tensor of shape "
                             f"{tuple(r.shape)} and dtype {r.dtype}")
        r = r.item()
    if isinstance(r, bool) or not isinstance(r, numbers.Real):
        raise ValueError(f"reward must be a finite real number, got {type(r).__name__} {r!r}")
    r = float(r)
    if not math.isfinite(r):
        raise ValueError(f"reward must be finite, got {r}")
    if abs(r) > MAX_ABS_REWARD:
        raise ValueError(f"reward {r:g} is out of range: |reward| must be <= {MAX_ABS_REWARD:g} (the advantage "
                         f"multiplies the fast-weight trace in float32; rescale rewards to about [-1, 1])")
    return r


def _check_rule(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"rule setting {name} must be a finite float, got {v!r}")
    v = float(v)
    ok = {"lam": 0.0 <= v <= 1.0, "gamma": 0.0 < v <= 1.0, "clip": v > 0.0, "rho": 0.0 <= v <= 1.0}.get(name, True)
    if not ok:
        rng = {"lam": "[0, 1]", "gamma": "(0, 1]", "clip": "(0, inf)", "rho": "[0, 1]"}[name]
        raise ValueError(f"rule setting {name} must be in {rng}, got {v}")
    return v


def _check_logits(logits: torch.Tensor) -> None:
    """NaN/inf logits would sample the last token (every comparison with NaN is False) and score
    as "no prediction": refuse them before the session takes anything from the forward."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(f"the model produced non-finite logits ({bad} NaN/inf of {logits.numel()} entries): its "
                         "weights or this session's memory hold NaN/inf or overflow; the session is unchanged")


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")
