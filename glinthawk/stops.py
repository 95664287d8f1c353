"""Stop strings: their limits per request, and matching whose cost per token does not grow with their number.

One Aho-Corasick automaton per distinct stop list scans only the text a new token can have
completed, in a single pass, however many stop strings the request gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import ahocorasick

# Generous for any real use; they bound what a waiting request holds on Tier 1.
MAX_STOP_STRINGS = 1024
MAX_STOP_CHARS = 64 * 1024  # all of a request's stop strings together
MAX_STOP_TOKEN_IDS = 1024
# Characters looked back past the last search, beyond the longest stop string: an earlier
# token may have left a UTF-8 character incomplete, decoded as U+FFFD until completed.
UTF8_SLACK = 16


def check_stop_limits(stop: Sequence[str], stop_token_ids: Sequence[int]) -> None:
    """Raise ValueError naming the limit a request's stop fields pass."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    chars = sum(len(s) for s in stop)
    if chars > MAX_STOP_CHARS:
        raise ValueError(f"'stop' holds {chars} characters in all; at most {MAX_STOP_CHARS} are allowed")
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"'stop_token_ids' holds {len(stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} "
                         "are allowed")


class StopMatcher:
    """Finds the earliest of a set of stop strings in a window of text."""

    def __init__(self, stops: Sequence[str]):
        self.automaton = ahocorasick.Automaton()
        for s in set(stops):
            self.automaton.add_word(s, len(s))
        self.automaton.make_automaton()
        self.longest = max(len(s) for s in stops)

    def earliest(self, window: str) -> int | None:
        """Index in ``window`` of the earliest stop string in it, or None."""
        best: int | None = None
        for end, length in self.automaton.iter(window):  # matches come in order of their end
            begin = end - length + 1
            if best is None or begin < best:
                best = begin
            if end - self.longest + 1 >= best:  # every later match starts at best or after
                break
        return best


@lru_cache(maxsize=16)
def matcher_for(stops: tuple[str, ...]) -> StopMatcher:
    """One automaton per distinct stop list: requests that share one (a batch often does) share it."""
    return StopMatcher(stops)


class GeneratedText:
    """The decoded text of a growing token list, read near its end.

    Where decoding concatenates (byte-level BPE: one lossy UTF-8 decode of the tokens'
    bytes), the text up to the last token that ended on a complete character is settled:
    later tokens only append to it, so only the tokens after it are decoded each time.
    Other tokenizers decode the whole list, which is exact for any decoder.
    """

    def __init__(self, keep: int):
        self.keep = keep  # settled characters kept: the most a window reaches back
        self.settled_tokens, self.settled_length, self.settled_tail = 0, 0, ""

    def since(self, tokenizer, ids: list[int], start: int) -> tuple[int, str]:
        """(length of the whole text, its characters from ``start``); ``start`` may reach back at most
        ``keep`` characters before the end of the text as of the previous call."""
        if not getattr(tokenizer, "decode_concatenates", False):
            text = tokenizer.decode(ids)
            return len(text), text[start:]
        pending = tokenizer.decode(ids[self.settled_tokens:])
        length = self.settled_length + len(pending)
        back = self.settled_length - start
        window = pending[-back:] if back < 0 else self.settled_tail[len(self.settled_tail) - back:] + pending
        if not pending.endswith("\ufffd"):  # ends on a complete character: later tokens cannot change it
            self.settled_tail = (self.settled_tail + pending)[-self.keep:]
            self.settled_tokens, self.settled_length = len(ids), length
        return length, window


class StopState:
    """A sequence's stop rules, built at its first generated token."""

    def __init__(self, stops: tuple[str, ...], stop_token_ids: tuple[int, ...]):
        self.token_ids = frozenset(stop_token_ids)
        self.matcher = matcher_for(stops) if stops else None
        self.back = (self.matcher.longest if self.matcher else 0) + UTF8_SLACK
        self.text = GeneratedText(self.back)
        self.checked = 0  # length of the generated text searched up to last time

    def find(self, tokenizer, ids: list[int]) -> int | None:
        """Where in the text of ``ids`` the earliest stop string starts, looking only where the newest
        token can have completed one; None when no stop string is there."""
        if self.matcher is None:
            return None
        # Anchored on the previous text, not on the end: the newest token's own text may be long.
        start = max(0, self.checked - self.back)
        self.checked, window = self.text.since(tokenizer, ids, start)
        at = self.matcher.earliest(window)
        return None if at is None else start + at
