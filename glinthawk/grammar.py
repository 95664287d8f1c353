"""Token masks that keep a sequence's output inside its grammar (llguidance).

The matcher lives with the sequence, on the process that owns it (the single process, or
a pipeline's first stage): before each step it computes the sampled rows' allowed-token
bitmasks (``fill_masks``), which travel with the step to whichever stage samples; the
sampler sets the disallowed logits to -inf. The matcher advances only when a step is
committed, so a sequence rebuilt after a node loss still has the matcher its generated
tokens lead to. llguidance is an optional dependency (``glinthawk[structured]``): without
it, only the requests that ask for structured output fail.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from glinthawk.compute import cbind, elementwise
from glinthawk.structured import Constraint

if TYPE_CHECKING:
    from glinthawk.tokenizer import Tokenizer

INSTALL_HINT = "structured output needs llguidance; install it with: pip install 'glinthawk[structured]'"
# Compiled grammars kept per tokenizer: a batch usually repeats one schema, and a copy of a
# compiled matcher costs some 20 µs against milliseconds to compile it again.
CACHED_GRAMMARS = 64
# JSON as json.dumps writes it: with free whitespace a small model may emit newlines forever
# between two tokens of a valid document (vLLM's xgrammar backend restricts it too).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A constraint that cannot be used: the library is missing, or the grammar does not compile."""


def words(vocab_size: int) -> int:
    """32-bit words in one row's bitmask."""
    return (vocab_size + 31) // 32


class Compiler:
    """Compiles constraints for one tokenizer and model vocabulary (the bitmask's width)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        try:
            import llguidance
        except ImportError:
            raise GrammarError(INSTALL_HINT) from None
        self._llg = llguidance
        self.vocab_size = vocab_size
        try:
            self._tok = llguidance.LLTokenizer(tokenizer.json_text(), n_vocab=vocab_size,
                                               eos_token=sorted(tokenizer.eos_token_ids) or None)
        except ValueError as exc:
            raise GrammarError(f"structured output does not support this tokenizer ({exc})") from None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()  # an engine may admit requests from more than one thread

    def matcher(self, constraint: Constraint) -> Matcher:
        """A fresh matcher at the start of ``constraint``; GrammarError if it does not compile."""
        key = (constraint.kind, constraint.source)
        with self._lock:
            prototype = self._cache.get(key)
            if prototype is None:
                prototype = self._cache[key] = self._compile(constraint)
                if len(self._cache) > CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return Matcher(prototype.deep_copy(), words(self.vocab_size))

    def _compile(self, constraint: Constraint) -> Any:
        matcher_type = self._llg.LLMatcher
        try:
            grammar = (matcher_type.grammar_from_json_schema(constraint.source, JSON_OPTIONS)
                       if constraint.kind == "json" else matcher_type.grammar_from_regex(constraint.source))
        except ValueError as exc:
            raise GrammarError(f"cannot compile the {constraint.describe()}: {exc}") from None
        prototype = matcher_type(self._tok, grammar, log_level=0)
        if prototype.is_error():
            message = " ".join(prototype.get_error().split())  # one line: it ends up in an error line
            raise GrammarError(f"cannot compile the {constraint.describe()}: {message}")
        return prototype


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> Compiler:
    """The tokenizer's compiler for a model of ``vocab_size`` (built once; GrammarError without llguidance)."""
    with _compilers_lock:
        per_vocab = _compilers.setdefault(tokenizer, {})
        compiler = per_vocab.get(vocab_size)
        if compiler is None:
            compiler = per_vocab[vocab_size] = Compiler(tokenizer, vocab_size)
        return compiler


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: Any, words: int):
        self._m, self.words = matcher, words

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (a contiguous int32 CPU tensor of ``words``)."""
        self._m.unsafe_compute_mask_ptr(cbind.address("compute_mask", "row", row, (torch.int32,), (self.words,)),
                                        self.words * 4)

    def advance(self, token: int) -> bool:
        """Take a sampled token; False if the grammar did not allow it (a bug upstream)."""
        return self._m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()


def fill_masks(matchers: list[Matcher]) -> torch.Tensor:
    """The allowed-token bitmasks of ``matchers``' next tokens, int32 [len, words]."""
    masks = torch.empty(len(matchers), matchers[0].words, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        matcher.fill(masks[i])
    return masks


def allowed_tokens(masks: torch.Tensor, vocab: int) -> torch.Tensor:
    """The bitmasks [rows, words] as bool [rows, vocab] (bit i of word w: token 32 w + i;
    tokens past the mask are not allowed)."""
    if sys.byteorder == "little":  # numpy unpacks a byte in a pass; torch's shifts cost 20x that
        bits = torch.from_numpy(np.unpackbits(masks.cpu().numpy().view(np.uint8), axis=1, bitorder="little"))
    else:
        shifts = torch.arange(32, dtype=torch.int32)
        bits = ((masks.cpu().unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(masks.shape[0], -1)
    if bits.shape[1] < vocab:
        bits = torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]))
    return bits[:, :vocab].bool()


def apply_masks(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> None:
    """Set to -inf, in place, the logits of ``rows`` whose bit in ``masks`` [len(rows), words] is 0
    (on the CPU a C loop; elsewhere torch's masked_fill)."""
    if elementwise.mask_logits(logits, rows, masks):
        return
    banned = ~allowed_tokens(masks, logits.shape[1]).to(logits.device)
    if len(rows) == logits.shape[0] and bool((rows == torch.arange(len(rows))).all()):
        logits.masked_fill_(banned, float("-inf"))  # every row constrained: no gather and scatter
        return
    rows = rows.to(logits.device)
    logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(banned, float("-inf")))
