"""``glinthawk-node``: run one Tier 1 or Tier 2 daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import click

from glinthawk.allocator import tune_malloc
from glinthawk.compute import unbuilt_warning
from glinthawk.cluster_options import node_cluster_options
from glinthawk.logs import configure as configure_logging
from glinthawk.metrics import serve as serve_metrics
from glinthawk.net.auth import SECRET_ENV, is_loopback
from glinthawk.net.loop import run
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
from glinthawk.settings import DEFAULT_KV_MEMORY, DRAIN_TIMEOUT_S, NetemSettings, Tier1Settings, Tier2Settings, pick
from glinthawk.threads import torch_threads, use_threads

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
@click.option("--tier2", "tier2_nodes", default=None,
              help="tier1: Tier 2 nodes, HOST:PORT[,HOST:PORT...] (none: it waits for nodes to --join, on any stage).")
@click.option("--layers", default=None, metavar="A:B",
              help="tier1: serve layers A..B-1 only, as one pipeline stage (default: all). The stage with layer 0 "
                   "takes the clients; each stage but the last needs --next.")
@click.option("--next", "next_stage", default=None, metavar="HOST:PORT",
              help="tier1: the stage that serves the layers after --layers (start it first).")
@setting_options(Tier1Settings, role="tier1")
@setting_options(Tier2Settings, role="tier2")
@click.option("--join", "join", default=None, metavar="HOST:PORT",
              help="tier2: join the running Tier 1 (or pipeline stage, for its layers) listening there, and again "
                   "whenever it restarts.")
@click.option("--advertise", default=None, metavar="HOST:PORT",
              help="tier2 with --join: the address Tier 1 reaches this node at (default: the listening host, or with "
                   "0.0.0.0 this machine's address towards Tier 1, and the bound port).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=DRAIN_TIMEOUT_S, show_default=True,
              help="tier2: on SIGTERM, seconds Tier 1 may take to finish this node's sequences before it moves them.")
def main(role, listen, ready_file, log_level, log_format, metrics_port, threads, secret_file, insecure, model_dir,
         dtype, device, tier2_nodes, layers, next_stage, join, advertise, drain_timeout, **settings) -> None:
    """Run a Glinthawk node: Tier 1 (weights, scheduling) or Tier 2 (KV cache + attention)."""
    configure_logging(log_level, log_format)
    tune_malloc()
    if warning := unbuilt_warning():
        log.warning(warning)
    host, port = parse_address(listen)
    if threads is not None:
        use_threads(threads)
    secret = read_secret(secret_file)
    if secret is None and not insecure and not is_loopback(host):
        raise click.UsageError(
            f"--listen {listen} is reachable from other machines but no shared secret is set; "
            f"give --secret-file (or ${SECRET_ENV}), or --insecure to accept any peer"
        )
    netem = netem_from(pick(NetemSettings, settings))
    if role == "tier2":
        for value, param in ((join, "--join"), (advertise, "--advertise")):
            if value is not None:
                parse_address(value, param)
        if advertise is not None and join is None:
            raise click.UsageError("--advertise is for a node that joins: give --join HOST:PORT too")
        node = _tier2_node(settings, netem, secret, join=join, advertise=advertise, drain_timeout_s=drain_timeout)
    else:
        if join is not None or advertise is not None:
            raise click.UsageError("--join and --advertise are for --role tier2")
        node = _tier1_node(settings, tier2_nodes, model_dir, dtype, device, netem, secret, layers, next_stage)
    try:
        run(serve_node(node, host, port, ready_file, metrics_port))
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None


def _tier2_node(settings: dict, netem, secret: bytes | None, **joining):
    from glinthawk.node.tier2 import Tier2Node

    try:
        kv = pick(Tier2Settings, settings)
        memory = parse_size(kv.kv_memory or DEFAULT_KV_MEMORY) if kv.kv_tokens is None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--kv-memory") from None
    log.info("tier2: KV cache of %s (in tokens once Tier 1 gives the model's shape), K/V as %s, %d torch threads",
             f"{kv.kv_tokens} tokens" if memory is None else f"{memory / 2**20:.0f} MiB", kv.kv_dtype, torch_threads())
    return Tier2Node(kv_memory=memory, kv_tokens=kv.kv_tokens, netem=netem, secret=secret, kv_dtype=kv.kv_dtype,
                     **joining)


def _tier1_node(settings: dict, tier2_nodes: str | None, model_dir: Path, dtype: str, device: str, netem,
                secret: bytes | None, layers: str | None, next_stage: str | None):
    addresses = [a.strip() for a in (tier2_nodes or "").split(",") if a.strip()]
    for address in addresses:
        parse_address(address, "--tier2")
    if next_stage is not None:
        parse_address(next_stage, "--next")
    model, tokenizer = load_checkpoint(model_dir, dtype, device, _layer_range(layers))
    if next_stage is None and not model.is_last:
        raise click.UsageError(f"--layers {layers} ends before the model's last layer ({model.config.num_layers}); "
                               "give --next HOST:PORT of the stage that serves the layers after it")
    if next_stage is not None and model.is_last:
        raise click.UsageError("--next is for a stage before the last; this one ends at the model's last layer")
    tier1 = pick(Tier1Settings, settings)
    stage = "" if model.is_first and model.is_last else f", layers {model.layer_range.start}:{model.layer_range.stop}"
    log.info("tier1: model %s (%s, %d layers%s), %s on %s, %d torch threads; micro-batches in flight: %s, "
             "up to %d tokens a batch; Tier 2 nodes %s%s", model_dir, model.config.architecture,
             model.config.num_layers, stage, str(model.dtype).removeprefix("torch."), model.device, torch_threads(),
             tier1.micro_batches or "measured", tier1.max_batch_tokens, ", ".join(addresses) or "to join",
             f"; next stage {next_stage}" if next_stage else "")
    if not model.is_first:
        from glinthawk.node.stage import StageNode

        return StageNode(model, addresses, next_stage, netem=netem, secret=secret, settings=tier1)
    from glinthawk.node.tier1 import Tier1Node

    return Tier1Node(model, tokenizer, addresses, netem=netem, model_name=model_dir.name, secret=secret,
                     settings=tier1, next_stage=next_stage)


def _layer_range(layers: str | None) -> range | None:
    if layers is None:
        return None
    first, sep, stop = layers.partition(":")
    if not sep or not first.strip().isdigit() or not stop.strip().isdigit():
        raise click.BadParameter(f"expected A:B (layers A..B-1), got {layers!r}", param_hint="--layers")
    return range(int(first), int(stop))


async def serve_node(node, host: str, port: int, ready_file: Path | None, metrics_port: int | None) -> None:
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
    finished = getattr(node, "finished", None)  # a Tier 2 node that Tier 1 let go, or that cannot join
    waits = [loop.create_task(stop.wait()), *([loop.create_task(finished.wait())] if finished else [])]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    if getattr(node, "failure", None):
        await node.close()
        raise click.ClickException(node.failure)
    log.info("shutting down: finishing work already accepted")
    await node.drain()
    await node.close()
    log.info("stopped")


def _reason(exc: OSError) -> str:
    """The system's words for a failed bind (event loops wrap them in longer messages of their own)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
