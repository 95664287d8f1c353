"""Connection limits: peers still in the handshake cannot lock out those that completed it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from glinthawk.client import submit
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.loop import run
from glinthawk.net.server import server_handshake, start_server
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results, write_requests

HOST = "127.0.0.1"
SECRET = b"s3cret"


class IdleCrowd:
    """Unauthenticated connections that never say a word."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open: dict[asyncio.StreamWriter, asyncio.Task] = {}
        self.heard: list[bytes] = []  # what the server sent to connections it closed

    async def fill(self, count: int) -> None:
        """Open as many as it takes to have ``count`` open, re-opening those the server closed (the
        server may close some of these too as they arrive)."""
        for _ in range(count - len(self.open)):
            reader, writer = await asyncio.open_connection(HOST, self.port)
            self.open[writer] = asyncio.create_task(self._until_closed(reader, writer))

    async def _until_closed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heard.append(await reader.read())
        except ConnectionError:
            pass
        self.open.pop(writer, None)
        writer.close()

    def close(self) -> None:
        for writer, task in list(self.open.items()):
            task.cancel()
            writer.close()


async def authenticated_echo(conn: Connection) -> None:
    await server_handshake(conn, {"client"}, {}, secret=SECRET)
    async for header, tensors in conn:
        await conn.send(header, tensors)


async def authenticated_roundtrip(port: int) -> Connection:
    """Connect, authenticate, echo one frame with a tensor; returns the open connection."""
    conn = await open_connection(HOST, port)
    await client_handshake(conn, "client", {}, secret=SECRET)
    await conn.send({"type": "ping"}, {"x": torch.arange(4)})
    header, tensors = await conn.recv()
    assert header == {"type": "ping"} and torch.equal(tensors["x"], torch.arange(4))
    return conn


@contextlib.asynccontextmanager
async def crowded_server(**limits):
    """An authenticated echo server with an idle crowd at its door; yields the crowd and a list
    for the connections it serves, all closed afterwards."""
    server = await start_server(authenticated_echo, HOST, 0, **limits)
    crowd = IdleCrowd(server.sockets[0].getsockname()[1])
    served: list[Connection] = []
    try:
        yield crowd, served
    finally:
        for conn in served:
            conn.close()
        crowd.close()
        server.close()


async def test_authenticated_clients_are_served_while_300_idle_connections_are_open():
    """At the default limits: 300 idle connections, topped up to 300 again whenever the server
    closes some, do not keep authenticated clients out (they were refused at 256 connections)."""
    async with crowded_server() as (crowd, served), asyncio.timeout(60):  # a safety net
        for _ in range(5):
            await crowd.fill(300)
            served.append(await authenticated_roundtrip(crowd.port))
        for conn in served:  # they stay served while the crowd goes on
            await conn.send({"type": "ping"})
            assert (await conn.recv())[0] == {"type": "ping"}


def test_the_same_on_uvloop():
    run(test_authenticated_clients_are_served_while_300_idle_connections_are_open())


async def test_a_newcomer_closes_the_oldest_connection_still_in_the_handshake():
    server = await start_server(authenticated_echo, HOST, 0, max_unauthenticated=2)
    port = server.sockets[0].getsockname()[1]
    crowd = IdleCrowd(port)
    try:
        async with asyncio.timeout(30):  # a safety net
            await crowd.fill(1)
            (oldest,) = crowd.open
            await crowd.fill(2)
            await crowd.fill(3)  # over the allowance of 2: the oldest goes
            while oldest in crowd.open:
                await asyncio.sleep(0.01)
        assert len(crowd.heard) == 1 and b"closed the oldest, this one" in crowd.heard[0]
    finally:
        crowd.close()
        server.close()


async def test_a_connection_that_does_not_complete_the_handshake_in_time_is_closed():
    server = await start_server(authenticated_echo, HOST, 0, handshake_deadline_s=0.1)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        heard = await asyncio.wait_for(reader.read(), timeout=30)  # a safety net; the server closes first
        writer.close()
        assert b"no completed handshake within 0.1 s" in heard
        (await authenticated_roundtrip(port)).close()
    finally:
        server.close()


async def test_only_authenticated_peers_count_against_the_connection_cap():
    """Two authenticated peers fill a cap of 2 though idle connections keep arriving; a third
    authenticated peer is refused, naming the cap."""
    async with crowded_server(max_connections=2, max_unauthenticated=2) as (crowd, served), asyncio.timeout(30):
        for _ in range(2):
            await crowd.fill(5)
            served.append(await authenticated_roundtrip(crowd.port))
        await crowd.fill(5)
        third = await open_connection(HOST, crowd.port)
        with pytest.raises(ProtocolError, match="server refused the handshake: server is at its limit of 2 "
                                                "connections; try again later"):
            await client_handshake(third, "client", {}, secret=SECRET)


async def test_tier1_joins_its_tier2_node_and_serves_a_client_while_both_are_flooded(checkpoint, tmp_path):
    """300 idle connections on the Tier 2 node, then 300 on Tier 1's port: Tier 1 still joins
    the node, and a client's requests still run through both."""
    model, tokenizer = checkpoint
    tier2 = Tier2Node(kv_tokens=4096, secret=SECRET)
    tier2_port = await tier2.start(HOST, 0)
    tier1 = Tier1Node(model, tokenizer, [f"{HOST}:{tier2_port}"], micro_batches=1, secret=SECRET)
    crowds = [IdleCrowd(tier2_port)]
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    try:
        async with asyncio.timeout(240):  # a safety net
            await crowds[0].fill(300)
            port = await tier1.start(HOST, 0)
            crowds.append(IdleCrowd(port))
            await crowds[1].fill(300)
            summary = await submit(requests, HOST, port, tmp_path / "out.jsonl", progress=False, secret=SECRET)
        assert (summary.done, summary.failed) == (len(read_results(tmp_path / "out.jsonl")), 0) and summary.done > 0
        assert tier2.owner is not None and tier2.store is not None
    finally:
        for crowd in crowds:
            crowd.close()
        await tier1.close()
        await tier2.close()
