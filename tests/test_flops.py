"""``cl_arch.flops.flop_counter``: the in-place matmuls of the no-grad paths are counted, so a row's counted
FLOPs do not depend on whether autograd is on (the chunked error write updates its state with ``baddbmm_``
only without gradients; the stock ``FlopCounterMode`` missed it)."""
import pytest
import torch
from test_error_write import _inputs
from torch.utils.flop_counter import FlopCounterMode

from cl_arch.flops import flop_counter
from cl_arch.kernels.error_write import error_write


@pytest.mark.parametrize("B,H", [(1, 1), (2, 3)], ids=["B1-H1", "B2-H3"])
def test_in_place_products_count_as_their_out_of_place_forms(B, H):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(B * H, 5, 7, generator=g), torch.randn(B * H, 7, 3, generator=g)
    out = torch.zeros(B * H, 5, 3)
    with flop_counter() as got:
        out.baddbmm_(a, b)
        out[0].addmm_(a[0], b[0])
        out[0].addbmm_(a, b)
    with FlopCounterMode(display=False) as want:
        torch.bmm(a, b)
        torch.mm(a[0], b[0])
        torch.bmm(a, b)
    assert got.get_total_flops() == want.get_total_flops() > 0


@pytest.mark.parametrize("B,H", [(1, 1), (2, 2)], ids=["B1-H1", "B2-H2"])
def test_chunked_error_write_counts_the_same_with_and_without_grad(B, H):
    x = _inputs(B, 50, H, 32, 12)
    counts = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), flop_counter() as fc:
            error_write(**x, backend="torch_chunk", chunk_size=16)
        counts[grad] = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as stock:
        error_write(**x, backend="torch_chunk", chunk_size=16)
    assert counts[True] == counts[False] > stock.get_total_flops()  # the stock mode missed the state update
