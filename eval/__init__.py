"""cl_arch.eval: learning-slope benchmarks, metrics, baselines, reports and plots.

Each benchmark module exposes ``run(...) -> report dict`` (see :mod:`cl_arch.eval.report` for the
schema) and is reachable as ``cl-arch eval NAME``.
"""
BENCHMARKS = ("codebase", "tabcomplete", "games", "sutton", "retention", "cost", "offset")
