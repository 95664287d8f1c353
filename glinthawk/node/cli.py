"""``glinthawk-node``: run one Tier 1 or Tier 2 daemon."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from glinthawk.allocator import tune_malloc
from glinthawk.cli import device_option, dtype_option, load_checkpoint, model_option
from glinthawk.cluster_options import node_cluster_options
from glinthawk.logs import configure as configure_logging
from glinthawk.metrics import serve as serve_metrics
from glinthawk.net.auth import SECRET_ENV, SecretError, is_loopback, load_secret
from glinthawk.net.connection import run
from glinthawk.net.netem import NetEm, parse_bandwidth, parse_size

log = logging.getLogger("glinthawk.node")


def parse_address(value: str, param: str = "--listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint=param)
    return host or "127.0.0.1", int(port)


def netem_from_options(delay_ms: float, jitter_ms: float, bandwidth: str | None) -> NetEm | None:
    try:
        netem = NetEm(delay_ms, jitter_ms, parse_bandwidth(bandwidth) if bandwidth else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--inject-*") from None
    return netem if netem.active else None


def secret_option(f):
    return click.option(
        "--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help=f"Shared secret for the HMAC handshake (default: ${SECRET_ENV} if set).",
    )(f)


def read_secret(secret_file: Path | None) -> bytes | None:
    try:
        return load_secret(secret_file)
    except SecretError as exc:
        raise click.BadParameter(str(exc), param_hint="--secret-file") from None


def netem_options(f):
    f = click.option("--inject-bandwidth", default=None, help="Cap on what this node sends, e.g. 1Gbit.")(f)
    f = click.option("--inject-jitter-ms", type=click.FloatRange(min=0), default=0.0, help="± jitter on that delay.")(f)
    f = click.option("--inject-delay-ms", type=click.FloatRange(min=0), default=0.0,
                     help="One-way delay added to everything this node sends (emulates a slower network).")(f)
    return f


@click.command()
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
@netem_options
@model_option
@dtype_option
@device_option
@click.option("--tier2", "tier2_nodes", default=None, help="tier1: Tier 2 nodes, HOST:PORT[,HOST:PORT...].")
@click.option("--micro-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="tier1: micro-batches in flight (each may span every Tier 2 node).")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="tier1: tokens per micro-batch step.")
@click.option("--max-seqs", type=click.IntRange(min=1), default=256, show_default=True,
              help="tier1: sequences per micro-batch.")
@click.option("--kv-memory", default=None, help="tier2: KV cache size, e.g. 8GiB.")
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None, help="tier2: KV cache size in tokens.")
def main(role, listen, ready_file, log_level, log_format, metrics_port, threads, secret_file, insecure, inject_delay_ms, inject_jitter_ms, inject_bandwidth, model_dir, dtype,
         device, tier2_nodes, micro_batches, max_batch_tokens, max_seqs, kv_memory, kv_tokens) -> None:
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
    netem = netem_from_options(inject_delay_ms, inject_jitter_ms, inject_bandwidth)
    if role == "tier2":
        if kv_memory is None and kv_tokens is None:
            kv_memory = "1GiB"
        try:
            memory = parse_size(kv_memory) if kv_tokens is None else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--kv-memory") from None
        from glinthawk.node.tier2 import Tier2Node

        node = Tier2Node(kv_memory=memory, kv_tokens=kv_tokens, netem=netem, secret=secret)
        run(_serve(node, host, port, ready_file, metrics_port))
        return
    if not tier2_nodes:
        raise click.UsageError("tier1 needs --tier2 HOST:PORT[,HOST:PORT...]")
    addresses = [a.strip() for a in tier2_nodes.split(",") if a.strip()]
    for address in addresses:
        parse_address(address, "--tier2")
    model, tokenizer = load_checkpoint(model_dir, dtype, device)
    from glinthawk.node.tier1 import Tier1Node

    node = Tier1Node(model, tokenizer, addresses, micro_batches=micro_batches, max_batch_tokens=max_batch_tokens,
                     max_seqs=max_seqs, netem=netem, model_name=model_dir.name, secret=secret)
    try:
        run(_serve(node, host, port, ready_file, metrics_port))
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(node, host: str, port: int, ready_file: Path | None, metrics_port: int | None) -> None:
    """Start ``node``, announce readiness, and run until SIGTERM/SIGINT, then shut down cleanly."""
    bound = await node.start(host, port)
    log.info("listening on %s:%d", host, bound)
    if metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, serve_metrics(node.metrics.registry, host, metrics_port))
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
