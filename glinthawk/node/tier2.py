"""Tier 2: owns a shard of the KV cache (whole sequences, all layers) and computes attention.

Tier 1 introduces itself with the model's KV geometry; the node sizes its store from
``--kv-memory``/``--kv-tokens`` and announces the capacity in tokens. Each ATTN frame
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
from glinthawk.compute.kvcache import KVCapacityError, KVStore, UnknownSequenceError
from glinthawk.compute.loader import DTYPES
from glinthawk.metrics import Tier2Metrics
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed, server_handshake, start_server
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm

log = logging.getLogger("glinthawk.tier2")

# Step plans kept at most (one per micro-batch of the Tier 1; the bound is against a peer
# that keeps naming new micro-batches).
_MAX_PLANS = 1024


class Tier2Node:
    def __init__(self, kv_memory: int | None = None, kv_tokens: int | None = None, netem: NetEm | None = None,
                 secret: bytes | None = None):
        if (kv_memory is None) == (kv_tokens is None):
            raise ValueError("give exactly one of kv_memory (bytes) or kv_tokens")
        self.kv_memory, self.kv_tokens, self.netem, self.secret = kv_memory, kv_tokens, netem, secret
        self.store: KVStore | None = None
        self._plans: dict[object, AttentionPlan] = {}  # micro-batch -> its step's plan
        self.metrics = Tier2Metrics(self)
        self.owner: Connection | None = None
        self._server: asyncio.AbstractServer | None = None
        self._closing = False

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
        if self.owner is not None:
            self.owner.close()

    # -- connection -------------------------------------------------------------------
    def _welcome(self, hello: dict) -> dict:
        try:
            layers, kv_heads, head_dim = (int(hello[k]) for k in ("num_layers", "num_kv_heads", "head_dim"))
            dtype = DTYPES[hello["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"HELLO from Tier 1 lacks a valid KV geometry ({exc!r})") from None
        if min(layers, kv_heads, head_dim) <= 0:
            raise ProtocolError("HELLO from Tier 1 has a non-positive KV geometry")
        bytes_per_token = 2 * layers * kv_heads * head_dim * dtype.itemsize
        tokens = self.kv_tokens if self.kv_tokens is not None else self.kv_memory // bytes_per_token
        if tokens <= 0:
            raise ProtocolError(f"--kv-memory {self.kv_memory} B holds no token of {bytes_per_token} B of this model; "
                                f"give at least {bytes_per_token} B")
        try:
            self.store = KVStore(layers, kv_heads, head_dim, tokens, dtype)
        except (RuntimeError, MemoryError) as exc:
            log.error("cannot allocate the KV store: %s", exc)
            gib = tokens * bytes_per_token / 2**30
            raise ProtocolError(f"cannot allocate a KV store of {tokens} tokens ({gib:.1f} GiB) on this machine; "
                                "give a smaller --kv-memory or --kv-tokens") from None
        log.info("KV store: %d tokens, %.1f MiB, %d layers", tokens, tokens * bytes_per_token / 2**20, layers)
        return {"capacity_tokens": tokens, "bytes_per_token": bytes_per_token}

    async def _serve(self, conn: Connection) -> None:
        if self.owner is not None and not self.owner.closed:
            await conn.send({"type": MsgType.ERROR, "message": "this Tier 2 node already serves a Tier 1"})
            conn.close()
            return
        await server_handshake(conn, {"tier1"}, self._welcome, secret=self.secret)
        self.owner = conn
        try:
            async for header, tensors in conn:
                if self._closing:
                    break
                kind = header["type"]
                if kind == MsgType.ATTN:
                    await self._attend(conn, header, tensors)
                elif kind == MsgType.RELEASE and isinstance(header.get("seqs"), list):
                    self._release(header["seqs"])
                elif kind == MsgType.PING:
                    await conn.send({"type": MsgType.PONG, "nonce": header.get("nonce")})
                else:
                    await conn.send({"type": MsgType.ERROR, "message": f"unexpected message type {kind!r}"})
        except (ConnectionClosed, ProtocolError) as exc:
            log.warning("Tier 1 connection ended: %s", exc)
        finally:
            self.owner = None
            self.store = None  # a new Tier 1 starts from an empty cache
            self._plans = {}
            log.info("Tier 1 disconnected; KV store dropped")

    async def _attend(self, conn: Connection, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        mb = header.get("mb")
        try:
            out = self._compute(header, tensors)
        except Exception as exc:  # a malformed request fails alone; the node keeps serving
            if not isinstance(exc, (KVCapacityError, UnknownSequenceError)):
                log.warning("bad ATTN frame: %r", exc)
            await conn.send({"type": MsgType.ERROR, "mb": mb, "message": f"attention failed: {exc}"})
            return
        await conn.send({"type": MsgType.ATTN_OUT, "mb": mb, "layer": header.get("layer")}, {"out": out})

    def _compute(self, header: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        store = self.store
        if store is None:
            raise ValueError("no KV store (Tier 1 not introduced)")
        layer = int(header["layer"])
        if not 0 <= layer < store.num_layers:
            raise ValueError(f"layer {layer} out of range")
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        with self.metrics.attention_seconds.labels(layer=str(layer)).time():
            return attend_with(self._plan(store, header, q, k, v), layer, q, k, v)

    def _plan(self, store: KVStore, header: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionPlan:
        """The plan of the frame's step: made from its ``seqs`` (a step's first frame), else
        the one its micro-batch's first frame made (made again if the store has compacted
        since, for another micro-batch's reservation)."""
        mb = header.get("mb")
        seqs = header.get("seqs")
        if seqs is None:
            plan = self._plans.get(mb)
            if plan is None:
                raise ValueError(f"micro-batch {mb!r}: a frame without seqs, and no earlier frame of its step had them")
            if plan.stale:
                plan = self._plans[mb] = plan.replanned()
            return plan
        self._plans.pop(mb, None)  # a step that fails to plan leaves no plan behind
        ids = [s[0] for s in seqs]
        starts = [int(s[1]) for s in seqs]
        counts = [int(s[2]) for s in seqs]
        check_shapes(store, q, k, v, sum(counts))  # before reserving: a refused frame holds no room
        for seq_id, tokens in header.get("reserve", ()):
            if seq_id not in store:
                store.reserve(seq_id, tokens)
        plan = AttentionPlan.of(store, ids, starts, counts)
        if len(self._plans) >= _MAX_PLANS:
            del self._plans[next(iter(self._plans))]  # the least recently started step
        self._plans[mb] = plan
        return plan

    def _release(self, seq_ids: list) -> None:
        if self.store is None:
            return
        for seq_id in seq_ids:
            if isinstance(seq_id, (int, str)) and seq_id in self.store:
                self.store.free(seq_id)
