"""Tier 2: owns a shard of the KV cache (whole sequences, all layers) and computes attention.

Tier 1 introduces itself with the model's KV geometry; the node sizes its store from
``--kv-memory``/``--kv-tokens`` and announces the capacity in tokens. How it keeps K/V is
its own choice (``--kv-dtype``: the model's dtype, or int8 with per-token scales, about
twice the tokens in the same memory): Tier 1 sends and receives the model's dtype either
way, and WELCOME tells it which the node chose and what a token costs. Each ATTN frame
carries one micro-batch at one layer: the node appends its k/v, attends, and answers
ATTN_OUT as soon as that micro-batch is done. The event loop's own thread attends, one
frame after another, and the frames that arrive meanwhile wait in the socket: one thread
touches torch, so libgomp keeps one team of workers (a second computing thread makes it
cut their spin-wait short; see node/merger.py).

A step's first frame for a micro-batch lists its sequences (``seqs``: id, first
position, tokens); the node plans the step's attention from it once (``AttentionPlan``)
and the frames of the later layers, which carry no list, reuse that plan. At thousands
of sequences per micro-batch, sending, decoding and planning the list for every layer
cost as much as the attention itself.

Joining and leaving: with ``join`` the node dials a running Tier 1 and names its own
address, and Tier 1 connects back as to any Tier 2 node (``node/joiner.py`` keeps it joined,
across restarts of Tier 1). Told to stop while it serves a Tier 1 (``drain``: SIGTERM), the
node asks it to LEAVE and keeps attending until Tier 1 has finished or moved its sequences
and answers LEFT; a LEFT that Tier 1 sends unasked (``glinthawk drain``) ends the node too.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from glinthawk.compute.attention import AttentionPlan, attend_with, check_shapes
from glinthawk.compute.kvcache import (KVCapacityError, KVStore, UnknownSequenceError, bytes_per_token,
                                       storage_dtype)
from glinthawk.compute.loader import DTYPES
from glinthawk.metrics import Tier2Metrics
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed
from glinthawk.net.server import server_handshake, start_server
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm
from glinthawk.settings import DRAIN_TIMEOUT_S

log = logging.getLogger("glinthawk.tier2")

# Step plans kept at most (one per micro-batch of the Tier 1; the bound is against a peer
# that keeps naming new micro-batches).
_MAX_PLANS = 1024
LEAVE_GRACE_S = 40.0  # beyond that, how long it waits for Tier 1's LEFT (moving them takes time too)


class _Session:
    """One Tier 1's claim on this node: the KV store and step plans it built, which live and die
    with the connection that claimed them (another connection's end must not drop them)."""

    def __init__(self, conn: Connection, store: KVStore) -> None:
        self.conn, self.store = conn, store
        self.plans: dict[object, AttentionPlan] = {}  # micro-batch -> its step's plan
        self.ended = asyncio.Event()  # its connection is over (the joiner then joins again)


class Tier2Node:
    def __init__(self, kv_memory: int | None = None, kv_tokens: int | None = None, netem: NetEm | None = None,
                 secret: bytes | None = None, kv_dtype: str = "auto", *, join: str | None = None,
                 advertise: str | None = None, drain_timeout_s: float = DRAIN_TIMEOUT_S):
        """``kv_dtype``: how K/V are kept (auto: the model's dtype; int8); ``join``: HOST:PORT of a
        running Tier 1 to join; ``advertise``: the HOST:PORT it reaches this node at (default: this
        end of the connection to it, and the port bound)."""
        if (kv_memory is None) == (kv_tokens is None):
            raise ValueError("give exactly one of kv_memory (bytes) or kv_tokens")
        storage_dtype(kv_dtype, torch.float32)  # refuses a name it has no storage for now, not at the handshake
        self.kv_memory, self.kv_tokens, self.netem, self.secret = kv_memory, kv_tokens, netem, secret
        self.join, self.advertise, self.drain_timeout_s = join, advertise, drain_timeout_s
        self.kv_dtype = kv_dtype
        self.session: _Session | None = None
        self.metrics = Tier2Metrics(self)
        self.finished = asyncio.Event()  # Tier 1 is done with this node (LEFT), or it cannot join: it should exit
        self.failure: str | None = None  # why it cannot join (then it exits non-zero)
        self.leaving = False
        self._joiner: asyncio.Task | None = None
        self._server: asyncio.AbstractServer | None = None
        self._closing = False

    @property
    def store(self) -> KVStore | None:
        return self.session.store if self.session is not None else None

    @property
    def owner(self) -> Connection | None:
        return self.session.conn if self.session is not None else None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await start_server(self._serve, host, port, netem=self.netem)
        bound = self._server.sockets[0].getsockname()[1]
        if self.join is not None:
            from glinthawk.node.joiner import Joiner

            joiner = Joiner(self, self.join, self.advertise, listen=(host, bound))
            self._joiner = asyncio.get_running_loop().create_task(joiner.run(), name="tier2-join")
        return bound

    def fail(self, message: str) -> None:
        """This node cannot serve (a Tier 1 refused it for good): say why, and end."""
        self.failure = message
        self.finished.set()

    async def drain(self) -> None:
        """Stop accepting connections and leave: the Tier 1 served, if any, finishes or moves this
        node's sequences and answers LEFT (a frame is attended to and answered before the next is read)."""
        self.leaving = True
        if self._joiner is not None:
            self._joiner.cancel()
        if self._server is not None:
            self._server.close()
        session = self.session
        if session is None or session.conn.closed or self.finished.is_set():
            return
        log.info("leaving: Tier 1 finishes this node's sequences (or moves them after %g s)", self.drain_timeout_s)
        try:
            await session.conn.send({"type": MsgType.LEAVE, "timeout_s": self.drain_timeout_s})
            await asyncio.wait_for(session.ended.wait(), self.drain_timeout_s + LEAVE_GRACE_S)
        except (ConnectionClosed, ConnectionError):
            pass
        except TimeoutError:
            log.warning("Tier 1 did not let this node go within %g s; leaving anyway (it rebuilds what ran here)",
                        self.drain_timeout_s + LEAVE_GRACE_S)

    async def close(self) -> None:
        self._closing = True  # frames still arriving are dropped
        if self._joiner is not None:
            self._joiner.cancel()
        if self._server is not None:
            self._server.close()
        if self.session is not None:
            self.session.conn.close()

    # -- connection -------------------------------------------------------------------
    def _claim(self, conn: Connection, hello: dict) -> dict:
        """The handshake's welcome: claim this node for ``conn`` and build its KV store. Synchronous,
        so two Tier 1 nodes whose handshakes overlap cannot both pass the check; what it raises
        refuses the peer, which hears why."""
        if self.session is not None and not self.session.conn.closed:
            raise ProtocolError("this Tier 2 node already serves another Tier 1; list each Tier 2 node "
                                "in one Tier 1 only")
        store, fields = self._new_store(hello)
        self.session = _Session(conn, store)
        return fields

    def _new_store(self, hello: dict) -> tuple[KVStore, dict]:
        try:
            layers, kv_heads, head_dim = (int(hello[k]) for k in ("num_layers", "num_kv_heads", "head_dim"))
            dtype = DTYPES[hello["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"HELLO from Tier 1 lacks a valid KV geometry ({exc!r})") from None
        if min(layers, kv_heads, head_dim) <= 0:
            raise ProtocolError("HELLO from Tier 1 has a non-positive KV geometry")
        kv_dtype = storage_dtype(self.kv_dtype, dtype)
        per_token = bytes_per_token(layers, kv_heads, head_dim, kv_dtype)  # an int8 store's scales included
        tokens = self.kv_tokens if self.kv_tokens is not None else self.kv_memory // per_token
        if tokens <= 0:
            raise ProtocolError(f"--kv-memory {self.kv_memory} B holds no token of {per_token} B of this model; "
                                f"give at least {per_token} B")
        try:
            store = KVStore(layers, kv_heads, head_dim, tokens, dtype, kv_dtype=kv_dtype)
        except (RuntimeError, MemoryError) as exc:
            log.error("cannot allocate the KV store: %s", exc)
            gib = tokens * per_token / 2**30
            raise ProtocolError(f"cannot allocate a KV store of {tokens} tokens ({gib:.1f} GiB) on this machine; "
                                "give a smaller --kv-memory or --kv-tokens") from None
        name = str(kv_dtype).removeprefix("torch.")
        log.info("KV store: %d tokens, %.1f MiB, %d layers, K/V as %s", tokens, tokens * per_token / 2**20, layers,
                 name)
        return store, {"capacity_tokens": tokens, "bytes_per_token": per_token, "kv_dtype": name}

    async def _serve(self, conn: Connection) -> None:
        try:
            await server_handshake(conn, {"tier1"}, lambda hello: self._claim(conn, hello), secret=self.secret)
            session = self.session
            if session is None or session.conn is not conn:  # it hung up as WELCOME went out, and another claimed us
                return
            await self._serve_session(session)
        finally:
            if self.session is not None and self.session.conn is conn:  # only its owner's end drops the store
                self.session.ended.set()
                self.session = None  # a new Tier 1 starts from an empty cache
                log.info("Tier 1 disconnected; KV store dropped")

    async def _serve_session(self, session: _Session) -> None:
        conn = session.conn
        try:
            async for header, tensors in conn:
                if self._closing:
                    break
                kind = header["type"]
                if kind == MsgType.ATTN:
                    await self._attend(session, header, tensors)
                elif kind == MsgType.RELEASE and isinstance(header.get("seqs"), list):
                    self._release(session.store, header["seqs"])
                elif kind == MsgType.PING:
                    await conn.send({"type": MsgType.PONG, "nonce": header.get("nonce")})
                elif kind == MsgType.LEFT:
                    log.info("Tier 1 let this node go (its sequences are done or moved)")
                    self.finished.set()
                    break
                else:
                    await conn.send({"type": MsgType.ERROR, "message": f"unexpected message type {kind!r}"})
        except (ConnectionClosed, ProtocolError) as exc:
            log.warning("Tier 1 connection ended: %s", exc)

    async def _attend(self, session: _Session, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        mb = header.get("mb")
        conn = session.conn
        try:
            out = self._compute(session, header, tensors)
        except Exception as exc:  # a malformed request fails alone; the node keeps serving
            if not isinstance(exc, (KVCapacityError, UnknownSequenceError)):
                log.warning("bad ATTN frame: %r", exc)
            await conn.send({"type": MsgType.ERROR, "mb": mb, "message": f"attention failed: {exc}"})
            return
        await conn.send({"type": MsgType.ATTN_OUT, "mb": mb, "layer": header.get("layer")}, {"out": out})

    def _compute(self, session: _Session, header: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        store = session.store
        layer = int(header["layer"])
        if not 0 <= layer < store.num_layers:
            raise ValueError(f"layer {layer} out of range")
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        with self.metrics.attention_seconds.labels(layer=str(layer)).time():
            return attend_with(self._plan(session, header, q, k, v), layer, q, k, v)

    def _plan(self, session: _Session, header: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionPlan:
        """The plan of the frame's step: made from its ``seqs`` (a step's first frame), else
        the one its micro-batch's first frame made (made again if the store has compacted
        since, for another micro-batch's reservation)."""
        mb = header.get("mb")
        seqs = header.get("seqs")
        store, plans = session.store, session.plans
        if seqs is None:
            plan = plans.get(mb)
            if plan is None:
                raise ValueError(f"micro-batch {mb!r}: a frame without seqs, and no earlier frame of its step had them")
            if plan.stale:
                plan = plans[mb] = plan.replanned()
            return plan
        plans.pop(mb, None)  # a step that fails to plan leaves no plan behind
        ids = [s[0] for s in seqs]
        starts = [int(s[1]) for s in seqs]
        counts = [int(s[2]) for s in seqs]
        check_shapes(store, q, k, v, sum(counts))  # before reserving: a refused frame holds no room
        for seq_id, tokens, *prefix in header.get("reserve", ()):  # prefix: the holder of a shared prefix it reads
            if seq_id not in store:
                store.reserve(seq_id, tokens, prefix=prefix[0] if prefix else None)
        plan = AttentionPlan.of(store, ids, starts, counts)
        if len(plans) >= _MAX_PLANS:
            del plans[next(iter(plans))]  # the least recently started step
        plans[mb] = plan
        return plan

    @staticmethod
    def _release(store: KVStore, seq_ids: list) -> None:
        for seq_id in seq_ids:
            if isinstance(seq_id, (int, str)) and seq_id in store:
                store.free(seq_id)
