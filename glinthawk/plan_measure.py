"""This machine's figures for ``plan_loopback.predict``, measured in this process (and one echo child).

Each is measured apart from the runs it predicts: ``bench limits``' matmul peak and read
bandwidth on one thread (a loopback node computes on one), the fixed part of a Tier 1 step from
the engine's decode steps at batch 1, and a frame's round trip over this project's framed
connections to an echo in another process.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from glinthawk.cluster import stop_process
from glinthawk.plan import TIER1_EFFICIENCY, Model
from glinthawk.plan_loopback import Host
from glinthawk.threads import torch_threads, use_threads

ECHOES = 300  # round trips timed (after as many untimed): enough for a stable median


def measure_host(model_dir: Path, dtype: str, repeats: int = 5) -> Host:
    """``Host`` figures for ``model_dir`` in ``dtype`` (a resolved one: float32, bfloat16 or float16)."""
    from glinthawk.bench import limits
    from glinthawk.compute.loader import load_model

    threads = torch_threads()
    use_threads(1)
    try:
        peak = limits.matmul_peak(limits.DTYPES[dtype], [512, 1024], repeats)
        bandwidth = limits.read_bandwidth(64 << 20, repeats)
        model = load_model(model_dir, dtype=dtype, device="cpu")
        step = _step_at_batch_one(model, model_dir) - Model.of(model.config, torch.finfo(
            limits.DTYPES[dtype]).bits // 8).flops_per_token / (peak * TIER1_EFFICIENCY)
    finally:
        use_threads(threads)
    round_trip, cpu = echo_round_trip(model.config.num_heads * model.config.head_dim,
                                      model.config.num_kv_heads * model.config.head_dim)
    return Host(matmul_peak=peak, read_bandwidth=bandwidth, step_s=max(step, 0.0), round_trip_s=round_trip,
                message_s=cpu, cores=os.cpu_count() or 1)


class OthersRunning:
    """The mean count of other processes' threads on the CPUs (running or waiting for one) while a block
    runs (``with``): sampled from /proc, less this process's and the ``pids``' (the cluster being timed)."""

    def __init__(self, pids: list[int], interval_s: float = 0.01) -> None:
        self.pids, self.interval_s, self.counts = pids, interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "OthersRunning":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        """0 where /proc could not be read."""
        return statistics.fmean(self.counts) if self.counts else 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                running = int(Path("/proc/stat").read_text().split("procs_running", 1)[1].split()[0])
                ours = sum(_running_threads(pid) for pid in [os.getpid(), *self.pids])
            except (OSError, ValueError, IndexError):
                return
            self.counts.append(max(0, running - ours))


def _running_threads(pid: int) -> int:
    count = 0
    for task in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            count += task.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass
    return count


def _step_at_batch_one(model, model_dir: Path) -> float:
    """The engine's fastest decode step for one sequence (of 16 + 32 tokens): the fixed cost on a core
    of its own, as the fastest of a kernel's runs is its speed (the slower ones lost the core a while)."""
    from glinthawk.bench.runs import run_engine
    from glinthawk.bench.workloads import request_lines, token_prompts
    from glinthawk.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir, extra_eos_ids=model.config.eos_token_ids)
    lines = request_lines(token_prompts(1, 16, model.config.vocab_size, seed=3), 32)
    run_engine(model, tokenizer, lines, kv_tokens=64)  # warm-up: oneDNN makes its primitives once
    steps = run_engine(model, tokenizer, lines, kv_tokens=64).extra["steps"]
    return min(step["seconds"] for step in steps if step["decode"])


def echo_round_trip(q_width: int, kv_width: int, rows: int = 1) -> tuple[float, float]:
    """Median wall seconds of a q/k/v frame of ``rows`` rows to an echo process and its answer back
    (q's size), and this process's CPU seconds per round trip."""
    # a fresh interpreter, as a node is; it prints its port, then echoes until stopped
    command = [sys.executable, "-c", "from glinthawk.plan_measure import _echo_main; _echo_main()"]
    echo = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline())
        return asyncio.run(_ping(port, q_width, kv_width, rows))
    finally:
        stop_process(echo)


async def _ping(port: int, q_width: int, kv_width: int, rows: int) -> tuple[float, float]:
    from glinthawk.net.connection import open_connection

    conn = await open_connection("127.0.0.1", port, handshake_frame_bytes=None)
    tensors = {"q": torch.zeros(rows, q_width, dtype=torch.bfloat16),
               "k": torch.zeros(rows, kv_width, dtype=torch.bfloat16),
               "v": torch.zeros(rows, kv_width, dtype=torch.bfloat16)}
    walls, cpu = [], 0.0
    for i in range(2 * ECHOES):
        if i == ECHOES:  # the first half warms up both ends
            cpu = time.process_time()
        started = time.perf_counter()
        await conn.send({"type": "qkv", "layer": i}, tensors)
        await conn.recv()
        walls.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu) / ECHOES
    conn.close()
    # the median: a typical round trip on free cores (others' load is a separate figure, OthersRunning)
    return statistics.median(walls[ECHOES:]), cpu


def _echo_main() -> None:
    asyncio.run(_echo())


async def _echo() -> None:
    from glinthawk.net.server import start_server

    async def answer(conn) -> None:
        async for header, tensors in conn:
            await conn.send({"type": "out", "layer": header["layer"]}, {"o": tensors["q"].clone()})

    server = await start_server(answer, "127.0.0.1", 0, handshake_frame_bytes=None)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()  # until the parent terminates this process
