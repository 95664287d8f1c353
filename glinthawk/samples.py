"""``n`` samples of one request: n sequences on the same prompt, answered as one line.

The n sequences are the request's choices 0..n-1. Choice i samples with its own seed,
derived from the request's (choice 0 keeps it, so n = 1 is unchanged), and the sampler is
counter-based, so each choice is the same however the sequences are batched. They start
with the same prompt, so all but its last token is a prefix they share (``prefix.py``):
prefilled once, its KV kept once on their Tier 2 node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glinthawk.results import Completion

if TYPE_CHECKING:
    from glinthawk.sequence import Sequence

MAX_N = 128  # choices one request may ask for

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


@dataclass(eq=False)
class Samples:
    """The choices of one request as they finish; the line is ready when every one has."""

    members: list[Sequence]
    completions: list[Completion | None] = field(default_factory=list)
    error: str | None = None
    left: int = 0

    def finish(self, seq: Sequence, completion: Completion | None, error: str | None = None) -> bool:
        """Record one choice (or why it failed); True once every choice is in."""
        if error is not None and self.error is None:
            self.error = error
        self.completions[seq.sample_index] = completion
        self.left -= 1
        return self.left == 0


def choice_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed: the request's for choice 0, else a mix of the two (splitmix64's finalizer)."""
    if index == 0:
        return seed
    z = (seed + index * _GOLDEN) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK


def members(seq: Sequence, new_matcher=None) -> list[Sequence]:
    """The request's sequences: ``seq`` itself for n = 1, else ``seq`` as choice 0 and n - 1 more
    (``new_matcher()``: a fresh grammar state for each, for structured output)."""
    n = seq.request.n
    if n == 1:
        return [seq]
    from glinthawk.sequence import next_id

    group = Samples([seq], [None] * n, left=n)
    seq.samples = group
    for index in range(1, n):
        group.members.append(dataclasses.replace(
            seq, id=next_id(), seed=choice_seed(seq.seed, index), generated=[], sample_index=index,
            matcher=new_matcher() if seq.matcher is not None else None))
    return group.members


def of(seq: Sequence) -> list[Sequence]:
    """Every sequence of ``seq``'s request (itself alone unless it asked for n > 1)."""
    return seq.samples.members if seq.samples is not None else [seq]
