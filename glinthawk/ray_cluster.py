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
join that stage. Each Tier 2 actor reserves what it will use of Ray's ``memory`` resource (its KV
and its process: ``ray_memory``), so that Ray never places more on a machine than it has; given
no KV size, they all get the largest that Ray's machines hold (``ray_memory.auto_kv_memory``).
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
from glinthawk.ray_memory import Tier2Size, machines_of, tier2_options, tier2_sizes, unplaced
from glinthawk.settings import NetemSettings, Tier1Settings, Tier2Settings, split, to_args

T = TypeVar("T")
RAY_HINT = "--ray needs Ray: pip install 'glinthawk[ray]'"
READY_TIMEOUT_S = 300.0
JOIN_TIMEOUT_S = 120.0


def stage_token_bytes(model_dir: Path, stages: list[range | None], dtype: str, kv_dtype: str) -> list[int]:
    """A token's KV bytes on each stage's Tier 2 nodes (what --kv-tokens costs there): its layers' K and V as
    a node keeps them, a --dtype left to auto counted as float32 (the widest auto picks, on Tier 1's machine)."""
    import torch

    from glinthawk.compute.config import ModelConfig
    from glinthawk.compute.kvcache import bytes_per_token, storage_dtype
    from glinthawk.compute.loader import DTYPES

    config = ModelConfig.from_file(Path(model_dir) / "config.json")
    stored = storage_dtype(kv_dtype, DTYPES.get(dtype, torch.float32))
    return [bytes_per_token(len(layers) if layers is not None else config.num_layers, config.num_kv_heads,
                            config.head_dim, stored) for layers in stages]


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

    def __init__(self, args: list[str], secret: str):
        import ray

        from glinthawk.cluster import _die_with_parent

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
    ``tier2_nodes`` of its own. ``tier2`` without a KV size: each actor gets the largest that Ray's
    machines hold (``ray_memory``)."""

    def __init__(self, address: str, model_dir: Path, tier2_nodes: int, *, dtype: str = "auto",
                 device: str = "auto", tier1: Tier1Settings | None = None, tier2: Tier2Settings | None = None,
                 netem: NetemSettings | None = None, secret: bytes | None = None, stages: list[range] | None = None,
                 place_timeout_s: float = READY_TIMEOUT_S):
        """``place_timeout_s``: how long Ray may take to place and start the Tier 2 actors."""
        self.address, self.model_dir, self.tier2_nodes = address, model_dir, tier2_nodes
        self.dtype, self.device, self.place_timeout_s = dtype, device, place_timeout_s
        self.tier1_settings, self.netem = tier1 or Tier1Settings(), netem or NetemSettings()
        self.tier2_settings = tier2 or Tier2Settings()
        self.stages: list[range | None] = list(stages) if stages else [None]
        self.secret = secret.decode() if secret else secrets.token_hex(32)
        self.tier1: Any = None
        self.later: list[Any] = []  # the stages after the first, in order
        self.tier2: list[Any] = []  # every stage's, the first's first
        self.reserved: list[int] = []  # the bytes of Ray memory each of self.tier2 reserved
        self.tier1_address: tuple[str, int] | None = None

    @classmethod
    def from_options(cls, address: str, model_dir: Path, tier2_nodes: int, *, dtype: str = "auto",
                     device: str = "auto", secret: bytes | None = None, stages: int | str | None = None,
                     **settings: Any) -> "RayCluster":
        """As ``LocalCluster`` takes them: ``settings`` are fields of Tier1Settings, Tier2Settings or
        NetemSettings (a name none has is a TypeError); ``stages`` a count or ranges (ValueError if wrong)."""
        from glinthawk.cluster import model_layers, stage_layers

        tier1, tier2, netem = split(settings, Tier1Settings, Tier2Settings, NetemSettings)
        ranges = stage_layers(stages, model_layers(model_dir)) if stages is not None else None
        return cls(address, model_dir, tier2_nodes, dtype=dtype, device=device, tier1=tier1, tier2=tier2,
                   netem=netem, secret=secret, stages=ranges)

    @property
    def sized(self) -> bool:
        """Whether the Tier 2 actors were given a KV size (else they get the largest Ray's machines hold)."""
        return self.tier2_settings.sized

    @property
    def tier1_args(self) -> list[str]:
        return ["--dtype", self.dtype, "--device", self.device, *to_args(self.tier1_settings), *to_args(self.netem)]

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
        sizes = self._tier2_sizes(ray)  # refused here, before any actor starts, if Ray's machines cannot hold them
        node = ray.remote(NodeProcess)
        addresses = self._start_stages(ray, node)
        host, port = addresses[0].rsplit(":", 1)
        self.tier1_address = (host, int(port))
        for address, size in zip(addresses, sizes):
            for _ in range(self.tier2_nodes):
                self.tier2.append(node.options(**tier2_options(size.reserve)).remote(
                    ["--role", "tier2", "--join", address, *size.args, *to_args(self.netem)], self.secret))
                self.reserved.append(size.reserve)
        self._until_placed(ray)
        asyncio.run(self._until_joined())

    def _tier2_sizes(self, ray) -> list[Tier2Size]:
        """Each stage's Tier 2 KV options and Ray memory; RuntimeError in one line if the machines cannot hold them."""
        kv = self.tier2_settings
        try:
            token_bytes = (stage_token_bytes(self.model_dir, self.stages, self.dtype, kv.kv_dtype)
                           if kv.kv_tokens is not None else [0] * len(self.stages))  # only --kv-tokens needs them
            return tier2_sizes(kv, machines_of(ray.nodes()), len(self.stages) * self.tier2_nodes, token_bytes)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None

    def _until_placed(self, ray) -> None:
        """Wait for every Tier 2 actor to start. Ray leaves an actor whose memory no machine has free
        pending for ever: after ``place_timeout_s`` those are killed and named, with the memory they miss."""
        refs = [actor.address.remote() for actor in self.tier2]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.place_timeout_s)
        if pending:
            late = [i for i, ref in enumerate(refs) if ref in pending]
            reserve = max(self.reserved[i] for i in late)
            for i in reversed(late):  # gone now: close() would wait on each for an answer it never gets
                ray.kill(self.tier2.pop(i), no_restart=True)
                self.reserved.pop(i)
            free = ray.available_resources().get("memory", 0)
            raise RuntimeError(unplaced(len(late), len(refs), reserve, free, self.place_timeout_s))
        self._get(ray, refs, "the Tier 2 actors")  # one that failed to start, in one line

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
