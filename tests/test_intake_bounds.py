"""What one line may cost Tier 1 at intake: memory bounded by the line bound, not by what the line asks for.

The intake path is run as Tier 1 runs it (``parse_line`` then ``Intake.admit``, with the bundled model's
tokenizer and context) in a fresh process, so its peak RSS (VmHWM) is measured alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from glinthawk.requests import MAX_LINE_BYTES, MAX_LINE_NUMBERS

# Runs in a child process; prints one JSON object per line kind: growth of VmHWM and the outcome.
_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import glinthawk
    from glinthawk.engine import Intake
    from glinthawk.requests import MAX_LINE_BYTES, RequestError, parse_line
    from glinthawk.tokenizer import Tokenizer

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    def reset_hwm():  # Linux: "5" resets the peak RSS to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    model = Path(glinthawk.__file__).parent / "models" / "default"
    config = json.loads((model / "config.json").read_text())
    tokenizer = Tokenizer(model)
    intake = Intake(tokenizer, config["max_position_embeddings"], config["vocab_size"], None)
    intake.admit(parse_line(1, b'{"custom_id": "warm", "prompt": "warm up", "max_tokens": 2}'))

    def line(kind, number):
        room = MAX_LINE_BYTES - 200
        if kind == "text":
            return b'{"custom_id": "%d", "prompt": "' % number + b"word " * (room // 5) + b'", "max_tokens": 4}'
        if kind == "chat":
            return (b'{"custom_id": "%d", "messages": [{"role": "user", "content": "' % number
                    + b"word " * (room // 5) + b'"}], "max_tokens": 4}')
        return b'{"custom_id": "%d", "prompt": [' % number + b"1000, " * (room // 6) + b'1000], "max_tokens": 4}'

    for number, kind in enumerate(sys.argv[1:], start=10):
        raw = line(kind, number)
        assert MAX_LINE_BYTES - 400 < len(raw) <= MAX_LINE_BYTES
        reset_hwm()
        before = hwm_kib()
        try:
            intake.admit(parse_line(number, raw))
            outcome = "admitted"
        except RequestError as error:
            outcome = error.message
        del raw
        after = hwm_kib()
        seq = intake.admit(parse_line(number + 100, b'{"custom_id": "n%d", "prompt": "The quick", "max_tokens": 4}'
                                      % number))
        print(json.dumps({"kind": kind, "growth_kib": after - before, "error": outcome,
                          "next_prompt_tokens": len(seq.prompt_ids)}), flush=True)
""")


def _intake_growth(kind: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["text", "chat", "ids"])
def test_a_line_just_under_the_bound_costs_a_small_multiple_of_it(kind):
    """A prompt near 16 MiB in a 512-token model: an error line, in memory a small multiple of the line bound
    (the line, its decoded text and the parsed value are each about one bound), and the next line still runs."""
    if not open("/proc/self/status").read().count("VmHWM"):
        pytest.skip("needs Linux /proc")
    result = _intake_growth(kind)
    if kind == "ids":  # 2.8 million ids: refused while parsing, past the numbers one line may hold
        assert result["error"].startswith(f"line 10: holds more than {MAX_LINE_NUMBERS} numbers"), result
    else:
        assert result["error"].startswith("line 10: prompt ("), result
        assert "exceeds the model's context of 512 tokens" in result["error"], result
    assert result["next_prompt_tokens"] > 1, result
    assert result["growth_kib"] * 1024 <= 8 * MAX_LINE_BYTES, result


# -- the bound in pieces, with the tiny test model (context 256, vocabulary 320) ------------------------------


class _RecordingEncoder:
    """The HF tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def encode(self, text, add_special_tokens=True):
        self.lengths.append(len(text))
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def fresh_tokenizer(tiny_checkpoint):
    from glinthawk.tokenizer import Tokenizer

    return Tokenizer(tiny_checkpoint("llama_gqa"))


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_a_prompt_far_over_the_context_is_never_encoded_whole(fresh_tokenizer, field):
    from glinthawk.engine import Intake
    from glinthawk.requests import RequestError, parse_line
    from glinthawk.tokenizer import COUNT_CHUNK_CHARS

    recorder = fresh_tokenizer._tok = _RecordingEncoder(fresh_tokenizer._tok)
    intake = Intake(fresh_tokenizer, 256, 320, None)
    text = "The quick brown fox jumps over the lazy dog. " * 20_000  # 900 KB
    value = text if field == "prompt" else [{"role": "user", "content": text}]
    with pytest.raises(RequestError, match=r"line 4: prompt \(at least \d+ tokens\) \+ max_tokens \(3\) exceeds the "
                                           r"model's context of 256 tokens; shorten the prompt or lower max_tokens"):
        intake.admit(parse_line(4, json.dumps({"custom_id": "big", field: value, "max_tokens": 3}).encode()))
    assert 0 < max(recorder.lengths) <= COUNT_CHUNK_CHARS
    assert sum(recorder.lengths) <= 2 * COUNT_CHUNK_CHARS  # stopped as soon as the count was past the context


TEXTS = {
    "prose": "Offline batch inference runs millions of prompts through one model, and then some more. ",
    "whitespace runs": "a  b\n\n\n   c\t\t d     \r\n e ",
    "no whitespace": "abcdefghij0123456789,.;:!?",
    "cjk and emoji": "東京は日本の首都です。😀👍🏽 ",
    "code": "def f(x):\n    return [y * 2 for y in range(x) if y % 3]\n\n",
}


@pytest.mark.parametrize("kind", list(TEXTS))
def test_the_count_is_a_lower_bound_and_accepted_prompts_encode_exactly(fresh_tokenizer, kind):
    """Refused only when the exact count is over the limit; what passes is encoded exactly as ``encode``."""
    from glinthawk.tokenizer import TooManyTokens

    text = (TEXTS[kind] * (200_000 // len(TEXTS[kind]) + 1))[:200_000]
    exact = fresh_tokenizer.encode(text)
    for limit in (len(exact), len(exact) + 1, 2 * len(exact)):
        assert fresh_tokenizer.encode_within(text, limit) == exact
    # The chunked count (used when a text is long for the limit) proves "over" only when it is.
    for limit in (len(exact), len(exact) + 16, 2 * len(exact)):
        assert fresh_tokenizer._count_past(text, limit) is None
    for limit in (len(exact) - 1, len(exact) * 99 // 100, len(exact) * 3 // 4):
        at_least = fresh_tokenizer._count_past(text, limit)
        assert at_least is None or limit < at_least <= len(exact)
    assert fresh_tokenizer._count_past(text, len(exact) * 3 // 4) is not None  # and it is not vacuous
    with pytest.raises(TooManyTokens):  # far over: refused by counting
        fresh_tokenizer.encode_within(text, 1000)


def test_token_id_prompt_over_the_context_fails_before_its_ids_are_checked(fresh_tokenizer):
    from glinthawk.engine import Intake
    from glinthawk.requests import RequestError, parse_line

    intake = Intake(fresh_tokenizer, 256, 320, None)
    line = json.dumps({"custom_id": "ids", "prompt": [10**20] * 300, "max_tokens": 2}).encode()
    with pytest.raises(RequestError, match=r"line 5: prompt \(300 tokens\) \+ max_tokens \(2\) = 302 exceeds"):
        intake.admit(parse_line(5, line))
