"""Link emulation: its settings, the sender that holds frames back, and the parsers for sizes and
bandwidths given on a command line."""

import asyncio
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
# Lower-cased size units -> bytes; the bare K, M, G, T are binary, as in most tools.
_SIZE_UNITS = (
    {"": 1, "b": 1}
    | {p + "b": n for p, n in _DECIMAL.items() if p}
    | {p + "b": n for p, n in _BINARY.items()}
    | {p[0]: n for p, n in _BINARY.items()}
)
# Bandwidth units -> bits/s, keyed with the prefix lower-cased; a capital B means bytes.
_BANDWIDTH_UNITS = (
    {"": 1}
    | {p + suffix: n for p, n in _DECIMAL.items() for suffix in ("bit", "bps")}
    | {p + "B": 8 * n for p, n in (_DECIMAL | _BINARY).items()}
)
_MAX_DELAYED_FRAMES = 1024  # sent but held back by a NetEm; beyond this, send() waits
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([A-Za-z/]*)\s*")


@dataclass(frozen=True)
class NetEm:
    """One-way delay, jitter and bandwidth cap added to everything a connection sends.

    ``bandwidth_bps`` is in bits per second (None: unlimited). Each frame is delayed by
    ``delay_ms`` plus a uniform draw from ``[-jitter_ms, +jitter_ms]`` (never below zero),
    frames keep their order, and with a bandwidth cap each frame also occupies the link
    for ``8 * size / bandwidth_bps`` seconds, later frames queueing behind it.
    """

    delay_ms: float = 0
    jitter_ms: float = 0
    bandwidth_bps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_ms) and self.delay_ms >= 0):
            raise ValueError(f"delay_ms must be a finite number >= 0, got {self.delay_ms!r}")
        if not (math.isfinite(self.jitter_ms) and self.jitter_ms >= 0):
            raise ValueError(f"jitter_ms must be a finite number >= 0, got {self.jitter_ms!r}")
        bw = self.bandwidth_bps
        if bw is not None and not (math.isfinite(bw) and bw > 0):
            raise ValueError(f"bandwidth_bps must be a finite number > 0 or None, got {bw!r}")

    @property
    def active(self) -> bool:
        """Whether this changes anything; an inactive NetEm writes frames immediately."""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.bandwidth_bps is not None


def _split(text: str, what: str, example: str) -> tuple[Fraction, str]:
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"cannot parse {what} {text!r}: expected a number and a unit, like {example!r}")
    return Fraction(match[1]), match[2]


def parse_size(value: str | int) -> int:
    """Parse a byte count: ``"8GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"1000000"``, or an int.

    Units, case-insensitive: B; kB, MB, GB, TB (powers of 1000); KiB, MiB, GiB, TiB, and
    the bare K, M, G, T (powers of 1024). Fractional byte counts round down.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size must be >= 0 bytes, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"size must be a str or int, got {type(value).__name__}")
    number, unit = _split(value, "size", "8GiB")
    scale = _SIZE_UNITS.get(unit.lower())
    if scale is None:
        raise ValueError(f"unknown size unit in {value!r}: use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB")
    return int(number * scale)


def parse_bandwidth(value: str | float) -> float:
    """Parse a bandwidth into bits per second.

    Accepts a plain number (bits/s), bit rates ``"100Mbit"``, ``"1Gbit/s"``, ``"10Mbps"``
    (units bit, kbit, Mbit, Gbit, Tbit or bps, kbps, …; powers of 1000, prefix
    case-insensitive) and byte rates ``"50MB/s"``, ``"1GiB/s"`` (a capital B, ``/s``
    optional; kB, MB, … powers of 1000, KiB, MiB, … powers of 1024).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bits = float(value)
    elif isinstance(value, str):
        number, unit = _split(value, "bandwidth", "100Mbit")
        bits = float(number * _bandwidth_scale(unit, value))
    else:
        raise ValueError(f"bandwidth must be a str or number, got {type(value).__name__}")
    if not (math.isfinite(bits) and bits > 0):
        raise ValueError(f"bandwidth must be > 0 and finite, got {value!r}")
    return bits


def _bandwidth_scale(unit: str, text: str) -> int:
    """Bits per second in one ``unit`` (as written after the number in ``text``)."""
    base = unit.removesuffix("/s")
    key = base[:-1].lower() + "B" if base.endswith("B") else base.lower()
    scale = _BANDWIDTH_UNITS.get(key)
    if scale is None:
        raise ValueError(
            f"unknown bandwidth unit in {text!r}: use bit, kbit, Mbit, Gbit (or bps, Mbps, …) "
            "for bits/s, or B/s, kB/s, MB/s, MiB/s, … for bytes/s"
        )
    return scale


class DelayedSender:
    """Holds frames back to emulate a link's latency, jitter and bandwidth, in order.

    A frame is due at ``max(previous due, transmitted + delay ± jitter)``. Without a
    bandwidth cap it is transmitted when sent; with one, transmission starts once the
    link has finished the frames before it and takes ``8 * size / bandwidth_bps``.
    Every frame is scheduled when it is enqueued, and a task writes it when due, so
    the caller of ``send`` never waits for the emulated delay.
    """

    def __init__(self, protocol: Any, netem: NetEm) -> None:  # connection._FrameProtocol
        self._protocol = protocol
        self._netem = netem
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[float, list[memoryview | bytes]] | None] = asyncio.Queue()
        self._room = asyncio.Event()  # set while fewer than _MAX_DELAYED_FRAMES are queued
        self._room.set()
        self._last_due = 0.0
        self._link_free = 0.0
        self._task = self._loop.create_task(self._run())
        protocol.lost.add_done_callback(self._on_lost)

    def _on_lost(self, _: asyncio.Future[None]) -> None:
        self._task.cancel()
        self._room.set()  # wake senders waiting for room; they find the connection lost

    async def put(self, buffers: list[memoryview | bytes]) -> None:
        while self._queue.qsize() >= _MAX_DELAYED_FRAMES and not self._protocol.lost.done():
            self._room.clear()
            await self._room.wait()
        if self._protocol.lost.done():
            from .connection import ConnectionClosed  # (which imports this module)

            raise ConnectionClosed(self._protocol.closed_reason or "connection lost")
        now = self._loop.time()
        netem = self._netem
        sent = now
        if netem.bandwidth_bps is not None:
            nbytes = sum(memoryview(b).nbytes for b in buffers)
            sent = self._link_free = max(now, self._link_free) + 8 * nbytes / netem.bandwidth_bps
        delay = netem.delay_ms + random.uniform(-netem.jitter_ms, netem.jitter_ms)
        self._last_due = max(self._last_due, sent + max(delay, 0.0) / 1000)
        self._queue.put_nowait((self._last_due, buffers))

    def close(self) -> None:
        """Close the transport once every frame already enqueued has been written."""
        self._queue.put_nowait(None)

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            due, buffers = item
            await asyncio.sleep(due - self._loop.time())
            self._protocol.write(buffers)
            self._room.set()
            await self._protocol.drain()
        self._protocol.close()
