"""Drawing one token from a session's next-token logits (:func:`_sample`)."""
from typing import Optional

import torch

from .inputs import _check_logits


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            allowed: Optional[torch.Tensor], generator: torch.Generator) -> int:
    """Draw one token from ``logits [V]``; deterministic given the generator state.

    Inverse-CDF sampling with one ``torch.rand`` draw per token, in float64, so the draw for a
    session does not depend on which other sessions share its batch.
    """
    x = logits.detach().to("cpu", torch.float64).clone()
    _check_logits(x)  # on the host copy: no extra device sync per decoded token
    if allowed is not None:
        mask = torch.full_like(x, float("-inf"))
        mask[allowed] = 0.0
        x = x + mask
    if temperature == 0.0:
        return int(torch.argmax(x))
    x = x / temperature
    if top_k is not None and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sp, 0) - sp) < top_p  # smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    cdf = torch.cumsum(probs, 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    idx = int(torch.searchsorted(cdf, u.reshape(1), right=True))
    idx = min(idx, x.numel() - 1)
    while probs[idx] == 0 and idx > 0:  # u landed on the right edge of a zero-mass run
        idx -= 1
    return idx
