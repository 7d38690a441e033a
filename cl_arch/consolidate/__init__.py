"""Consolidation: compile what sessions' fast weights learned into the model's slow weights.

- :func:`fold`: ``W0 <- W0 + P``, exact; with a forgetting budget, ``W0 <- W0 + c P`` and the session keeps ``(1 - c) P``.
- :func:`merge`: many sessions into W0 at once (weighted mean or TIES sign consensus), with each
  session's gain before and after (interference).
- :func:`distill`: teacher (with P) -> student (P reset) on replayed tokens, anchored to the
  original model; rolled back when forgetting exceeds the budget.
- :func:`undo`: restore, bitwise, the weights a consolidation replaced (and the sessions' P).

Each returns a report dict (see :mod:`cl_arch.consolidate.report`); ``write_report`` writes it as
JSON with its undo weights next to it.
"""
from .distill import distill
from .fold import fold
from .merge import merge
from .report import load_report, undo, write_report

__all__ = ["fold", "merge", "distill", "undo", "write_report", "load_report"]
