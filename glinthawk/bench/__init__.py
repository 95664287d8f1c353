"""``glinthawk bench``: reproducible performance suites.

Each suite lives in its own module (``limits``, ``engine``, ``kernels``, ``cluster``,
``latency``, ``memory``, ``capacity``, ``pipeline``, ``structured``, ``prefix``) with a ``run(ctx) -> dict`` and a ``plot(result,
axes)``; ``common`` holds what they share (machine facts, timing, the benchmark
checkpoint, workloads, JSON and PNG writing). Every speed figure is also given as a ratio
to a baseline measured in the same run, because the machines these run on are shared.
"""

SUITES = ("limits", "engine", "kernels", "cluster", "latency", "memory", "capacity", "pipeline", "structured", "prefix")
