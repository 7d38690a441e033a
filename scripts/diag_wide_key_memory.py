"""Diagnostic for issue 12: can a snapshot of an output-side memory help a second pass over a text?

The shipped model reads the first N bytes of asyncio/base_events.py (asyncio is the tuning package,
never a reported stream) with its own fast memories carried. Beside it, an untrained delta-rule
memory writes ``phi(h_{t-1}) -> one-hot(x_t)`` and adds ``scale * phi(h_t)^T S`` to the logits,
where ``phi`` is the unit hidden state itself (128-d, like the readout memory's keys) or unit ReLU
random features of it (F dims). Pass 2 reads the same bytes starting from pass 1's final S (the
snapshot a session would save as P). Prints each setting's pass-1 gain over the model alone and
pass 2's gain over pass 1 (bits/byte).

    python scripts/diag_wide_key_memory.py [N_BYTES=8000]
"""
import math
import sys

import torch
import torch.nn.functional as F

from cl_arch.eval.lib.models import default_model
from cl_arch.eval.lib.streams import held_out_package


def main():
    torch.set_num_threads(2)
    model = default_model(log=lambda *a: None)
    path = held_out_package("asyncio") + "/base_events.py"
    data = open(path, "rb").read()[:int(sys.argv[1]) if len(sys.argv) > 1 else 8000]
    ids = torch.tensor([10] + list(data[:-1]))[None]; tgt = torch.tensor(list(data))
    hs = {}
    model.norm_f.register_forward_hook(lambda m, i, o: hs.__setitem__("h", o))
    with torch.no_grad():
        logits_all, h_all = [], []
        st = None
        for c in range(0, ids.shape[1], 256):
            lg, st = model(ids[:, c:c + 256], state=st)
            logits_all.append(lg[0]); h_all.append(hs["h"][0])
        base_logits = torch.cat(logits_all); H = F.normalize(torch.cat(h_all), dim=-1)  # [N, 128]
    N = len(data)
    def bits(lg):
        return (F.cross_entropy(lg, tgt, reduction="none") / math.log(2)).numpy()
    b0 = bits(base_logits)
    for Fdim in (128, 2048, 8192):
        g = torch.Generator().manual_seed(0)
        if Fdim == 128:
            phi = H
        else:
            R = torch.randn(Fdim, 128, generator=g)
            phi = F.normalize(F.relu(H @ R.T), dim=-1)
        for beta, scale in ((1.0, 0.5), (1.0, 1.0), (1.0, 3.0)):
            def run(S):
                S = S.clone(); out = torch.empty(N, 256)
                prev = torch.zeros(Fdim)
                for t in range(N):
                    q = phi[t]
                    out[t] = q @ S
                    # write: key = phi of the previous position, value = one-hot of the current input byte
                    k = phi[t - 1] if t > 0 else None
                    if k is not None:
                        v = torch.zeros(256); v[ids[0, t]] = 1.0
                        S += beta * torch.outer(k, v - k @ S)
                # the last target is written too
                v = torch.zeros(256); v[tgt[-1]] = 1.0; S += beta * torch.outer(phi[-1], v - phi[-1] @ S)
                return out, S
            with torch.no_grad():
                r1, S1 = run(torch.zeros(Fdim, 256))
                r2, _ = run(S1)
            p1, p2 = bits(base_logits + scale * r1), bits(base_logits + scale * r2)
            w = slice(500, 1000)
            print(f"F={Fdim} beta={beta} scale={scale}: pass1 gain over base {b0.mean()-p1.mean():+.3f}, "
                  f"pass2 vs pass1 @ bytes 500-1000 {p1[w].mean()-p2[w].mean():+.3f}, overall pass2 vs pass1 {p1.mean()-p2.mean():+.3f}")


if __name__ == "__main__":
    main()
