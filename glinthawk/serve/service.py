"""Running the service: its stores under --data-dir, the web server, and a clean stop.

On SIGTERM or SIGINT the service stops taking requests and closes its batches' connections to
Tier 1, which spools their results; each batch's record still says ``in_progress``, so the next
start resumes it. A SIGKILL leaves the same state behind, less what Tier 1 had not spooled, which
the resumed batch simply runs again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from glinthawk.client import SubmitError, fetch_status
from glinthawk.serve.app import Service, make_app, owner_of
from glinthawk.serve.batches import BatchStore
from glinthawk.serve.files import FileStore
from glinthawk.serve.runner import Runner, Tier1

log = logging.getLogger("glinthawk.serve")
WATCH_INTERVAL_S = 0.5


@dataclass
class ServeConfig:
    data_dir: Path
    host: str
    port: int
    keys: list[str]
    max_file_bytes: int
    max_running: int = 4
    ready_file: Path | None = None


async def model_name(tier1: Tier1, attempts: int = 10) -> str:
    """The model Tier 1 serves (what /v1/models lists); also proves Tier 1 answers before we listen."""
    for attempt in range(attempts):
        try:
            return str((await fetch_status(tier1.host, tier1.port, secret=tier1.secret))["model"])
        except SubmitError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def serve(config: ServeConfig, tier1: Tier1, check_alive: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, or until ``check_alive`` (the local cluster's) raises."""
    files = FileStore(config.data_dir / "files", config.max_file_bytes)
    batches = BatchStore(config.data_dir / "batches")
    online_dir = config.data_dir / "online"
    shutil.rmtree(online_dir, ignore_errors=True)  # requests of a previous life: nobody waits for them
    online_dir.mkdir(parents=True)
    runner = Runner(batches, files, tier1, config.max_running)
    service = Service(files, batches, runner, tier1, await model_name(tier1), online_dir,
                      {key: owner_of(key) for key in config.keys})
    site_runner = web.AppRunner(make_app(service), access_log=None, handle_signals=False)
    await site_runner.setup()
    try:
        site = web.TCPSite(site_runner, config.host, config.port)
        await site.start()
        host, port = site._server.sockets[0].getsockname()[:2]  # the port bound, when asked for 0
        log.info("serving the OpenAI API on http://%s:%d/v1 (model %s, data in %s)", host, port, service.model,
                 config.data_dir)
        if config.ready_file is not None:
            config.ready_file.write_text(f"{host}:{port}\n")
        runner.resume_all()
        await _until_stopped(check_alive)
    finally:
        await runner.close()
        await site_runner.cleanup()


async def _until_stopped(check_alive: Callable[[], None] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        if check_alive is not None:
            check_alive()
        try:
            await asyncio.wait_for(stop.wait(), WATCH_INTERVAL_S)
        except TimeoutError:
            pass
    log.info("stopping: unfinished batches resume at the next start")
