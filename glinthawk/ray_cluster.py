"""``glinthawk run --ray``: the nodes as Ray actors, so that Ray places, starts, watches and restarts
them across its machines; the tiers still talk over glinthawk's own connections.

Each actor holds one ``glinthawk-node`` process (its own event loop, signals and logs, as
anywhere else) and dies with it, so that Ray restarts a Tier 2 actor whose node died: the new
node joins Tier 1 again (``--join``), which has rebuilt the lost node's sequences meanwhile.
Nobody types a host: Tier 1's actor says where it listens and the Tier 2 actors join it there.
Nodes listen on their machine's address, so they authenticate with a shared secret: the one
given, or a random one made for the run and handed to the actors in their environment.
Tier 1 asks Ray for a GPU when its device is CUDA; Tier 2 actors are spread over the machines.

With pipeline stages, each stage is an actor of its own (a GPU each, on CUDA), started from the
last so that each is given its next one's address (``--next``), and every stage's Tier 2 actors
join that stage. A Tier 2 actor given no KV size takes a share of the memory Ray reports for its
machine (``kv_memory_for``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, TypeVar

from glinthawk.net.auth import SECRET_ENV

T = TypeVar("T")
RAY_HINT = "--ray needs Ray: pip install 'glinthawk[ray]'"
READY_TIMEOUT_S = 300.0
JOIN_TIMEOUT_S = 120.0
# Of the memory Ray reports for a machine (its "memory" resource: RAM less Ray's object store),
# what its Tier 2 actors' KV may take together; the rest is left to a Tier 1 there and the OS.
RAY_KV_FRACTION = 0.8


def kv_memory_for(node_memory: float, actors_on_node: int, fraction: float = RAY_KV_FRACTION) -> int:
    """Bytes of KV for one of ``actors_on_node`` Tier 2 actors on a machine for which Ray reports
    ``node_memory`` bytes: its share of ``fraction`` of that, less what its process needs beside
    the KV, counted as ``glinthawk plan`` does (a fixed GiB, and 4.5% more RSS than KV).
    ValueError when that leaves nothing."""
    from glinthawk.plan import GiB, TIER2_FIXED, TIER2_KV_OVERHEAD

    share = fraction * node_memory / max(1, actors_on_node)
    kv = int((share - TIER2_FIXED) / TIER2_KV_OVERHEAD)
    if kv <= 0:
        raise ValueError(f"Ray reports {node_memory / GiB:.1f} GiB of memory on a machine for {actors_on_node} "
                         f"Tier 2 actor(s): {fraction:.0%} of it leaves no KV beside each process's "
                         f"{TIER2_FIXED / GiB:g} GiB; give --kv-memory (or --kv-tokens), or run fewer Tier 2 nodes")
    return kv


def node_memory(ray) -> float:
    """The memory Ray reports for the machine this actor (or driver) runs on."""
    here = ray.get_runtime_context().get_node_id()
    return next(float(node["Resources"].get("memory", 0)) for node in ray.nodes() if node["NodeID"] == here)


class RayMissing(RuntimeError):
    """Ray is not installed."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(RAY_HINT) from None
    return ray


class NodeProcess:
    """The body of a node actor: a glinthawk-node process on the actor's machine. The actor exits
    when the node does (unless it was told to stop), for Ray to restart it."""

    def __init__(self, args: list[str], secret: str, kv_share: int | None = None):
        """``kv_share``: a Tier 2 node given no KV size, one of (at most) that many on its machine."""
        import ray

        from glinthawk.cluster import _die_with_parent

        if kv_share is not None:
            args = [*args, "--kv-memory", str(kv_memory_for(node_memory(ray), kv_share))]
        self.host = ray.util.get_node_ip_address()
        ready = Path(tempfile.mkdtemp(prefix="glinthawk-ray-")) / "ready"
        env = {**os.environ, SECRET_ENV: secret}
        self.stopping = False
        self.process = subprocess.Popen([sys.executable, "-m", "glinthawk.node", *args, "--listen", f"{self.host}:0",
                                         "--ready-file", str(ready)], env=env, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"glinthawk-node {' '.join(args)} did not start (exit {self.process.poll()})")
            time.sleep(0.05)
        self.listen = ready.read_text().strip()
        threading.Thread(target=self._exit_with_node, daemon=True).start()

    def _exit_with_node(self) -> None:
        code = self.process.wait()
        if not self.stopping:
            os._exit(code or 1)  # the actor goes with its node: Ray restarts it (a Tier 2 node joins again)

    def address(self) -> str:
        return self.listen

    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        self.stopping = True
        self.process.terminate()
        return self.process.wait()


class RayCluster:
    """Tier 1 and ``tier2_nodes`` Tier 2 nodes as Ray actors on the Ray cluster at ``address``
    ("auto": the one this machine belongs to; "local": start one here, for trying it out); with
    ``stages`` (layer ranges, ``cluster.stage_layers``), a Tier 1 actor per stage, each with
    ``tier2_nodes`` of its own. ``tier2_args`` without a KV size: each sized from its machine."""

    def __init__(self, address: str, model_dir: Path, tier2_nodes: int, *, tier1_args: list[str],
                 tier2_args: list[str], device: str = "auto", secret: bytes | None = None,
                 stages: list[range] | None = None):
        self.address, self.model_dir, self.tier2_nodes = address, model_dir, tier2_nodes
        self.tier1_args, self.tier2_args, self.device = tier1_args, tier2_args, device
        self.stages: list[range | None] = list(stages) if stages else [None]
        self.secret = secret.decode() if secret else secrets.token_hex(32)
        self.tier1: Any = None
        self.later: list[Any] = []  # the stages after the first, in order
        self.tier2: list[Any] = []  # every stage's, the first's first
        self.tier1_address: tuple[str, int] | None = None

    @classmethod
    def from_options(cls, address: str, model_dir: Path, tier2_nodes: int, *, dtype: str = "auto",
                     device: str = "auto", secret: bytes | None = None, stages: int | str | None = None,
                     **settings: Any) -> "RayCluster":
        """As ``LocalCluster`` takes them: ``settings`` are fields of Tier1Settings, Tier2Settings or
        NetemSettings (a name none has is a TypeError); ``stages`` a count or ranges (ValueError if wrong)."""
        from glinthawk.cluster import model_layers, stage_layers
        from glinthawk.settings import NetemSettings, Tier1Settings, Tier2Settings, split, to_args

        tier1, tier2, netem = split(settings, Tier1Settings, Tier2Settings, NetemSettings)
        ranges = stage_layers(stages, model_layers(model_dir)) if stages is not None else None
        return cls(address, model_dir, tier2_nodes, device=device, secret=secret, stages=ranges,
                   tier1_args=["--dtype", dtype, "--device", device, *to_args(tier1), *to_args(netem)],
                   tier2_args=[*(tier2.kv_args if tier2.sized else tier2.dtype_args), *to_args(netem)])

    @property
    def sized(self) -> bool:
        return any(arg in ("--kv-memory", "--kv-tokens") for arg in self.tier2_args)

    def __enter__(self) -> "RayCluster":
        ray = import_ray()
        if not ray.is_initialized():
            local = self.address == "local"  # every actor is granted its CPU, shared as on `glinthawk run`
            ray.init(address=None if local else self.address, include_dashboard=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, self.actors) if local else None)
        try:
            self._start(ray)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def actors(self) -> int:
        return len(self.stages) * (1 + self.tier2_nodes)

    def _start(self, ray) -> None:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < self.actors:
            raise RuntimeError(f"the Ray cluster has {cpus:g} CPUs; {len(self.stages)} Tier 1 actor(s) with "
                               f"{self.tier2_nodes} Tier 2 actors each take one CPU apiece: add machines, or ask for "
                               "fewer --tier2-nodes (or --stages)")
        share = None if self.sized else self._kv_share(ray)
        node = ray.remote(NodeProcess)
        addresses = self._start_stages(ray, node)
        host, port = addresses[0].rsplit(":", 1)
        self.tier1_address = (host, int(port))
        self.tier2 = [node.options(num_cpus=1, max_restarts=-1, max_task_retries=-1,
                                   scheduling_strategy="SPREAD").remote(
            ["--role", "tier2", "--join", address, *self.tier2_args], self.secret, share)
            for address in addresses for _ in range(self.tier2_nodes)]
        self._get(ray, [actor.address.remote() for actor in self.tier2], "the Tier 2 actors")
        asyncio.run(self._until_joined())

    def _start_stages(self, ray, node) -> list[str]:
        """Start Tier 1 (each stage, from the last: each is given its next one's address); their addresses."""
        gpus = 1 if self.device.startswith("cuda") else 0
        addresses: list[str] = []
        for layers in reversed(self.stages):  # each kept in self.later at once: close() stops it if the next fails
            args = ["--role", "tier1", "--model", str(self.model_dir), *self.tier1_args]
            if layers is not None:
                args += ["--layers", f"{layers.start}:{layers.stop}"]
            if addresses:
                args += ["--next", addresses[0]]
            self.later.insert(0, node.options(num_cpus=1, num_gpus=gpus, max_restarts=0).remote(args, self.secret))
            what = "Tier 1" if layers is None else f"Tier 1 stage {layers.start}:{layers.stop}"
            addresses.insert(0, self._get(ray, self.later[0].address.remote(), what))
        self.tier1 = self.later.pop(0)
        return addresses

    def _kv_share(self, ray) -> int:
        """How many Tier 2 actors a machine holds at most (SPREAD deals them out evenly), checked
        against the smallest machine's memory here, so a KV size that cannot be is refused in one line."""
        machines = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
        share = -(-len(self.stages) * self.tier2_nodes // max(1, len(machines)))
        try:
            kv_memory_for(min(float(n["Resources"].get("memory", 0)) for n in machines), share)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        return share

    @staticmethod
    def _get(ray, refs, what: str):
        """An actor's answer, or why there is none, in one line (not a Ray traceback)."""
        try:
            return ray.get(refs, timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{what} did not start within {READY_TIMEOUT_S:g} s (are the resources free?)") from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"{what} failed to start: {str(exc).splitlines()[0]}") from None

    async def _until_joined(self) -> None:
        from glinthawk.client import fetch_status

        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            status = await fetch_status(*self.tier1_address, secret=self.secret.encode())
            stages = [status["tier2"], *(stage["tier2"] for stage in status.get("stages", ()))]
            if all(sum(node["alive"] for node in nodes) >= self.tier2_nodes for nodes in stages):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the Tier 2 actors did not join Tier 1 within {JOIN_TIMEOUT_S:g} s")

    async def watch(self, work: Awaitable[T]) -> T:
        """Ray restarts what dies; a client of this cluster just waits for its work."""
        return await work

    def close(self, clean: bool = True) -> None:
        """Stop every actor (``clean`` is LocalCluster's: the nodes' logs stay with Ray either way)."""
        ray = import_ray()
        for actor in [self.tier1, *self.later, *self.tier2]:  # Tier 1 first: it finishes what runs on its nodes
            if actor is not None:
                try:
                    ray.get(actor.stop.remote(), timeout=90)
                except Exception:  # an actor already gone, or one that does not stop: Ray kills it
                    pass
                ray.kill(actor, no_restart=True)
        if self.address == "local":
            ray.shutdown()

    def __exit__(self, *exc: object) -> None:
        self.close()
