"""``glinthawk bench``: reproducible performance suites.

Each suite lives in its own module (``limits``, ``engine``, ``kernels``, ``cluster``,
<<<<<<< HEAD
``latency``, ``memory``, ``capacity``, ``pipeline``, ``structured``, ``prefix``) with a ``run(ctx) -> dict`` and a ``plot(result,
axes)``; ``common`` holds what they share (machine facts, timing, the benchmark
checkpoint, workloads, JSON and PNG writing). Every speed figure is also given as a ratio
to a baseline measured in the same run, because the machines these run on are shared.
=======
``latency``, ``memory``, ``capacity``, ``pipeline``, ``structured``) with a ``run(ctx) -> dict`` and a ``plot(result,
axes)``. What they share: ``context`` (the invocation's options, the model, knobs),
``checkpoint`` (the generated benchmark model), ``workloads`` (requests and their checks),
``measure`` (timing, ratios, targets, the roofline), ``runs`` (the single-process Engine),
``nodes`` (Tier 1 and Tier 2 in process, ``LocalCluster``, node processes), ``machine``
(machine facts) and ``report`` (running a suite; JSON, PNG and table). Every speed figure
is also given as a ratio to a baseline measured in the same run, because the machines
these run on are shared.
>>>>>>> tidy23
"""

SUITES = ("limits", "engine", "kernels", "cluster", "latency", "memory", "capacity", "pipeline", "structured", "prefix")
