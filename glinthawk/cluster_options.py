"""``--cluster FILE`` for ``glinthawk run`` and ``glinthawk-node``: a cluster file supplies the options.

The file's settings become the command's defaults (click's ``default_map``), set by eager callbacks that
run before any other option is read. So an option given on the command line still wins, a required option
such as ``--role`` is satisfied by the file, and the command bodies need no change.
"""

from __future__ import annotations

from pathlib import Path

import click

from glinthawk.clusterfile import ClusterFileError, load_cluster_file, local_cluster_kwargs, node_args

_FILE = click.Path(dir_okay=False, path_type=Path)
_NODE_META = ("glinthawk.cluster", "glinthawk.name")


def _run_defaults(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is None:
        return
    try:
        settings = local_cluster_kwargs(load_cluster_file(value))
    except ClusterFileError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    ctx.default_map = settings  # ``glinthawk run``'s options share LocalCluster's names


def run_cluster_option(f):
    """``--cluster FILE`` for ``glinthawk run``."""
    return click.option(
        "--cluster", type=_FILE, default=None, is_eager=True, expose_value=False, callback=_run_defaults,
        help="Cluster file (cluster.toml) giving the model, the Tier 1 and Tier 2 settings, [inject] and the "
             "secret; options given here override it. Its hosts and ports are not used: the nodes run on loopback.",
    )(f)


def _node_defaults(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Callback of both --cluster and --name, which run first, in the order given: the second one acts."""
    ctx.meta[f"glinthawk.{param.name}"] = value
    if not all(key in ctx.meta for key in _NODE_META):
        return
    cluster_file, name = (ctx.meta[key] for key in _NODE_META)
    if cluster_file is None and name is None:
        return
    if cluster_file is None or name is None:
        raise click.UsageError("--cluster FILE and --name NAME go together", ctx)
    try:
        args = node_args(load_cluster_file(cluster_file, for_node=name), name)
    except ClusterFileError as exc:
        raise click.UsageError(str(exc), ctx) from None
    # Parse the node's arguments with this very command, so the file means exactly what its flags mean.
    ctx.default_map = ctx.command.make_context(ctx.info_name, args, parent=ctx.parent).params


def node_cluster_options(f):
    """``--cluster FILE --name NAME`` for ``glinthawk-node``: run node NAME of the cluster file."""
    f = click.option("--name", default=None, is_eager=True, expose_value=False, callback=_node_defaults,
                     help="With --cluster: the node of the file to run.")(f)
    return click.option(
        "--cluster", type=_FILE, default=None, is_eager=True, expose_value=False, callback=_node_defaults,
        help="Cluster file (cluster.toml): run its node --name, with that node's settings; options given "
             "here override them.",
    )(f)
