"""The episodic memory's decode step (docs/design.md, "The episodic memory"): its rule on the rows its
sparse keys fire, for both write rules.

    naive.py    the dense rule, one token and T tokens: the ground truth
    sparse.py   the in-place step on a lazily decayed state (:class:`SparseEpisodicState`), O(active rows x V)
                per token, and T-token loops over it equal to the dense rules
    step.py     the memory's one-token call on the dense layout a session holds (new S, E per token; the
                prediction, write and read on the active rows)
    decoder.py  a decode loop's memory in place from the hidden states (:class:`EpisodicDecoder`, a prototype)
"""
from .naive import naive_episodic, naive_episodic_step
from .sparse import (
                     MIN_SCALE,
                     SparseEpisodicState,
                     active,
                     sparse_delta_step,
                     sparse_episodic,
                     sparse_error_step,
                     sparse_error_write,
)

__all__ = ["MIN_SCALE", "SparseEpisodicState", "active", "naive_episodic", "naive_episodic_step", "sparse_delta_step",
           "sparse_episodic", "sparse_error_step", "sparse_error_write"]
