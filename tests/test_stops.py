"""Stop strings and stop token ids: limits per request, and matching whose cost per token does not grow
with the number of stop strings."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from engine_util import PROMPTS, ok, request, run_engine

from glinthawk import stops
from glinthawk.engine import Intake
from glinthawk.requests import RequestError, parse_line
from glinthawk.sequence import Sequence
from glinthawk.stops import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS


def parse(obj, number: int = 7):
    return parse_line(number, json.dumps(obj).encode())


@pytest.mark.parametrize("fields,message", [
    ({"stop": [f"s{i}" for i in range(10_000)]},
     f"line 7: 'stop' holds 10000 strings; at most {MAX_STOP_STRINGS} are allowed"),
    ({"stop": ["x" * 40_000, "y" * 40_000]},
     f"line 7: 'stop' holds 80000 characters in all; at most {MAX_STOP_CHARS} are allowed"),
    ({"stop_token_ids": list(range(5000))},
     f"line 7: 'stop_token_ids' holds 5000 ids; at most {MAX_STOP_TOKEN_IDS} are allowed"),
])
def test_too_many_stops_is_a_line_error(fields, message):
    with pytest.raises(RequestError) as info:
        parse({"custom_id": "many", "prompt": "x", **fields})
    assert info.value.message == message and info.value.custom_id == "many"
    parse({"custom_id": "ok", "prompt": "x", "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS)],
           "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))})  # at the limits: accepted


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama_gqa")


@pytest.mark.parametrize("bad", [-5, 10**20, 320])
def test_stop_token_ids_outside_the_vocabulary_are_line_errors(llama, bad):
    model, tok = llama
    assert model.config.vocab_size == 320
    intake = Intake(tok, model.config.max_position_embeddings, model.config.vocab_size, None)
    with pytest.raises(RequestError) as info:
        intake.admit(parse({"custom_id": "ids", "prompt": "x", "stop_token_ids": [3, bad]}))
    assert info.value.message == (f"line 7: 'stop_token_ids' holds {bad}, outside this model's vocabulary "
                                  "[0, 320); give ids below the vocabulary size")
    assert info.value.custom_id == "ids"
    intake.admit(parse({"custom_id": "fine", "prompt": "x", "stop_token_ids": [0, 319]}))


def test_a_thousand_stop_strings_stop_where_one_would(llama):
    model, tok = llama
    base = dict(max_tokens=16, temperature=0, ignore_eos=True)
    lines, _ = run_engine(model, tok, [request("plain", PROMPTS[0], **base)])
    stream = ok(lines["plain"])["token_ids"]
    text = tok.decode(stream)
    cut = next(k for k in range(2, len(text) - 1) if text[k:k + 2].isascii() and text[k:k + 2].strip()
               and text.find(text[k:k + 2]) == k)
    hit = text[cut:cut + 2]
    never = [f"\x00{i}" for i in range(999)]
    lines, _ = run_engine(model, tok, [request("one", PROMPTS[0], stop=(hit,), **base),
                                       request("many", PROMPTS[0], stop=(*never[:500], hit, *never[500:]), **base)])
    for cid in ("one", "many"):
        line = ok(lines[cid])
        assert (line["finish_reason"], line["text"]) == ("stop", text[:cut])
        assert line["token_ids"] == stream[:len(line["token_ids"])]
        assert hit in tok.decode(line["token_ids"]) and hit not in tok.decode(line["token_ids"][:-1])


class _CountingText(str):
    """Generated text that counts the characters a stop search reads from it (by find or by slicing)."""

    read = 0

    def find(self, sub, start=0, end=None):
        _CountingText.read += len(self) - max(0, start)
        return str.find(self, sub, start, end)

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        _CountingText.read += len(piece)
        return piece


class _StubTokenizer:
    eos_token_ids = frozenset({1})
    pieces = {5: "lorem ", 6: "ipsum ", 7: "dolor\n"}

    def decode(self, ids):
        return _CountingText("".join(self.pieces[i] for i in ids))


def _characters_read(stop: tuple[str, ...]) -> int:
    seq = Sequence(request("c", [3], max_tokens=200, stop=stop), [3], seed=0)
    _CountingText.read = 0
    for token in [5, 6, 7] * 60:
        assert not seq.append(token, _StubTokenizer())
    return _CountingText.read


def test_per_token_stop_search_reads_the_same_text_for_10_or_1000_stop_strings():
    """Work per token is one pass over the new text's window, not one per stop string."""
    few = _characters_read(tuple(f"zz{i:04d}" for i in range(10)))
    many = _characters_read(tuple(f"zz{i:04d}" for i in range(1000)))
    assert 0 < few and many == few
    assert few <= 180 * (6 + 6 + 16)  # per token: its own text, the longest stop and the slack back


def test_the_automaton_is_built_once_per_stop_list(monkeypatch):
    built, real = [], stops.ahocorasick.Automaton

    def automaton():
        built.append(1)
        return real()

    stops.matcher_for.cache_clear()
    listed = tuple(f"zz{i}" for i in range(300))
    monkeypatch.setattr(stops, "ahocorasick", SimpleNamespace(Automaton=automaton))
    for _ in range(3):  # three requests with the same list, 60 tokens each
        seq = Sequence(request("c", [3], max_tokens=100, stop=listed), [3], seed=0)
        for token in [5, 6, 7] * 20:
            seq.append(token, _StubTokenizer())
    assert len(built) == 1
    stops.matcher_for.cache_clear()


def _reference_search(text: str, checked: int, stop: tuple[str, ...]) -> int | None:
    """The search as it was, one str.find per stop string."""
    start = max(0, checked - (max(len(s) for s in stop) + 16))
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


class _PieceTokenizer:
    """Decodes ids by a table of pieces; says it concatenates (as byte-level decoding does) or not."""

    eos_token_ids = frozenset()

    def __init__(self, concatenates: bool):
        self.pieces: list[str] = []
        self.decode_concatenates = concatenates

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize("concatenates", [False, True])
def test_matches_the_search_per_stop_string(concatenates):
    """Same earliest match as one find per stop string over the whole text, on random growing texts with
    overlapping stops and pieces that end in U+FFFD (as an incomplete UTF-8 character decodes)."""
    rng = random.Random(5)
    alphabet = "ab c\n\ufffdé😀"
    for _ in range(300):
        stop = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 8))})
        tok, ids = _PieceTokenizer(concatenates), []
        state, checked = stops.StopState(stop, ()), 0
        while len(tok.decode(ids)) < 80:
            tok.pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))))
            ids.append(len(tok.pieces) - 1)
            text = tok.decode(ids)
            expected = _reference_search(text, checked, stop)
            checked = len(text)
            assert state.find(tok, ids) == expected, (text, stop)
            if expected is not None:
                break


def test_byte_level_text_is_read_near_its_end_exactly(tiny_model):
    """Random ids of the byte-level test tokenizer (many split UTF-8 characters, special tokens): the window
    read equals the whole decode's tail, while only the tokens since the last complete character are decoded."""
    _, tok = tiny_model("llama_gqa")
    assert tok.decode_concatenates
    decoded = []
    real_decode = tok.decode

    class Counting:
        decode_concatenates = True

        def decode(self, ids):
            decoded.append(len(ids))
            return real_decode(ids)

    rng = random.Random(11)
    for _ in range(20):
        keep, ids, checked = rng.randint(1, 12), [], 0
        text_of = stops.GeneratedText(keep)
        for _ in range(150):
            ids.append(rng.randrange(tok.vocab_size))
            start = max(0, checked - keep)
            length, window = text_of.since(Counting(), ids, start)
            whole = real_decode(ids)
            assert (length, window) == (len(whole), whole[start:]), ids
            checked = length
    assert max(decoded) < 30 and sum(decoded) < 20 * 150 * 3  # not the whole list each token


def test_a_sequence_decodes_only_its_newest_tokens_for_the_stop_search(tiny_model):
    _, tok = tiny_model("llama_gqa")
    sizes = []

    class Recording:
        eos_token_ids = tok.eos_token_ids
        decode_concatenates = tok.decode_concatenates

        def decode(self, ids):
            sizes.append(len(ids))
            return tok.decode(ids)

    ascii_ids = [i for i in range(tok.vocab_size) if tok.decode([i]).isascii() and tok.decode([i])][:50]
    seq = Sequence(request("c", [3], max_tokens=300, stop=("\x00never",)), [3], seed=0)
    for token in ascii_ids * 4:
        assert not seq.append(token, Recording())
    assert len(sizes) == 200 and max(sizes) == 1
