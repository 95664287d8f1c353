"""A whole Glinthawk cluster on loopback: N Tier 2 processes and one Tier 1 process, or Tier 1
cut into pipeline stages, each with N Tier 2 processes of its own.

Each child binds port 0 and reports its address through a ready file, so there is no
port race. Children get SIGTERM when this process dies (PR_SET_PDEATHSIG) and on every
exit path of the context manager, Tier 1 first so it can finish its work. Their logs go to
``log_dir``, or to a temporary directory that is removed after a clean run (kept, and
logged, when a node or the run failed: the logs are what explains it).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from glinthawk.settings import LOCAL_TIER2_NODES, NetemSettings, Tier1Settings, Tier2Settings, split, to_args
from glinthawk.threads import CoreShares

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# Tier 1 finishes running requests for up to node.tier1.DRAIN_TIMEOUT_S (60 s) on SIGTERM: a
# SIGKILL before that would lose their results and leave its spool directory behind.
TIER1_STOP_TIMEOUT_S = 75.0
WATCH_INTERVAL_S = 0.5

T = TypeVar("T")
log = logging.getLogger("glinthawk.cluster")


class ClusterError(RuntimeError):
    """A node failed to start or died; the message carries the tail of its log."""


def stop_process(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (a node's clean shutdown), then SIGKILL if it outlives ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    ready_file: Path
    address: str | None = None
    args: list[str] = field(default_factory=list)  # its role's arguments, to start it again

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def exit_report(self) -> str:
        """How the node ended, and the tail of its log (a SIGKILL out of nowhere may be the OOM killer)."""
        code = self.process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"{self.name} {how}; log {self.log_path}:\n{self.log_tail()}"


def spawn_node(name: str, args: list[str], log_dir: Path, options: list[str] | tuple = (), *,
               env: dict[str, str] | None = None, module: str = "glinthawk.node") -> NodeProcess:
    """Start ``python -m module args options --ready-file F`` (a node, by default), its output
    appended to ``log_dir/NAME.log``; ``wait_ready`` waits for it. ``args``: what starts it
    again (``NodeProcess.args``)."""
    ready = log_dir / f"{name}.addr"
    ready.unlink(missing_ok=True)
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, "-m", module, *args, *options, "--ready-file", str(ready)]
    with open(log_path, "ab") as log:  # a restarted node's log goes on after its first life's
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, preexec_fn=_die_with_parent, start_new_session=True)
    return NodeProcess(name, process, log_path, ready, args=args)


def wait_ready(node: NodeProcess, timeout_s: float = READY_TIMEOUT_S) -> str:
    """``node``'s address once it has written its ready file; ClusterError if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.ready_file.exists():
            node.address = node.ready_file.read_text().strip()
            return node.address
        if node.process.poll() is not None:
            raise ClusterError(f"a node failed to start: {node.exit_report()}")
        time.sleep(0.05)
    raise ClusterError(f"{node.name} not ready after {timeout_s:.0f} s; log {node.log_path}")


def stage_layers(stages: int | str | None, num_layers: int) -> list[range]:
    """Tier 1's layer ranges: ``stages`` as a count (layers split evenly, the first stages
    taking one more where they do not divide) or as "A:B,B:C,..." ranges; None: one stage."""
    if stages is None:
        return [range(num_layers)]
    if isinstance(stages, int) or str(stages).strip().isdigit():
        count = int(stages)
        if not 1 <= count <= num_layers:
            raise ValueError(f"--stages {count}: give 1 to {num_layers} stages (the model has {num_layers} layers)")
        bounds = [i * num_layers // count for i in range(count + 1)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]
    try:
        ranges = [range(int(a), int(b)) for a, b in (part.split(":") for part in str(stages).split(","))]
    except ValueError:
        raise ValueError(f"--stages {stages!r}: give a count or layer ranges A:B,B:C,...") from None
    if ranges[0].start != 0 or ranges[-1].stop != num_layers or any(
            not r or nxt.start != r.stop for r, nxt in zip(ranges, [*ranges[1:], range(num_layers, num_layers + 1)])):
        raise ValueError(f"--stages {stages}: the ranges must cover layers 0:{num_layers} in order, each after the "
                         "one before without gap or overlap")
    return ranges


class LocalCluster:
    """``tier2_nodes`` Tier 2 processes and one Tier 1 on this machine; with ``stages`` (see
    ``stage_layers``), a Tier 1 process per stage, each with ``tier2_nodes`` of its own.

    ``settings``: any field of ``Tier1Settings`` (``max_seqs=2``), ``Tier2Settings`` (each
    node's ``kv_memory`` or ``kv_tokens``) or ``NetemSettings`` (``delay_ms=10``), all
    defaulting as the nodes do. ``micro_batches="auto"``: Tier 1 measures the count (as a node
    does by default). ``micro_batches`` left out: 1 on a plain loopback (the
    largest batch), 4 with injected delay. ``tier1_threads``: Tier 1's torch threads (left out:
    ``threads.CoreShares`` decides).
    """

    def __init__(self, model_dir: Path, tier2_nodes: int = LOCAL_TIER2_NODES, *, dtype: str = "auto",
                 device: str = "auto", micro_batches: int | str | None = None, log_dir: Path | None = None,
                 secret_file: Path | None = None, stages: int | str | None = None, tier1_threads: int | None = None,
                 **settings: Any):
        self.model_dir, self.tier2_nodes, self.dtype, self.device = model_dir, tier2_nodes, dtype, device
        self.stages = stage_layers(stages, model_layers(model_dir)) if stages is not None else [None]
        self.micro_batches, self.log_dir, self.secret_file = micro_batches, log_dir, secret_file
        self.tier1_threads = tier1_threads  # None: CoreShares decides (every core with one stage)
        self.temporary_logs = log_dir is None  # a directory of our own: removed after a clean run
        self.tier1, self.tier2, self.netem = split(settings, Tier1Settings, Tier2Settings, NetemSettings)
        self.nodes: list[NodeProcess] = []

    def __enter__(self) -> "LocalCluster":
        if self.tier2_nodes < 1:
            raise ValueError("a cluster needs at least one Tier 2 node")
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="glinthawk-run-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            next_stage = None
            for index in reversed(range(len(self.stages))):  # from the last stage: each needs its next
                next_stage = self._start_stage(index, next_stage)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_stage(self, index: int, next_stage: str | None) -> str:
        """Start stage ``index``'s Tier 2 nodes, then the stage; returns its address."""
        prefix = f"stage-{index}-" if index else ""
        first = len(self.nodes)
        for i in range(self.tier2_nodes):  # each in self.nodes at once: stop() covers it if the next fails
            self.nodes.append(self._spawn(f"{prefix}tier2-{i}", ["--role", "tier2", *self.tier2.kv_args]))
        addresses = ",".join(wait_ready(node) for node in self.nodes[first:])
        layers = self.stages[index]
        args = ["--role", "tier1", "--model", str(self.model_dir), "--tier2", addresses, "--dtype", self.dtype,
                "--device", self.device, *to_args(self.tier1_settings)]
        if layers is not None:
            args += ["--layers", f"{layers.start}:{layers.stop}"]
        if next_stage is not None:
            args += ["--next", next_stage]
        self.nodes.append(self._spawn(f"stage-{index}" if index else "tier1", args))
        return wait_ready(self.nodes[-1])

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(clean=exc_type is None)

    def close(self, clean: bool = True) -> Path | None:
        """Stop every node. A temporary log directory is removed when ``clean`` (the caller's run went
        well) and every node exited 0; otherwise it stays and is logged. Returns where the logs are, if kept."""
        self.stop()
        if not self.temporary_logs or self.log_dir is None:
            return self.log_dir
        if clean and all(node.process.returncode == 0 for node in self.nodes):
            shutil.rmtree(self.log_dir, ignore_errors=True)
            return None
        log.warning("the nodes' logs are kept in %s", self.log_dir)
        return self.log_dir

    @property
    def in_flight(self) -> int | None:
        """Micro-batches for Tier 1: hiding latency needs several; without any, one batch is largest.
        With stages, one more than there are stages, so that each stage has one to compute."""
        if self.micro_batches == "auto":
            return None
        if self.micro_batches:
            return self.micro_batches
        base = 4 if self.netem.delay_ms or self.netem.jitter_ms else 1
        return base if len(self.stages) == 1 else max(base, len(self.stages) + 1)

    @property
    def tier1_settings(self) -> Tier1Settings:
        """Each stage's settings: the count in flight, and how many stages these shared cores run at once."""
        concurrent = self.tier1.concurrent_stages or (self.shares.concurrent_stages() if len(self.stages) > 1 else None)
        return dataclasses.replace(self.tier1, micro_batches=self.in_flight, concurrent_stages=concurrent)

    @property
    def tier1_address(self) -> tuple[str, int]:
        host, port = self.nodes[-1].address.rsplit(":", 1)
        return host, int(port)

    @property
    def shares(self) -> CoreShares:
        """Each node's threads and spin-wait (``glinthawk.threads``): all share this machine's cores."""
        return CoreShares(len(self.stages), self.tier2_nodes, self.in_flight, self.tier1_threads)

    def threads_for(self, name: str) -> int:
        return self.shares.threads_for(name)

    def spin_rounds_for(self, name: str) -> int:
        return self.shares.spin_rounds_for(name)

    def env_for(self, name: str) -> dict[str, str]:
        return self.shares.env_for(name)

    def _spawn(self, name: str, args: list[str], listen: str = "127.0.0.1:0") -> NodeProcess:
        options = ["--listen", listen, "--threads", str(self.threads_for(name)), *to_args(self.netem)]
        if self.secret_file:
            options += ["--secret-file", str(self.secret_file)]
        return spawn_node(name, args, self.log_dir, options, env=self.env_for(name))

    def check_alive(self) -> None:
        """Raise ClusterError once the cluster cannot go on: a Tier 1 stage has died, or every
        Tier 2 node of one stage has."""
        tier1 = self.nodes[-1]
        if tier1.process.poll() is not None:
            raise ClusterError(f"Tier 1 died: {tier1.exit_report()}")
        for index, layers in enumerate(self.stages):
            prefix = f"stage-{index}-" if index else ""
            stage = next(n for n in self.nodes if n.name == (f"stage-{index}" if index else "tier1"))
            if stage.process.poll() is not None:
                raise ClusterError(f"Tier 1 stage {layers.start}:{layers.stop} died: {stage.exit_report()}")
            tier2 = [n for n in self.nodes if n.name.startswith(f"{prefix}tier2-")]
            if all(node.process.poll() is not None for node in tier2):
                raise ClusterError("every Tier 2 node" + (f" of stage {layers.start}:{layers.stop}" if index else "")
                                   + " died, so nothing can run: " + "\n".join(n.exit_report() for n in tier2))

    async def watch(self, work: Awaitable[T]) -> T:
        """Await ``work`` (a client of this cluster), which the nodes' deaths would leave waiting
        forever: once ``check_alive`` fails, ``work`` is cancelled and its ClusterError raised."""
        task = asyncio.ensure_future(work)
        try:
            while not (await asyncio.wait({task}, timeout=WATCH_INTERVAL_S))[0]:
                self.check_alive()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.exception() is not None:
            self.check_alive()  # a dead node explains a lost connection better
        return task.result()

    def stop(self) -> None:
        """SIGTERM Tier 1, then the Tier 2 nodes and the later stages; SIGKILL whatever outlives the timeout."""
        for node in reversed(self.nodes):  # Tier 1 (the first stage) was started last
            stop_process(node.process, TIER1_STOP_TIMEOUT_S if node is self.nodes[-1] else STOP_TIMEOUT_S)

    def kill(self, name: str) -> None:
        """SIGKILL one node (for failure tests)."""
        node = next(n for n in self.nodes if n.name == name)
        os.kill(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def restart(self, name: str) -> None:
        """Start a Tier 2 node or later stage that died again, at its address, where the others look for it
        (for failure tests)."""
        index, node = next((i, n) for i, n in enumerate(self.nodes) if n.name == name)
        if node is self.nodes[-1] or node.process.poll() is None:
            raise ValueError(f"{name} is Tier 1 or still running")
        self.nodes[index] = fresh = self._spawn(name, node.args, listen=node.address)
        wait_ready(fresh)


def model_layers(model_dir: Path) -> int:
    """How many layers the checkpoint in ``model_dir`` has (from its config.json only)."""
    from glinthawk.compute.config import ModelConfig

    return ModelConfig.from_file(Path(model_dir) / "config.json").num_layers
