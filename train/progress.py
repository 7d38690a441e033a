"""The progress bar of a training run bounded by a step count and, optionally, a wall-clock budget.

A run stops at ``max_steps`` or when ``max_minutes`` is spent, whichever comes first; its learning
rate follows the same progress, ``max(step / max_steps, elapsed / budget)``. A bar counting steps
to ``max_steps`` is wrong whenever the budget binds (``cl-arch demo`` pretraining for 150 s showed
0/5000 steps and a 25-minute ETA), so with a budget :class:`RunProgress` counts that progress in
seconds of the budget: the bar fills as the schedule advances, its ETA is the time the run has
left, and the step count goes to the postfix.
"""
from __future__ import annotations

from typing import Optional


class RunProgress:
    """A tqdm bar over a run's progress (see the module docstring).

    Args:
        desc: the bar's label.
        max_steps: the run's step limit.
        budget_s: wall-clock budget in seconds, or None (the bar then counts steps).
        step, elapsed: where a resumed run starts (steps done, seconds spent before).
        disable: no bar (other processes, ``train.progress: false``).
        file: where tqdm writes (default stderr).
    """

    def __init__(self, desc: str, max_steps: int, budget_s: Optional[float] = None, step: int = 0,
                 elapsed: float = 0.0, disable: bool = False, file=None):
        from tqdm.auto import tqdm

        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 or None, got {budget_s}")
        self.max_steps, self.budget, self.step = max_steps, budget_s, step
        if budget_s is None:
            self.bar = tqdm(total=max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
                            disable=disable, file=file)
        else:
            fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s of budget [{elapsed}<{remaining}{postfix}]"
            self.bar = tqdm(total=budget_s, initial=self.position(step, elapsed), desc=desc, unit="s",
                            bar_format=fmt, dynamic_ncols=True, disable=disable, file=file)

    def position(self, step: int, elapsed: float) -> float:
        """Where the bar stands: ``step`` (no budget), else ``progress * budget`` seconds with
        ``progress = max(step / max_steps, elapsed / budget)`` capped at 1."""
        if self.budget is None:
            return float(step)
        return min(1.0, max(step / self.max_steps, elapsed / self.budget)) * self.budget

    def update(self, step: int, elapsed: float, **postfix) -> None:
        """Move to ``step`` steps done after ``elapsed`` seconds; ``postfix`` is shown beside the bar."""
        self.step = step
        if self.budget is not None:
            postfix = {"step": f"{step}/{self.max_steps}", **postfix}
        delta = self.position(step, elapsed) - self.bar.n
        if self.budget is None:
            delta = int(delta)  # whole steps print as "3/40", not "3.0/40"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(delta)  # tqdm's own rate estimate, hence its ETA, follows these increments

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


__all__ = ["RunProgress"]
