"""Tier 2: owns a shard of the KV cache (whole sequences, all layers) and computes attention.

Tier 1 introduces itself with the model's KV geometry; the node sizes its store from
``--kv-memory``/``--kv-tokens`` and announces the capacity in tokens. How it keeps K/V is
its own choice (``--kv-dtype``: the model's dtype, or int8 with per-token scales, about
twice the tokens in the same memory): Tier 1 sends and receives the model's dtype either
way, and WELCOME tells it which the node chose and what a token costs. Each ATTN frame
carries one micro-batch at one layer: the node appends its k/v, attends, and answers
ATTN_OUT as soon as that micro-batch is done. The event loop's own thread attends, one
frame after another, and the frames that arrive meanwhile wait in the socket: one thread
touches torch, so libgomp keeps one team of workers (with a second computing thread it
cuts their spin-wait short, and attention at batch 64 took 1.3x as long; see
node/merger.py).

A step's first frame for a micro-batch lists its sequences (``seqs``: id, first
position, tokens); the node plans the step's attention from it once (``AttentionPlan``)
and the frames of the later layers, which carry no list, reuse that plan. At thousands
of sequences per micro-batch, sending, decoding and planning the list for every layer
cost as much as the attention itself.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from glinthawk.compute.attention import AttentionPlan, attend_with, check_shapes
from glinthawk.compute.kvcache import KVCapacityError, KVStore, UnknownSequenceError, bytes_per_token
from glinthawk.compute.loader import DTYPES
from glinthawk.metrics import Tier2Metrics
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed
from glinthawk.net.server import server_handshake, start_server
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm

log = logging.getLogger("glinthawk.tier2")

# Step plans kept at most (one per micro-batch of the Tier 1; the bound is against a peer
# that keeps naming new micro-batches).
_MAX_PLANS = 1024

# --kv-dtype: how the store keeps K/V (None: in the dtype Tier 1 computes in).
KV_STORAGE = {"auto": None, "int8": torch.int8}


class _Session:
    """One Tier 1's claim on this node: the KV store and step plans it built, which live and die
    with the connection that claimed them (another connection's end must not drop them)."""

    def __init__(self, conn: Connection, store: KVStore) -> None:
        self.conn, self.store = conn, store
        self.plans: dict[object, AttentionPlan] = {}  # micro-batch -> its step's plan


class Tier2Node:
    def __init__(self, kv_memory: int | None = None, kv_tokens: int | None = None, netem: NetEm | None = None,
                 secret: bytes | None = None, kv_dtype: str = "auto"):
        if (kv_memory is None) == (kv_tokens is None):
            raise ValueError("give exactly one of kv_memory (bytes) or kv_tokens")
        if kv_dtype not in KV_STORAGE:
            raise ValueError(f"--kv-dtype must be one of {', '.join(KV_STORAGE)}, got {kv_dtype!r}")
        self.kv_memory, self.kv_tokens, self.netem, self.secret = kv_memory, kv_tokens, netem, secret
        self.kv_dtype = kv_dtype
        self.session: _Session | None = None
        self.metrics = Tier2Metrics(self)
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
        return self._server.sockets[0].getsockname()[1]

    async def drain(self) -> None:
        """Stop accepting connections (a frame is attended to and answered before the next is read)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        self._closing = True  # frames still arriving are dropped
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
        kv_dtype = KV_STORAGE[self.kv_dtype] or dtype
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
        for seq_id, tokens in header.get("reserve", ()):
            if seq_id not in store:
                store.reserve(seq_id, tokens)
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
