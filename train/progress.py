"""The progress bar of a training run bounded by a step count and, optionally, a wall-clock budget.

A run stops at ``max_steps`` or when ``max_minutes`` is spent, whichever comes first; its learning
rate follows the same progress, ``max(step / max_steps, elapsed / budget)``. A bar counting steps
to ``max_steps`` is wrong whenever the budget binds (``cl-arch demo`` pretraining for 150 s showed
0/5000 steps and a 25-minute ETA), so with a budget :class:`RunProgress` counts that progress in
seconds of the budget: the bar fills as the schedule advances, its ETA is the time the run has
left, and the step count goes to the postfix.
"""
from cl_arch.training import RunProgress

__all__ = ["RunProgress"]
