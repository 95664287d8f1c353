"""Where Tier 1 puts a waiting sequence: a node of every stage with room for its KV, and,
when its prompt starts with a prefix that others share (``prefix.PrefixCache``), the nodes
holding that prefix.

A prefix is filled by its holder on one route and read there; once its nodes hold
BALANCE_SLACK more sequences than the least loaded node that could hold it, the next reader
fills another copy there, so that a batch sharing one system prompt still spreads over every
Tier 2 node. Room is taken back from prefixes no sequence reads (least recently used first)
only when a sequence finds none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from glinthawk.node.microbatch import Account, Route
from glinthawk.prefix import Prefix, PrefixCache
from glinthawk.sequence import Sequence

BALANCE_SLACK = 8  # sequences a prefix's first node may hold beyond the least loaded one before a new copy


@dataclass
class Choice:
    """``go``: place the sequence on ``route`` (reading ``prefix`` if set); ``fill``: place
    ``prefix``'s holder on ``route`` and keep the sequence waiting until it is filled;
    ``wait``: its prefix is being filled; ``full``: no route has room."""

    kind: str
    route: Route = ()
    prefix: Prefix | None = None


WAIT, FULL = Choice("wait"), Choice("full")


class Placer:
    def __init__(self, prefixes: PrefixCache, release: Callable[[Account, list[int]], None]):
        self.prefixes, self.release = prefixes, release
        self._orphans: list[Prefix] = []  # on a lost node, forgotten, still read until their readers are requeued

    def choose(self, seq: Sequence, stages: list[list[Account]], peers: Iterable[Sequence]) -> Choice:
        """Where ``seq`` goes; ``stages``: each stage's placeable nodes, ``peers``: others waiting that may share its prefix."""
        decision = self.prefixes.decide(seq, peers)
        if decision.kind == "wait":
            return WAIT
        if decision.kind == "read":
            return self._read(seq, stages, decision.copies)
        if decision.kind == "fill":
            return self._fill(seq, stages, decision.length)
        route = self._route(stages, seq.reserve_tokens)
        return Choice("go", route) if route else FULL

    def _read(self, seq: Sequence, stages: list[list[Account]], copies: list[Prefix]) -> Choice:
        """A filled copy with room on nodes that are not crowded; else a new copy (unless one is on its way)."""
        own = seq.reserve_tokens - copies[0].length
        fits = [p for p in copies if p.ready and all(node in nodes and node.free_tokens >= own
                                                     for node, nodes in zip(p.route, stages))]
        least = min(stages[0], key=lambda node: node.sequences)
        holders = {p.route[0] for p in copies}
        best = min(fits, key=lambda p: p.route[0].sequences) if fits else None
        if best is not None and best.route[0].sequences <= least.sequences + BALANCE_SLACK:
            return self._go(best)
        if any(not p.ready for p in copies):  # a new copy is being filled already: one step, then room there
            return WAIT
        # Its copies are full, or crowded: a new copy on another node with room for it and this sequence.
        others = [node for node in stages[0] if node not in holders]
        choice = self._fill(seq, [others, *stages[1:]], copies[0].length) if others else FULL
        return choice if choice.kind == "fill" or best is None else self._go(best)

    def _go(self, prefix: Prefix) -> Choice:
        self.prefixes.touch(prefix)
        return Choice("go", prefix.route, prefix)

    def _fill(self, seq: Sequence, stages: list[list[Account]], length: int) -> Choice:
        route = self._route(stages, seq.reserve_tokens)  # the prefix and the sequence's own tokens
        if not route:
            return FULL
        prefix = self.prefixes.add(seq.prompt_ids[:length], seq, route)
        self.prefixes.touch(prefix)
        return Choice("fill", route, prefix)

    def _route(self, stages: list[list[Account]], tokens: int) -> Route:
        """The node of each stage with the most free room that holds ``tokens``, taking back the room
        of unread prefixes if none has it; () if there is none even then."""
        idle = self.prefixes.idle()
        while True:
            route = tuple(max(fits, key=lambda node: node.free_tokens) for nodes in stages
                          if (fits := [node for node in nodes if node.free_tokens >= tokens]))
            if len(route) == len(stages) or not idle:
                return route if len(route) == len(stages) else ()
            self.evict(idle.pop(0))

    def evict(self, prefix: Prefix) -> None:
        """Give a filled prefix's room back (its holder is released on each of its nodes)."""
        self.prefixes.drop(prefix)
        self._give_back(prefix)

    def _give_back(self, prefix: Prefix) -> None:
        for node in prefix.route:
            node.free_tokens += prefix.length
            self.release(node, [prefix.holder.id])

    def evict_all(self) -> None:
        """Give back every prefix no sequence reads."""
        for prefix in self.prefixes.idle():
            self.evict(prefix)

    def evict_leaving(self) -> None:
        """Give back the prefixes no sequence reads on a node that is leaving: they are only a cache,
        and a later stage's node counts their holders among the sequences it waits for."""
        for prefix in self.prefixes.idle():
            if not all(node.placeable for node in prefix.route):
                self.evict(prefix)

    def drop_lost(self) -> None:
        """Forget prefixes on a node that is gone. A filled one's room on its other nodes (a later
        stage's) goes back once no sequence reads it (the nodes free it only then); one still
        filling is its micro-batch's to give back."""
        for prefix in list(self.prefixes):
            if not all(node.alive for node in prefix.route):
                self.prefixes.drop(prefix)
                if prefix.ready:
                    self._orphans.append(prefix)
        for prefix in [p for p in self._orphans if not p.readers]:
            self._orphans.remove(prefix)
            self._give_back(prefix)
