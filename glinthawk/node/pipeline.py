"""The first stage's view of the pipeline stages after it: an account of each of their Tier 2
nodes, kept current from what comes up the chain, so that placement and admission by KV room
work for every stage from one place and no stage's nodes are ever over-committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from glinthawk.node.chain import RemoteNode, stage_name

log = logging.getLogger("glinthawk.tier1")


class LaterStages:
    def __init__(self, send: Callable):
        self.send = send  # into the chain (releases)
        self.layers: dict[int, list[int]] = {}  # a stage's first layer -> [first, stop]
        self.nodes: dict[int, list[RemoteNode]] = {}  # a stage's first layer -> its nodes, in configured order

    def reset(self, stages: list[dict]) -> None:
        """The chain as a (re)connected next stage described it: every node starts empty."""
        self.layers = {int(s["layers"][0]): [int(s["layers"][0]), int(s["layers"][1])] for s in stages}
        self.nodes = {int(s["layers"][0]): [self._account(int(s["layers"][0]), i, node)
                                            for i, node in enumerate(s["nodes"])] for s in stages}

    def _account(self, stage: int, index: int, node: list) -> RemoteNode:
        address, capacity, alive = node[:3]
        return RemoteNode(stage, index, str(address), int(capacity), bool(alive), self.send, _leaving(node))

    def update(self, stage: int, nodes: list) -> None:
        """A NODES frame: a node lost, one (re)joined with an empty store (a new account, so the
        sequences placed on its former life are seen as lost), or a new one that joined the stage
        (the stage appends it: an index names one node for good)."""
        accounts = self.nodes.get(stage)
        if accounts is None:
            return
        for index, node in enumerate(nodes):
            if index == len(accounts):
                accounts.append(self._account(stage, index, node))
                log.info("%s: Tier 2 node %s joined", stage_name(self.layers[stage]), node[0])
                continue
            current = accounts[index]
            if node[2] and not current.alive:
                accounts[index] = self._account(stage, index, node)
                log.info("%s: Tier 2 node %s (re)joined", stage_name(self.layers[stage]), node[0])
            elif not node[2]:
                self._lose(current)
            elif _leaving(node) and not current.draining:
                current.draining = True
                log.info("%s: Tier 2 node %s is leaving: no new sequences there", stage_name(self.layers[stage]),
                         node[0])

    def mark_lost(self, lost: list[list[int]]) -> None:
        """The nodes a failed step names (which may come up before their stage's NODES frame)."""
        for stage, index in lost:
            accounts = self.nodes.get(stage, [])
            if 0 <= index < len(accounts):
                self._lose(accounts[index])

    def _lose(self, account: RemoteNode) -> None:
        if account.alive and account.draining:  # it left: what still ran there (if anything) was moved
            account.alive = False
            log.info("%s: Tier 2 node %s left", stage_name(self.layers[account.stage]), account.address)
        elif account.alive:
            account.alive = False
            log.error("%s: lost Tier 2 node %s; its sequences will be rebuilt elsewhere",
                      stage_name(self.layers[account.stage]), account.address)

    def mark_all_lost(self) -> None:
        for accounts in self.nodes.values():
            for account in accounts:
                account.alive = False

    def stage_of(self, address: str) -> str | None:
        """The name of the later stage that has a node at ``address``, if one has."""
        return next((stage_name(self.layers[stage]) for stage, accounts in self.nodes.items()
                     if any(a.address == address for a in accounts)), None)

    def placeable(self) -> list[list[RemoteNode]]:
        """Each later stage's nodes that new sequences may go to (alive, not leaving), in stage order."""
        return [[a for a in self.nodes[stage] if a.placeable] for stage in sorted(self.nodes)]

    def status(self) -> list[dict]:
        return [{"layers": self.layers[stage], "tier2": [{
            "address": a.address, "alive": a.alive, "kv_tokens": a.capacity_tokens, "kv_tokens_used": a.used_tokens,
            "sequences": a.sequences, "draining": a.alive and a.draining} for a in self.nodes[stage]]}
            for stage in sorted(self.nodes)]


def _leaving(node: list) -> bool:
    """A NODES entry's leaving flag (absent before nodes could leave a later stage gracefully)."""
    return len(node) > 3 and bool(node[3])
