"""The ``glinthawk`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from glinthawk.allocator import tune_malloc
from glinthawk.cluster_options import run_cluster_option
from glinthawk.net.netem import parse_size
from glinthawk.options import (
    device_option,
    dtype_option,
    load_checkpoint,
    model_option,
    parse_address,
    read_secret,
    setting_options,
)
from glinthawk.settings import LOCAL_TIER2_NODES, NetemSettings, StepSettings, Tier2Settings

if TYPE_CHECKING:
    from glinthawk.cluster import LocalCluster


def parse_kv_tokens(kv_memory: str | None, kv_tokens: int | None, bytes_per_token: int, default: int) -> int:
    if kv_tokens is not None:
        return kv_tokens
    if kv_memory is not None:
        try:
            return max(1, parse_size(kv_memory) // bytes_per_token)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--kv-memory") from None
    return default


def check_output(path: str) -> None:
    """Fail before anything loads or starts when the results file cannot be opened (say, its directory is
    missing) or another glinthawk process writes it. A file to --resume is left as it is, and none is left behind.
    """
    from glinthawk.outputs import OutputError, probe_output

    try:
        probe_output(path)
    except OutputError as exc:
        raise click.ClickException(str(exc)) from None


def open_input(path: str):
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise click.ClickException(f"cannot read input file {path}: {exc.strerror}") from None


@click.group()
@click.version_option(package_name="glinthawk")
def main() -> None:
    """Glinthawk: two-tier offline LLM inference."""
    tune_malloc()


@main.command()
@click.option("-i", "--input", "input_path", default="-", show_default=True, help="Prompts JSONL ('-' for stdin).")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False), help="Results JSONL.")
@model_option
@dtype_option
@device_option
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None, help="KV cache capacity in tokens.")
@click.option("--kv-memory", default=None, help="KV cache capacity as a size, e.g. 2GiB (default: 65536 tokens).")
@setting_options(StepSettings)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def generate(input_path, output_path, model_dir, dtype, device, kv_tokens, kv_memory, max_batch_tokens, max_seqs,
             progress) -> None:
    """Single-process generation: read prompts JSONL, write results JSONL."""
    from glinthawk.engine import Engine
    from glinthawk.outputs import OutputError, ResultWriter, count_lines
    from glinthawk.requests import parse_stream

    check_output(output_path)
    model, tokenizer = load_checkpoint(model_dir, dtype, device)
    capacity = parse_kv_tokens(kv_memory, kv_tokens, model.config.kv_bytes_per_token(model.dtype.itemsize),
                               65536)
    engine = Engine(model, tokenizer, kv_tokens=capacity, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs,
                    model_name=model_dir.name)
    total = None if input_path == "-" else count_lines(input_path)
    try:
        with open_input(input_path) as stream, ResultWriter(output_path, total=total, progress=progress) as writer:
            engine.run(parse_stream(stream), writer.write)
    except OutputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{writer.done} done, {writer.failed} failed, {engine.stats.generated_tokens} tokens generated -> {output_path}",
        err=True,
    )
    if writer.failed:
        sys.exit(1)


def _run_submit(input_path: str, host: str, port: int, output_path: str, progress: bool | None,
                resume: bool = False, secret_file: Path | None = None, cluster: LocalCluster | None = None) -> None:
    """Submit to Tier 1 at host:port; with ``cluster`` (its local nodes), stop if they die."""
    from glinthawk.client import SubmitError, submit
    from glinthawk.cluster import ClusterError
    from glinthawk.net.connection import run

    secret = read_secret(secret_file)
    work = submit(input_path, host, port, output_path, progress=progress, resume=resume, secret=secret)
    try:
        summary = run(cluster.watch(work) if cluster is not None else work)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    except ClusterError as exc:
        raise click.ClickException(f"{exc}\nResults that finished are in {output_path}; "
                                   "rerun with --resume to run the rest.") from None
    click.echo(f"{summary.done} done, {summary.failed} failed, {summary.generated_tokens} tokens generated "
               f"-> {output_path}", err=True)
    if summary.unsent:
        raise click.ClickException("Tier 1 shut down before the whole file was sent; rerun with --resume")
    if summary.failed:
        sys.exit(1)


@main.command("submit")
@click.argument("input_path", metavar="PROMPTS.jsonl")
@click.option("--to", "to", required=True, help="Tier 1 address, HOST:PORT.")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False), help="Results JSONL.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--resume", is_flag=True, help="Keep the output file; skip every custom_id already answered in it.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret of the cluster (default: $GLINTHAWK_SECRET if set).")
def submit_command(input_path, to, output_path, progress, resume, secret_file) -> None:
    """Send a prompts file to a running Tier 1 and write the results as they arrive."""
    host, port = parse_address(to, "--to")
    check_output(output_path)
    _run_submit(input_path, host, port, output_path, progress, resume, secret_file)


@main.command("run")
@click.argument("input_path", metavar="PROMPTS.jsonl")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False), help="Results JSONL.")
@run_cluster_option
@model_option
@dtype_option
@device_option
@click.option("--tier2-nodes", type=click.IntRange(min=1), default=LOCAL_TIER2_NODES, show_default=True,
              help="Tier 2 processes to start.")
@setting_options(Tier2Settings, role="each Tier 2 node")
@click.option("--micro-batches", type=click.IntRange(min=1), default=None,
              help="Micro-batches in flight (default: 1 without injected delay, the largest batch; 4 with it, "
                   "to hide the delay).")
@setting_options(StepSettings)
@setting_options(NetemSettings)
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the nodes' logs go (default: a new temporary directory).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--resume", is_flag=True, help="Keep the output file; skip every custom_id already answered in it.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret the nodes authenticate each other with (optional on loopback).")
def run_command(input_path, output_path, model_dir, dtype, device, tier2_nodes, micro_batches, log_dir, progress,
                resume, secret_file, **settings) -> None:
    """Start a two-tier cluster on loopback (N Tier 2 + 1 Tier 1), run the file through it, stop it."""
    from glinthawk.cluster import ClusterError, LocalCluster

    if not Path(input_path).is_file():
        raise click.ClickException(f"cannot read input file {input_path}: no such file")
    check_output(output_path)
    cluster = LocalCluster(model_dir, tier2_nodes=tier2_nodes, dtype=dtype, device=device,
                           micro_batches=micro_batches, log_dir=log_dir, secret_file=secret_file, **settings)
    try:
        with cluster:
            click.echo(f"cluster up: {tier2_nodes} Tier 2 node(s), logs in {cluster.log_dir}", err=True)
            host, port = cluster.tier1_address
            _run_submit(input_path, host, port, output_path, progress, resume, secret_file, cluster)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("status")
@click.argument("address", metavar="HOST:PORT")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret of the cluster (default: $GLINTHAWK_SECRET if set).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status_command(address, secret_file, as_json) -> None:
    """Show a running cluster as its Tier 1 sees it: nodes, KV use, work in flight, throughput."""
    import json

    from glinthawk.client import SubmitError, fetch_status
    from glinthawk.net.connection import run

    host, port = parse_address(address, "HOST:PORT")
    try:
        status = run(fetch_status(host, port, secret=read_secret(secret_file)))
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    requests = status["requests"]
    click.echo(f"model {status['model']}  up {status['uptime_s']:.0f} s  {status['tokens_per_s']:.1f} tok/s  "
               f"Tier 1 busy {100 * status['busy_fraction']:.0f}%")
    click.echo(f"requests: {requests['running']} running, {requests['waiting']} waiting, {requests['finished']} "
               f"finished, {requests['failed']} failed ({status['batches']} batches, "
               f"{status['micro_batches_in_flight']} micro-batches in flight)")
    click.echo(f"{'TIER 2 NODE':<24}{'STATE':<7}{'KV USED':>18}{'SEQS':>7}")
    for node in status["tier2"]:
        kv = f"{node['kv_tokens_used']}/{node['kv_tokens']}"
        click.echo(f"{node['address']:<24}{'up' if node['alive'] else 'DOWN':<7}{kv:>18}{node['sequences']:>7}")


def _register_bench() -> None:
    from glinthawk.bench.cli import bench

    main.add_command(bench)


_register_bench()


def _register_serve() -> None:
    from glinthawk.serve.command import serve

    main.add_command(serve)


_register_serve()

if __name__ == "__main__":
    main()
