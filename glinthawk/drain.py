"""``glinthawk drain NODE --to TIER1``: take one Tier 2 node out of a running cluster (a node of a
later pipeline stage through that stage, which tells the first stage to place nothing more there).

Tier 1 does the work (node/pool.py: no new sequences on the node, its running ones finish or,
after the timeout, are moved; then it tells the node LEFT and the node exits 0); this command
only asks, and waits for the outcome so that a script can go on once the node is out.
"""

from __future__ import annotations

from pathlib import Path

import click

from glinthawk.options import parse_address, read_secret
from glinthawk.settings import DRAIN_TIMEOUT_S


async def drain_node(host: str, port: int, node: str, timeout_s: float, *, secret: bytes | None = None) -> int:
    """Ask Tier 1 at host:port to drain ``node``; how many of its sequences were moved rather than finished.
    RuntimeError says why it could not be drained."""
    from glinthawk.client import ask_tier1
    from glinthawk.net.codec import ProtocolError
    from glinthawk.net.connection import ConnectionClosed
    from glinthawk.net.messages import MsgType

    try:
        header = await ask_tier1(host, port, "drain", {"node": node, "timeout_s": timeout_s}, secret=secret)
    except (OSError, ConnectionClosed, ProtocolError) as exc:
        raise RuntimeError(f"cannot drain {node} through Tier 1 at {host}:{port}: {exc}") from None
    if header["type"] != MsgType.LEFT:
        raise RuntimeError(f"Tier 1 at {host}:{port} did not drain {node}: {header.get('message', header['type'])}")
    return int(header.get("moved", 0))


@click.command("drain")
@click.argument("node", metavar="NODE_HOST:PORT")
@click.option("--to", "to", required=True,
              help="Tier 1 address, HOST:PORT (for a node of a later pipeline stage: that stage's).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=DRAIN_TIMEOUT_S, show_default=True,
              help="Seconds the node's running sequences may take to finish; then they are moved to other nodes.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Shared secret of the cluster (default: $GLINTHAWK_SECRET if set).")
def drain(node, to, timeout_s, secret_file) -> None:
    """Take a Tier 2 node out of a running cluster: it gets no new sequences, its running ones finish (or move
    after --timeout), then it exits. Returns once it is out."""
    from glinthawk.net.loop import run

    host, port = parse_address(to, "--to")
    parse_address(node, "NODE_HOST:PORT")
    try:
        moved = run(drain_node(host, port, node, timeout_s, secret=read_secret(secret_file)))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{node} left" + (f"; {moved} sequences moved to other nodes" if moved else ""))
