"""The ``glinthawk`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from glinthawk.allocator import tune_malloc
from glinthawk.compute import unbuilt_warning
from glinthawk.cli_files import OUTPUT_HELP, check_output, check_resume, input_file, open_input, pick_input, where
from glinthawk.cluster_options import run_cluster_option
from glinthawk.net.netem import parse_size
from glinthawk.options import (
    device_option,
    dtype_option,
    load_checkpoint,
    model_option,
    netem_from,
    parse_address,
    read_secret,
    setting_options,
)
from glinthawk.settings import LOCAL_TIER2_NODES, NetemSettings, StepSettings, Tier2Settings, pick

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


@click.group()
@click.version_option(package_name="glinthawk")
def main() -> None:
    """Glinthawk: two-tier offline LLM inference.

    \b
    Start here (a clone has examples/prompts.jsonl):
      glinthawk run PROMPTS.jsonl -o RESULTS.jsonl
    Nodes on several machines: glinthawk-node (docs/DEPLOYMENT.md).
    """
    tune_malloc()
    if warning := unbuilt_warning():
        click.echo(f"warning: {warning}", err=True)


def check_node_options(secret_file: Path | None, settings: dict) -> None:
    """What ``run`` hands its nodes, checked here first: a node refusing an option ended the run with
    the node's own usage text, under another command's name."""
    read_secret(secret_file)
    netem_from(pick(NetemSettings, settings))
    if settings.get("kv_memory") is not None:
        try:
            parse_size(settings["kv_memory"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--kv-memory") from None


@main.command()
@click.argument("input_path", metavar="[PROMPTS.jsonl]", required=False)
@click.option("-i", "--input", "legacy_input", default=None, hidden=True, help="Deprecated: the prompts file.")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False), help=OUTPUT_HELP)
@model_option
@dtype_option
@device_option
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None, help="KV cache capacity in tokens.")
@click.option("--kv-memory", default=None, help="KV cache capacity as a size, e.g. 2GiB (default: 65536 tokens).")
@setting_options(Tier2Settings, names=("kv_dtype",))
@setting_options(StepSettings)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def generate(input_path, legacy_input, output_path, model_dir, dtype, device, kv_tokens, kv_memory, kv_dtype,
             max_batch_tokens, max_seqs, prefix_cache, cuda_graphs, progress) -> None:
    """Generate in one process: prompts JSONL in, results JSONL out.

    PROMPTS.jsonl may be '-', or left out with stdin piped."""
    from glinthawk.compute.kvcache import bytes_per_token, storage_dtype
    from glinthawk.engine import Engine
    from glinthawk.outputs import OutputError, ResultWriter, count_lines
    from glinthawk.requests import parse_stream

    input_path = pick_input(input_path, legacy_input)
    check_output(output_path)
    model, tokenizer = load_checkpoint(model_dir, dtype, device)
    cfg = model.config  # --kv-memory holds as many tokens as a Tier 2 node's of this --kv-dtype (scales included)
    per_token = bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, storage_dtype(kv_dtype, model.dtype))
    engine = Engine(model, tokenizer, kv_tokens=parse_kv_tokens(kv_memory, kv_tokens, per_token, 65536),
                    kv_dtype=kv_dtype, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs,
                    prefix_cache=prefix_cache, cuda_graphs=cuda_graphs, model_name=model_dir.name)
    total = None if input_path == "-" else count_lines(input_path)
    try:
        with open_input(input_path) as stream, ResultWriter(output_path, total=total, progress=progress) as writer:
            engine.run(parse_stream(stream), writer.write)
    except OutputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{writer.done} done, {writer.failed} failed, {engine.stats.generated_tokens} tokens generated "
        f"-> {where(output_path)}",
        err=True,
    )
    if writer.failed:
        sys.exit(1)


def _run_submit(input_path: str, host: str, port: int, output_path: str, progress: bool | None,
                resume: bool = False, secret_file: Path | None = None, cluster: LocalCluster | None = None) -> int:
    """Submit to Tier 1 at host:port; with ``cluster`` (its local nodes), stop if they die. Returns how
    many requests failed (the caller exits non-zero then, once its cluster is down)."""
    from glinthawk.client import SubmitError, submit
    from glinthawk.cluster import ClusterError
    from glinthawk.net.loop import run

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
               f"-> {where(output_path)}", err=True)
    if summary.unsent:
        raise click.ClickException("Tier 1 shut down before the whole file was sent; rerun with --resume")
    return summary.failed


@main.command("submit")
@click.argument("input_path", metavar="PROMPTS.jsonl")
@click.option("--to", "to", required=True, help="Tier 1 address, HOST:PORT.")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False), help=OUTPUT_HELP)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--resume", is_flag=True, help="Keep the output file; skip every custom_id already answered in it.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret of the cluster (default: $GLINTHAWK_SECRET if set).")
def submit_command(input_path, to, output_path, progress, resume, secret_file) -> None:
    """Send a prompts file to a running Tier 1 and write the results as they arrive.

    PROMPTS.jsonl may be '-': stdin, read whole before it is sent."""
    host, port = parse_address(to, "--to")
    check_resume(output_path, resume, input_path)
    check_output(output_path)
    with input_file(input_path) as path:
        failed = _run_submit(path, host, port, output_path, progress, resume, secret_file)
    if failed:
        sys.exit(1)


@main.command("run")
@click.argument("input_path", metavar="PROMPTS.jsonl")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False), help=OUTPUT_HELP)
@run_cluster_option
@model_option
@dtype_option
@device_option
@click.option("--tier2-nodes", type=click.IntRange(min=1), default=LOCAL_TIER2_NODES, show_default=True,
              help="Tier 2 processes to start (per stage, with --stages).")
@click.option("--stages", default=None, metavar="N|A:B,B:C,...",
              help="Cut Tier 1 into pipeline stages, each a process with its own Tier 2 nodes: N splits the "
                   "layers evenly, or give each stage's layer range.")
@setting_options(Tier2Settings, role="each Tier 2 node")
@click.option("--micro-batches", type=click.IntRange(min=1), default=None,
              help="Micro-batches in flight (default: 1 without injected delay, the largest batch; 4 with it, "
                   "to hide the delay).")
@setting_options(StepSettings)
@setting_options(NetemSettings)
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the nodes' logs go (default: a temporary directory, removed after a clean run).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--resume", is_flag=True, help="Keep the output file; skip every custom_id already answered in it.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret the nodes authenticate each other with (optional on loopback).")
@click.option("--ray", "ray_address", default=None, metavar="auto|local|ADDRESS",
              help="Run the nodes as actors of a Ray cluster instead (auto: the one this machine belongs to; local: "
                   "start one here); needs pip install 'glinthawk[ray]'. Each Tier 2 actor reserves the memory it "
                   "uses from Ray; given no KV size, each gets the largest KV that Ray's machines hold.")
def run_command(input_path, output_path, model_dir, dtype, device, tier2_nodes, stages, micro_batches, log_dir,
                progress, resume, secret_file, ray_address, **settings) -> None:
    """Start a two-tier cluster on loopback (N Tier 2 + 1 Tier 1), run the file through it, stop it.

    PROMPTS.jsonl may be '-': stdin, read whole before the cluster starts."""
    if input_path != "-" and not Path(input_path).is_file():
        raise click.ClickException(f"cannot read input file {input_path}: no such file")
    check_resume(output_path, resume, input_path)
    check_node_options(secret_file, settings)
    check_output(output_path)
    with input_file(input_path) as path:
        if ray_address is not None:
            failed = _run_on_ray(ray_address, path, output_path, model_dir, dtype, device, tier2_nodes, stages,
                                 micro_batches, progress, resume, secret_file, settings)
        else:
            failed = _run_local(path, output_path, model_dir, dtype, device, tier2_nodes, stages, micro_batches,
                                log_dir, progress, resume, secret_file, settings)
    if failed:  # bad lines, not a cluster that failed: its logs went with it
        sys.exit(1)


def _run_local(input_path: str, output_path: str, model_dir: Path, dtype: str, device: str, tier2_nodes: int,
               stages: str | None, micro_batches: int | None, log_dir: Path | None, progress: bool | None,
               resume: bool, secret_file: Path | None, settings: dict) -> int:
    """``run`` on a cluster of local processes (glinthawk/cluster.py); how many requests failed."""
    from glinthawk.cluster import ClusterError, LocalCluster

    try:
        cluster = LocalCluster(model_dir, tier2_nodes=tier2_nodes, dtype=dtype, device=device, stages=stages,
                               micro_batches=micro_batches, log_dir=log_dir, secret_file=secret_file, **settings)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--stages" if stages else "--model") from None
    try:
        with cluster:
            shape = f"{len(cluster.stages)} stages, each with " if stages else ""
            kept = " (removed after a clean run)" if cluster.temporary_logs else ""
            click.echo(f"cluster up: {shape}{tier2_nodes} Tier 2 node(s), logs in {cluster.log_dir}{kept}", err=True)
            host, port = cluster.tier1_address
            return _run_submit(input_path, host, port, output_path, progress, resume, secret_file, cluster)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None


def _run_on_ray(address: str, input_path: str, output_path: str, model_dir: Path, dtype: str, device: str,
                tier2_nodes: int, stages: str | None, micro_batches: int | None, progress: bool | None,
                resume: bool, secret_file: Path | None, settings: dict) -> int:
    """``run --ray``: the same run with the nodes as Ray actors (glinthawk/ray_cluster.py); how many failed."""
    import os

    from glinthawk.net.auth import SECRET_ENV
    from glinthawk.ray_cluster import RayCluster, RayMissing, import_ray

    try:
        import_ray()
    except RayMissing as exc:
        raise click.ClickException(str(exc)) from None
    try:
        cluster = RayCluster.from_options(address, model_dir, tier2_nodes, dtype=dtype, device=device, stages=stages,
                                          secret=read_secret(secret_file), micro_batches=micro_batches, **settings)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--stages" if stages else None) from None
    try:
        with cluster:
            host, port = cluster.tier1_address
            shape = f" in {len(cluster.stages)} stages" if stages else ""
            each = " to each" if stages else ""
            click.echo(f"cluster up on Ray: Tier 1{shape} at {host}:{port}, {tier2_nodes} Tier 2 actor(s) joined"
                       f"{each}", err=True)
            os.environ[SECRET_ENV] = cluster.secret  # the run's own, when none was given
            return _run_submit(input_path, host, port, output_path, progress, resume, secret_file, cluster)
    except (RuntimeError, ConnectionError) as exc:
        raise click.ClickException(f"the Ray cluster could not run it: {exc}") from None


@main.command("status")
@click.argument("address", metavar="HOST:PORT")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret of the cluster (default: $GLINTHAWK_SECRET if set).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status_command(address, secret_file, as_json) -> None:
    """Show a running cluster as its Tier 1 sees it: nodes (of every pipeline stage), KV use, work in flight,
    throughput."""
    import json

    from glinthawk.client import SubmitError, fetch_status
    from glinthawk.net.loop import run

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
               f"{status['micro_batches_in_flight']} of {status['micro_batches']} micro-batches in flight)")
    if prefixes := status.get("prefixes", {}).get("kept"):
        shared = status["prefixes"]
        click.echo(f"shared prefixes: {prefixes} kept ({shared['tokens']} tokens), read by {shared['readers']} "
                   "running sequences")
    if status.get("stopped"):
        click.echo(f"STOPPED: {status['stopped']}")
    stages = [{"layers": status["layers"], "tier2": status["tier2"]}, *status["stages"]] if "stages" in status else [
        {"tier2": status["tier2"]}]
    for stage in stages:
        if "layers" in stage:
            first, stop = stage["layers"]
            click.echo(f"stage {first}:{stop}" + (" (this node: clients, scheduling)" if first == 0 else ""))
        click.echo(f"{'TIER 2 NODE':<24}{'STATE':<8}{'KV USED':>17}{'SEQS':>7}")
        for node in stage["tier2"]:
            kv = f"{node['kv_tokens_used']}/{node['kv_tokens']}"
            state = "DOWN" if not node["alive"] else "leaving" if node.get("draining") else "up"
            click.echo(f"{node['address']:<24}{state:<8}{kv:>17}{node['sequences']:>7}")


def _register_bench() -> None:
    from glinthawk.bench.cli import bench

    main.add_command(bench)


_register_bench()


def _register_operations() -> None:
    from glinthawk.drain import drain
    from glinthawk.plan_command import plan_command

    main.add_command(drain)
    main.add_command(plan_command)


_register_operations()


def _register_serve() -> None:
    from glinthawk.serve.command import serve

    main.add_command(serve)


_register_serve()

if __name__ == "__main__":
    main()
