"""Shared prompt prefixes: which waiting requests share one, and the prefixes in the KV.

A prefix is filled once by a sequence of its own, its *holder* (its prompt is the prefix;
it generates nothing and answers no line), and then read by every sequence whose prompt
starts with it: such a *reader* is reserved on the holder's KV (``KVStore.reserve(...,
prefix=)``) and its prefill starts after the prefix. The engine and Tier 1 decide alike
(``PrefixCache.decide``); each places holders and readers on its own store or nodes.

A prefix is made when a request comes to be placed and others waiting share at least
MIN_TOKENS of its prompt (or all of it: the n choices of one request, ``samples.py``); it stays after its last reader ends (a later request may start
with it) until its room is needed (``idle``: least recently used first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from glinthawk.compute.sampling import SamplingParams

if TYPE_CHECKING:
    from glinthawk.sequence import Sequence

BLOCK_TOKENS = 16  # a prefix found among waiting requests is cut to whole blocks: later ones share those more often
MIN_TOKENS = 32  # a shorter shared start is not worth a prefill step of its own


@dataclass(eq=False)
class Prefix:
    tokens: list[int]
    holder: Sequence  # fills the prefix's KV; its id names the prefix on a KV store
    route: tuple = ()  # Tier 1: the node of each stage holding it
    readers: int = 0  # sequences placed on it now
    ready: bool = False  # the holder's prefill is done: readers may be placed
    last_used: int = 0

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class Decision:
    """``decide``'s answer: read one of the ``copies`` of a prefix that is filled, wait for one
    being filled, fill a new prefix of ``length`` tokens, or go alone."""

    kind: str  # "read", "wait", "fill" or "alone"
    copies: list[Prefix] = field(default_factory=list)  # every copy, filled or being filled
    length: int = 0

    @property
    def ready(self) -> list[Prefix]:
        return [prefix for prefix in self.copies if prefix.ready]


ALONE = Decision("alone")


class PrefixCache:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._copies: dict[tuple[int, ...], list[Prefix]] = {}  # by tokens: the same prefix may be on several nodes
        self._lengths: dict[int, int] = {}  # prefix length -> how many prefixes have it
        self._clock = 0
        # A waiting sequence is looked at on every placement: what it found stays good until a
        # prefix is added or dropped (``_version``).
        self._version = 0
        self._found: WeakKeyDictionary[Sequence, tuple[int, list[Prefix]]] = WeakKeyDictionary()

    def __iter__(self) -> Iterator[Prefix]:
        for copies in list(self._copies.values()):
            yield from copies

    def __len__(self) -> int:
        return sum(len(copies) for copies in self._copies.values())

    def decide(self, seq: Sequence, peers: Iterable[Sequence]) -> Decision:
        """What to do with ``seq`` about to be placed; ``peers``: others waiting whose prompts
        start with the same block (``FairQueue.peers``)."""
        if not self.enabled or not can_share(seq):
            return ALONE
        found = self._found.get(seq)
        if found is None or found[0] != self._version:
            found = self._found[seq] = (self._version, self.find(seq.prompt_ids))
        copies = found[1]
        if copies:
            return Decision("read" if any(p.ready for p in copies) else "wait", copies)
        length = shared_length(seq, peers)
        return Decision("fill", length=length) if length else ALONE

    def find(self, prompt: list[int]) -> list[Prefix]:
        """The copies of the longest prefix ``prompt`` starts with (leaving it a token of its own)."""
        for length in sorted(self._lengths, reverse=True):
            if length < len(prompt) and (copies := self._copies.get(tuple(prompt[:length]))):
                return copies
        return []

    def add(self, tokens: list[int], like: Sequence, route: tuple = ()) -> Prefix:
        """A new prefix, with its holder made after ``like`` (the request that found it)."""
        holder = dataclasses.replace(like, prompt_ids=list(tokens), id=_new_id(), generated=[], num_cached=0,
                                     finish_reason=None, stop_text=None, stops=None,
                                     request=dataclasses.replace(like.request, params=SamplingParams(max_tokens=1)),
                                     logprobs=None, prompt_logprobs=None, matcher=None, prefix=None)
        prefix = Prefix(list(tokens), holder, route)
        holder.holds = prefix
        self._copies.setdefault(tuple(tokens), []).append(prefix)
        self._version += 1
        self._lengths[len(tokens)] = self._lengths.get(len(tokens), 0) + 1
        return prefix

    def drop(self, prefix: Prefix) -> None:
        """Forget ``prefix`` (evicted, or its node was lost); its readers keep it until they end."""
        key = tuple(prefix.tokens)
        copies = self._copies.get(key, [])
        if prefix in copies:
            self._version += 1
            copies.remove(prefix)
            if not copies:
                del self._copies[key]
            self._lengths[prefix.length] -= 1
            if not self._lengths[prefix.length]:
                del self._lengths[prefix.length]

    def touch(self, prefix: Prefix) -> None:
        self._clock += 1
        prefix.last_used = self._clock

    def idle(self) -> list[Prefix]:
        """Filled prefixes no sequence reads now, least recently used first: room to take back."""
        return sorted((p for p in self if p.ready and not p.readers), key=lambda p: p.last_used)


def can_share(seq: Sequence) -> bool:
    """A sequence may read a prefix unless it wants log-probs of its prompt (they come out of
    the prefill it would skip) or it is a holder."""
    return seq.prompt_logprobs is None and seq.holds is None and len(seq.prompt_ids) > BLOCK_TOKENS


def shared_length(seq: Sequence, peers: Iterable[Sequence]) -> int:
    """The prefix length that saves the most prefill among ``seq`` and ``peers``; 0 if none does.
    Each sharer keeps at least one token of its own. A start two prompts share is cut to whole
    blocks, at least MIN_TOKENS; the same prompt (n samples) shares all but its last token."""
    if not can_share(seq):
        return 0
    prompt = seq.prompt_ids
    lengths = []
    for peer in peers:
        if peer is seq or not can_share(peer):
            continue
        common = _common_length(prompt, peer.prompt_ids)
        if common == len(prompt) == len(peer.prompt_ids):
            lengths.append(common - 1)
        elif (length := min(common, len(prompt) - 1, len(peer.prompt_ids) - 1) // BLOCK_TOKENS * BLOCK_TOKENS) \
                >= MIN_TOKENS:
            lengths.append(length)
    best, best_saved = 0, 0
    for sharers, length in enumerate(sorted(lengths, reverse=True), start=2):
        if (sharers - 1) * length > best_saved:
            best, best_saved = length, (sharers - 1) * length
    return best


def _common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share: a binary search over slice comparisons (C speed)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _new_id() -> int:
    from glinthawk.sequence import next_id

    return next_id()
