"""A Tier 2 node serves one Tier 1: claimed atomically in the handshake, its KV store tied to that connection."""

from __future__ import annotations

import asyncio

import pytest

from glinthawk.client import submit
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.messages import PROTOCOL_VERSION, MsgType
from glinthawk.node import tier2 as tier2_module
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results, single_process, write_requests

HOST = "127.0.0.1"


def handshakes_in_step(monkeypatch, port: int) -> list[Connection]:
    """Hold the first two handshakes on ``port`` until both have begun, so they overlap as when
    two Tier 1 nodes reconnect to a restarted node at the same moment; returns every connection
    that reached the handshake on that port."""
    real = tier2_module.server_handshake
    reached: list[Connection] = []
    both = asyncio.Event()

    async def in_step(conn: Connection, *args, **kwargs):
        if sockname(conn)[1] == port:
            reached.append(conn)
            if len(reached) == 2:
                both.set()
            await both.wait()
        return await real(conn, *args, **kwargs)

    monkeypatch.setattr(tier2_module, "server_handshake", in_step)
    return reached


def sockname(conn: Connection) -> tuple:
    return conn._protocol.transport.get_extra_info("sockname")


async def until(condition) -> None:
    async with asyncio.timeout(60):  # a safety net; the condition is what the test waits for
        while not condition():
            await asyncio.sleep(0.02)


async def test_two_tier1_nodes_racing_for_one_tier2_node_get_it_once(checkpoint, tmp_path, monkeypatch, caplog):
    """Two Tier 1 nodes list the same Tier 2 node and handshake with it at the same moment: one
    is served by it, the other is refused and runs on its own node; all requests of both succeed,
    and the owner's KV store outlives the refused one's retries and departure."""
    model, tokenizer = checkpoint
    shared = Tier2Node(kv_tokens=8192)  # the most free room: placement sends work there first
    shared_port = await shared.start(HOST, 0)
    attended: list[int] = []
    compute = shared._compute
    shared._compute = lambda *args: attended.append(1) or compute(*args)
    own = [Tier2Node(kv_tokens=4096) for _ in range(2)]
    own_ports = [await node.start(HOST, 0) for node in own]
    reached = handshakes_in_step(monkeypatch, shared_port)
    shared_address = f"{HOST}:{shared_port}"
    tier1s = [Tier1Node(model, tokenizer, [shared_address, f"{HOST}:{port}"], micro_batches=2,
                        reconnect_seconds=0.05) for port in own_ports]
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    expected = {k: v["token_ids"] for k, v in single_process(checkpoint, requests).items()}
    try:
        ports = await asyncio.gather(*(tier1.start(HOST, 0) for tier1 in tier1s))
        summaries = await asyncio.wait_for(asyncio.gather(*(
            submit(requests, HOST, port, tmp_path / f"out{i}.jsonl", progress=False) for i, port in enumerate(ports))),
            timeout=240)
        for i, summary in enumerate(summaries):
            assert (summary.done, summary.failed) == (len(expected), 0), f"Tier 1 #{i}"
            got = read_results(tmp_path / f"out{i}.jsonl")
            assert {k: v["token_ids"] for k, v in got.items()} == expected, f"Tier 1 #{i}"
        served = [tier1 for tier1 in tier1s if shared_address in tier1.links and tier1.links[shared_address].alive]
        assert len(served) == 1, "the shared Tier 2 node serves exactly one Tier 1"
        owner, refused = served[0], next(tier1 for tier1 in tier1s if tier1 is not served[0])
        store = shared.store
        assert store is not None and shared.owner.peername == sockname(owner.links[shared_address].conn)
        assert attended  # the owner's requests ran through it

        await until(lambda: len(reached) >= 4)  # the refused Tier 1 tried again, twice
        assert (f"cannot use Tier 2 node {shared_address}: server refused the handshake: this Tier 2 node already "
                "serves another Tier 1; list each Tier 2 node in one Tier 1 only") in caplog.text
        await refused.close()
        await until(lambda: all(conn.closed for conn in reached if conn is not shared.owner))
        assert shared.store is store and not shared.owner.closed
        again = await asyncio.wait_for(submit(requests, HOST, ports[tier1s.index(owner)], tmp_path / "again.jsonl",
                                              progress=False), timeout=240)
        assert (again.done, again.failed) == (len(expected), 0)
        assert {k: v["token_ids"] for k, v in read_results(tmp_path / "again.jsonl").items()} == expected
        assert shared.store is store
    finally:
        for tier1 in tier1s:
            await tier1.close()
        for node in (shared, *own):
            await node.close()


GEOMETRY = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "dtype": "float32"}


@pytest.mark.parametrize("role", ["tier1", "client"])
async def test_an_unauthenticated_peer_learns_nothing_but_the_challenge(role):
    """With a secret, a peer that has not authenticated hears neither whom an owned node serves
    nor which roles it takes: the CHALLENGE, then a generic authentication failure. A Tier 1 that
    authenticates is told the node is taken."""
    node = Tier2Node(kv_tokens=64, secret=b"s3cret")
    port = await node.start(HOST, 0)
    try:
        owner = await open_connection(HOST, port)
        await client_handshake(owner, "tier1", GEOMETRY, secret=b"s3cret")
        intruder = await open_connection(HOST, port)
        await intruder.send({"type": MsgType.HELLO, "version": PROTOCOL_VERSION, "role": role, "nonce": b"n" * 32,
                             **GEOMETRY})
        heard = [(await intruder.recv())[0]]
        assert heard[0]["type"] == MsgType.CHALLENGE, heard
        await intruder.send({"type": MsgType.AUTH, "proof": b"\0" * 32})
        heard += [header async for header, _ in intruder]
        assert [h["type"] for h in heard] == [MsgType.CHALLENGE, MsgType.ERROR], heard
        assert heard[1]["message"] == "authentication failed: wrong or missing shared secret"

        second = await open_connection(HOST, port)
        with pytest.raises(ProtocolError, match="server refused the handshake: this Tier 2 node already serves"):
            await client_handshake(second, "tier1", GEOMETRY, secret=b"s3cret")
        assert node.owner is not None and not node.owner.closed and node.store is not None
        owner.close()
    finally:
        await node.close()
