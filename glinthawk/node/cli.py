"""``glinthawk-node``: run one Tier 1 or Tier 2 daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import click

from glinthawk.allocator import tune_malloc
from glinthawk.cluster_options import node_cluster_options
from glinthawk.logs import configure as configure_logging
from glinthawk.metrics import serve as serve_metrics
from glinthawk.net.auth import SECRET_ENV, is_loopback
from glinthawk.net.connection import run
from glinthawk.net.netem import parse_size
from glinthawk.options import (
    device_option,
    dtype_option,
    load_checkpoint,
    model_option,
    netem_from,
    parse_address,
    read_secret,
    secret_option,
    setting_options,
)
from glinthawk.settings import DEFAULT_KV_MEMORY, NetemSettings, Tier1Settings, Tier2Settings, pick

log = logging.getLogger("glinthawk.node")


@click.command()
@click.version_option(package_name="glinthawk", prog_name="glinthawk-node")
@node_cluster_options
@click.option("--role", type=click.Choice(["tier1", "tier2"]), required=True)
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to listen on (port 0: any).")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the bound HOST:PORT here once listening (for supervisors).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", help="json: one object per line.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve Prometheus metrics on this port (same host as --listen).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch compute threads (default: torch's choice, all cores).")
@secret_option
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --listen without a shared secret.")
@setting_options(NetemSettings)
@model_option
@dtype_option
@device_option
@click.option("--tier2", "tier2_nodes", default=None, help="tier1: Tier 2 nodes, HOST:PORT[,HOST:PORT...].")
@setting_options(Tier1Settings, role="tier1")
@setting_options(Tier2Settings, role="tier2")
def main(role, listen, ready_file, log_level, log_format, metrics_port, threads, secret_file, insecure, model_dir,
         dtype, device, tier2_nodes, **settings) -> None:
    """Run a Glinthawk node: Tier 1 (weights, scheduling) or Tier 2 (KV cache + attention)."""
    configure_logging(log_level, log_format)
    tune_malloc()
    host, port = parse_address(listen)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    secret = read_secret(secret_file)
    if secret is None and not insecure and not is_loopback(host):
        raise click.UsageError(
            f"--listen {listen} is reachable from other machines but no shared secret is set; "
            f"give --secret-file (or ${SECRET_ENV}), or --insecure to accept any peer"
        )
    netem = netem_from(pick(NetemSettings, settings))
    if role == "tier2":
        node = _tier2_node(settings, netem, secret)
    else:
        node = _tier1_node(settings, tier2_nodes, model_dir, dtype, device, netem, secret)
    try:
        run(_serve(node, host, port, ready_file, metrics_port))
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None


def _tier2_node(settings: dict, netem, secret: bytes | None):
    from glinthawk.node.tier2 import Tier2Node

    try:
        kv = pick(Tier2Settings, settings)
        memory = parse_size(kv.kv_memory or DEFAULT_KV_MEMORY) if kv.kv_tokens is None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kv-memory") from None
    return Tier2Node(kv_memory=memory, kv_tokens=kv.kv_tokens, netem=netem, secret=secret, kv_dtype=kv.kv_dtype)


def _tier1_node(settings: dict, tier2_nodes: str | None, model_dir: Path, dtype: str, device: str, netem,
                secret: bytes | None):
    if not tier2_nodes:
        raise click.UsageError("tier1 needs --tier2 HOST:PORT[,HOST:PORT...]")
    addresses = [a.strip() for a in tier2_nodes.split(",") if a.strip()]
    for address in addresses:
        parse_address(address, "--tier2")
    model, tokenizer = load_checkpoint(model_dir, dtype, device)
    from glinthawk.node.tier1 import Tier1Node

    return Tier1Node(model, tokenizer, addresses, netem=netem, model_name=model_dir.name, secret=secret,
                     settings=pick(Tier1Settings, settings))


async def _serve(node, host: str, port: int, ready_file: Path | None, metrics_port: int | None) -> None:
    """Start ``node``, announce readiness, and run until SIGTERM/SIGINT, then shut down cleanly."""
    try:
        bound = await node.start(host, port)
    except ConnectionError:  # no Tier 2 node usable (main says so)
        await node.close()
        raise
    except OSError as exc:  # Tier 1 handles its connections' own errors: this one is the bind
        await node.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {_reason(exc)}; choose another --listen port, "
                                   "or stop what uses this one") from None
    log.info("listening on %s:%d", host, bound)
    if metrics_port is not None:
        try:
            metrics_bound = serve_metrics(node.metrics.registry, host, metrics_port)
        except OSError as exc:
            await node.close()
            raise click.ClickException(f"cannot serve metrics on {host}:{metrics_port}: {_reason(exc)}; "
                                       "choose another --metrics-port") from None
        log.info("metrics on http://%s:%d/metrics", host, metrics_bound)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(f"{host}:{bound}\n")
        tmp.replace(ready_file)  # atomic: a reader never sees half an address
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing work already accepted")
    await node.drain()
    await node.close()
    log.info("stopped")


def _reason(exc: OSError) -> str:
    """The system's words for a failed bind (event loops wrap them in longer messages of their own)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
