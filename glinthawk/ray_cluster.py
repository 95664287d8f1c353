"""``glinthawk run --ray``: the nodes as Ray actors, so that Ray places, starts, watches and restarts
them across its machines; the tiers still talk over glinthawk's own connections.

Each actor holds one ``glinthawk-node`` process (its own event loop, signals and logs, as
anywhere else) and dies with it, so that Ray restarts a Tier 2 actor whose node died: the new
node joins Tier 1 again (``--join``), which has rebuilt the lost node's sequences meanwhile.
Nobody types a host: Tier 1's actor says where it listens and the Tier 2 actors join it there.
Nodes listen on their machine's address, so they authenticate with a shared secret: the one
given, or a random one made for the run and handed to the actors in their environment.
Tier 1 asks Ray for a GPU when its device is CUDA; Tier 2 actors are spread over the machines.
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
    ("auto": the one this machine belongs to; "local": start one here, for trying it out)."""

    def __init__(self, address: str, model_dir: Path, tier2_nodes: int, *, tier1_args: list[str],
                 tier2_args: list[str], device: str = "auto", secret: bytes | None = None):
        self.address, self.model_dir, self.tier2_nodes = address, model_dir, tier2_nodes
        self.tier1_args, self.tier2_args, self.device = tier1_args, tier2_args, device
        self.secret = secret.decode() if secret else secrets.token_hex(32)
        self.tier1: Any = None
        self.tier2: list[Any] = []
        self.tier1_address: tuple[str, int] | None = None

    @classmethod
    def from_options(cls, address: str, model_dir: Path, tier2_nodes: int, *, dtype: str = "auto",
                     device: str = "auto", secret: bytes | None = None, **settings: Any) -> "RayCluster":
        """As ``LocalCluster`` takes them: ``settings`` are fields of Tier1Settings, Tier2Settings or
        NetemSettings (a name none has is a TypeError)."""
        from glinthawk.settings import NetemSettings, Tier1Settings, Tier2Settings, split, to_args

        tier1, tier2, netem = split(settings, Tier1Settings, Tier2Settings, NetemSettings)
        return cls(address, model_dir, tier2_nodes, device=device, secret=secret,
                   tier1_args=["--dtype", dtype, "--device", device, *to_args(tier1), *to_args(netem)],
                   tier2_args=[*tier2.kv_args, *to_args(netem)])

    def __enter__(self) -> "RayCluster":
        ray = import_ray()
        if not ray.is_initialized():
            local = self.address == "local"  # every actor is granted its CPU, shared as on `glinthawk run`
            ray.init(address=None if local else self.address, include_dashboard=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, self.tier2_nodes + 1) if local else None)
        try:
            self._start(ray)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, ray) -> None:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < self.tier2_nodes + 1:
            raise RuntimeError(f"the Ray cluster has {cpus:g} CPUs; Tier 1 and {self.tier2_nodes} Tier 2 actors take "
                               "one each: add machines, or ask for fewer --tier2-nodes")
        node = ray.remote(NodeProcess)
        gpus = 1 if self.device.startswith("cuda") else 0
        self.tier1 = node.options(num_cpus=1, num_gpus=gpus, max_restarts=0).remote(
            ["--role", "tier1", "--model", str(self.model_dir), *self.tier1_args], self.secret)
        host, port = self._get(ray, self.tier1.address.remote(), "Tier 1").rsplit(":", 1)
        self.tier1_address = (host, int(port))
        self.tier2 = [node.options(num_cpus=1, max_restarts=-1, max_task_retries=-1,
                                   scheduling_strategy="SPREAD").remote(
            ["--role", "tier2", "--join", f"{host}:{port}", *self.tier2_args], self.secret)
            for _ in range(self.tier2_nodes)]
        self._get(ray, [actor.address.remote() for actor in self.tier2], "the Tier 2 actors")
        asyncio.run(self._until_joined())

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
            if sum(node["alive"] for node in status["tier2"]) >= self.tier2_nodes:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the Tier 2 actors did not join Tier 1 within {JOIN_TIMEOUT_S:g} s")

    async def watch(self, work: Awaitable[T]) -> T:
        """Ray restarts what dies; a client of this cluster just waits for its work."""
        return await work

    def close(self, clean: bool = True) -> None:
        """Stop every actor (``clean`` is LocalCluster's: the nodes' logs stay with Ray either way)."""
        ray = import_ray()
        for actor in [self.tier1, *self.tier2]:  # Tier 1 first: it finishes what runs on its nodes
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
