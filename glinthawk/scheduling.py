"""What every engine that takes requests shares: judging a line, counting the work, and
the queue that requests wait in for KV room.

The single-process engine and Tier 1 both admit through ``Intake`` and count with
``RunStats``, so a bad line is judged the same way and the counters mean the same thing
whichever runs it. ``FairQueue`` is Tier 1's waiting room: one FIFO per batch (a client's
submission), taken in turns, so a small batch submitted behind a large one is not stuck
behind all of it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass

from glinthawk import samples
from glinthawk.grammar import compiler_for
from glinthawk.prefix import BLOCK_TOKENS, can_share
from glinthawk.requests import Request, RequestError, internal_error
from glinthawk.sequence import Sequence, StepBatch, new_sequence
from glinthawk.tokenizer import Tokenizer


@dataclass
class RunStats:
    admitted: int = 0
    finished: int = 0  # answered with a result
    failed: int = 0  # answered with an error line
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_tokens: int = 0  # sequences through prefill: each counts once, at its first sampled token
    steps: int = 0

    @property
    def requests_done(self) -> int:
        return self.finished

    @property
    def requests_failed(self) -> int:
        return self.failed

    def record_step(self, batch: StepBatch) -> None:
        """Count a step that is about to be committed (``first_tokens`` is read before the commit)."""
        self.steps += 1
        self.prompt_tokens += sum(c for s, c in zip(batch.seqs, batch.counts) if s.num_cached < len(s.prompt_ids))
        self.generated_tokens += len(batch.sampled)
        self.first_tokens += batch.first_tokens


class Intake:
    """Turns parsed lines into sequences: tokenizes, checks limits and duplicate ids."""

    def __init__(self, tokenizer: Tokenizer, max_context: int, vocab_size: int, capacity_tokens: int | None,
                 seen: Iterable[str] = ()):
        self.tokenizer, self.max_context, self.vocab_size = tokenizer, max_context, vocab_size
        self.capacity_tokens = capacity_tokens
        self._seen: set[str] = set(seen)  # custom_ids taken (``seen``: by requests admitted before)

    def admit(self, item: Request | RequestError) -> Sequence:
        """The request's sequence, or RequestError (whatever goes wrong: one line never stops the others)."""
        if isinstance(item, RequestError):
            raise item
        try:
            return self._admit(item)
        except RequestError:
            raise
        except Exception as exc:
            raise internal_error(exc, item.line, item.custom_id, item.form) from None

    def _admit(self, item: Request) -> Sequence:
        if item.custom_id in self._seen:  # the error line leaves the id out: it answers the first line's id
            raise RequestError(f"line {item.line}: duplicate custom_id '{item.custom_id}'", item.line, None, item.form)
        self._seen.add(item.custom_id)
        seq = new_sequence(item, self.tokenizer, self.max_context, self.vocab_size)
        if self.capacity_tokens is not None and seq.reserve_tokens > self.capacity_tokens:
            raise RequestError(
                f"line {item.line}: needs {seq.reserve_tokens} KV tokens but the cache holds only "
                f"{self.capacity_tokens}; raise the KV capacity or lower max_tokens",
                item.line, item.custom_id, item.form,
            )
        return seq

    def members(self, seq: Sequence) -> list[Sequence]:
        """``seq``'s request's sequences: n of them when it asks for n choices (``samples.py``)."""
        structured = seq.request.structured
        return samples.members(seq, lambda: compiler_for(self.tokenizer, self.vocab_size).matcher(structured))


class FairQueue:
    """Sequences waiting for KV room: one FIFO per key (a batch), the keys taking turns.

    ``turns()`` offers each key's sequences in order, key after key starting with the one
    whose turn it is; ``served(key)`` sends a key to the back of the line once one of its
    sequences was placed. ``peers(seq)``: the waiting sequences whose prompts start as its
    does (a shared prefix in the making, prefix.py).
    """

    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[Sequence]] = OrderedDict()
        self._size = 0
        self._by_start: dict[tuple[int, ...], dict[int, Sequence]] = {}  # first block -> {id: sequence}

    def peers(self, seq: Sequence) -> list[Sequence]:
        """Waiting sequences (``seq`` aside) whose prompts share their first block with ``seq``'s."""
        return [peer for peer in self._by_start.get(tuple(seq.prompt_ids[:BLOCK_TOKENS]), {}).values()
                if peer is not seq]

    def _indexed(self, seqs, add: bool) -> None:
        for seq in seqs:
            if not can_share(seq):
                continue
            start = tuple(seq.prompt_ids[:BLOCK_TOKENS])
            if add:
                self._by_start.setdefault(start, {})[seq.id] = seq
            elif (same := self._by_start.get(start)) is not None:
                same.pop(seq.id, None)
                if not same:
                    del self._by_start[start]

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Sequence]:
        for queue in list(self._queues.values()):
            yield from queue

    def count(self, key: Hashable) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    def append(self, key: Hashable, seq: Sequence) -> None:
        self._queues.setdefault(key, deque()).append(seq)
        self._size += 1
        self._indexed([seq], add=True)

    def push_front(self, key: Hashable, seqs: list[Sequence]) -> None:
        """Put ``seqs`` (in order) at the head of ``key``'s queue: they were running before."""
        queue = self._queues.setdefault(key, deque())
        queue.extendleft(reversed(seqs))
        self._size += len(seqs)
        self._indexed(seqs, add=True)

    def turns(self) -> Iterator[tuple[Hashable, deque[Sequence]]]:
        """Each key with its queue, in turn order (a snapshot: the caller may change the queues)."""
        return iter(list(self._queues.items()))

    def rekey(self, old: Hashable, new: Hashable) -> None:
        """``old``'s queue goes on under ``new``, in the same turn."""
        self._queues = OrderedDict((new if key == old else key, queue) for key, queue in self._queues.items())

    def take(self, key: Hashable, seq: Sequence) -> None:
        """Remove ``seq`` from ``key``'s queue; the key goes to the back of the line."""
        queue = self._queues[key]
        queue.remove(seq)
        self._size -= 1
        self._indexed([seq], add=False)
        del self._queues[key]
        if queue:
            self._queues[key] = queue

    def remove_if(self, unwanted: Callable[[Sequence], bool]) -> list[Sequence]:
        """Drop every sequence for which ``unwanted`` holds; returns them."""
        dropped = []
        for key, queue in list(self._queues.items()):
            kept = deque(s for s in queue if not unwanted(s))
            dropped += [s for s in queue if unwanted(s)]
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        self._size -= len(dropped)
        self._indexed(dropped, add=False)
        return dropped

    def clear(self) -> list[Sequence]:
        return self.remove_if(lambda _: True)
