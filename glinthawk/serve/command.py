"""``glinthawk serve``: the click command. It imports aiohttp only when it runs, so the rest of the
CLI works without the ``serve`` extra installed."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import click

from glinthawk.net.auth import is_loopback
from glinthawk.net.netem import parse_size
from glinthawk.options import (
    device_option,
    dtype_option,
    model_option,
    parse_address,
    read_secret,
    setting_options,
)
from glinthawk.settings import LOCAL_TIER2_NODES, StepSettings, Tier2Settings

DEFAULT_LISTEN = "127.0.0.1:8000"


def read_api_keys(path: Path | None) -> list[str]:
    """The keys of --api-key-file: one a line; blank lines and '#' comments skipped."""
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                                 param_hint="--api-key-file") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise click.BadParameter(f"{path} holds no key (one a line)", param_hint="--api-key-file")
    return keys


def lock_data_dir(data_dir: Path) -> None:
    """Hold --data-dir for this process's life: two services on one directory would run each batch twice."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise click.BadParameter(f"cannot use {data_dir}: {exc.strerror}", param_hint="--data-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise click.ClickException(f"another glinthawk serve uses {data_dir}; stop it or choose another "
                                   "--data-dir") from None


@click.command("serve")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where files and batches are kept; a restarted service resumes the batches found here.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT of the HTTP API (port 0: any).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="API keys, one a line; each request must send one (Authorization: Bearer KEY), and sees only "
                   "the files and batches made with it. Required for a non-loopback --listen.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --listen without --api-key-file.")
@click.option("--to", "to", default=None, help="A running Tier 1, HOST:PORT (default: start a local cluster).")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret of the cluster (default: $GLINTHAWK_SECRET if set).")
@model_option
@dtype_option
@device_option
@click.option("--tier2-nodes", type=click.IntRange(min=1), default=LOCAL_TIER2_NODES, show_default=True,
              help="Tier 2 processes of the local cluster (without --to).")
@setting_options(Tier2Settings, role="each Tier 2 node")
@setting_options(StepSettings)
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the local cluster's logs go (default: a new temporary directory).")
@click.option("--max-file-size", default="512MiB", show_default=True, help="Largest upload accepted.")
@click.option("--max-running-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Batches sent to the cluster at once; the others wait in_progress.")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the bound HOST:PORT here once serving (for supervisors and tests).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def serve(data_dir, listen, api_key_file, insecure, to, secret_file, model_dir, dtype, device, tier2_nodes,
          log_dir, max_file_size, max_running_batches, ready_file, log_level, **settings) -> None:
    """Serve OpenAI's Batch API (Files, Batches) and online completions over a cluster."""
    from glinthawk.logs import configure

    host, port = parse_address(listen)
    keys = read_api_keys(api_key_file)
    if not keys and not insecure and not is_loopback(host):
        raise click.UsageError(f"--listen {listen} is reachable from other machines; give --api-key-file, "
                               "or --insecure to serve anyone")
    try:
        max_bytes = parse_size(max_file_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-file-size") from None
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise click.ClickException("glinthawk serve needs aiohttp: pip install 'glinthawk[serve]'") from None
    lock_data_dir(data_dir)
    configure(log_level)
    from glinthawk.serve.service import ServeConfig

    config = ServeConfig(data_dir, host, port, keys, max_bytes, max_running_batches, ready_file)
    secret = read_secret(secret_file)
    if to is not None:
        _serve(config, *parse_address(to, "--to"), secret)
        return
    from glinthawk.cluster import ClusterError, LocalCluster

    cluster = LocalCluster(model_dir, tier2_nodes=tier2_nodes, dtype=dtype, device=device, log_dir=log_dir,
                           secret_file=secret_file, **settings)
    try:
        with cluster:
            click.echo(f"cluster up: {tier2_nodes} Tier 2 node(s), logs in {cluster.log_dir}", err=True)
            _serve(config, *cluster.tier1_address, secret, cluster.check_alive)
    except ClusterError as exc:
        raise click.ClickException(f"{exc}\nBatches in progress resume when the service starts again.") from None


def _serve(config, host: str, port: int, secret: bytes | None, check_alive=None) -> None:
    from glinthawk.client import SubmitError
    from glinthawk.net.loop import run
    from glinthawk.serve.runner import Tier1
    from glinthawk.serve.service import serve as serve_forever

    try:
        run(serve_forever(config, Tier1(host, port, secret), check_alive))
    except SubmitError as exc:
        raise click.ClickException(f"{exc}; is Tier 1 running there?") from None
    except OSError as exc:  # the port is taken, most often
        raise click.ClickException(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}; "
                                   "choose another --listen") from None
