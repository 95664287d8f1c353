"""Request lines (plain and OpenAI Batch forms), bad input, and the ``glinthawk generate`` CLI's errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from glinthawk.cli import main
from glinthawk.scheduling import Intake
from glinthawk.requests import CHAT_URL, COMPLETIONS_URL, OPENAI, PLAIN, RequestError, parse_line, parse_stream
from glinthawk.results import error_line, is_error


def parse(obj, number: int = 3):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_line(number, raw)


def parse_error(obj, *fragments: str, number: int = 3) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(obj, number)
    error = info.value
    assert error.line == number
    assert error.message.startswith(f"line {number}: ")
    for fragment in fragments:
        assert fragment in error.message
    return error


# -- plain form -------------------------------------------------------------------------


def test_plain_request_parses():
    req = parse({"custom_id": "a", "prompt": "Hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                 "top_k": 4, "min_p": 0.1, "seed": 3, "stop": "\n", "stop_token_ids": [5], "ignore_eos": True})
    assert (req.custom_id, req.line, req.form, req.prompt, req.url) == ("a", 3, PLAIN, "Hello", COMPLETIONS_URL)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (7, 0.5, 0.9, 4, 0.1, 3)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == (("\n",), (5,), True)
    assert parse({"prompt": "x", "stop": ["a", "b"]}).params.stop == ("a", "b")
    # Defaults, and a custom_id made from the line number when none is given.
    req = parse({"prompt": "Hello", "temperature": None}, number=9)
    assert req.custom_id == "line-9" and req.params.max_tokens == 16 and req.params.temperature == 1.0
    assert parse({"prompt": [0, 5, 6]}).prompt == [0, 5, 6]
    assert parse({"prompt": ["just one"]}).prompt == "just one"
    chat = parse({"custom_id": "c", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.is_chat and chat.url == CHAT_URL and chat.prompt is None


@pytest.mark.parametrize("raw,fragment", [
    (b'{"prompt": "x",', "invalid JSON"),
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
    (b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
    (b'[1, 2]', "expected a JSON object, got list"),
    (b'"just a string"', "expected a JSON object, got str"),
    (b'42', "expected a JSON object, got int"),
])
def test_unreadable_lines(raw, fragment):
    error = parse_error(raw, fragment)
    assert error.custom_id is None
    line = error_line(error)
    assert line == {"custom_id": None, "error": {"message": error.message}, "line": 3}
    assert is_error(line)


@pytest.mark.parametrize("obj,fragments", [
    ({"custom_id": "a", "max_tokens": 3}, ["exactly one of 'prompt' or 'messages'"]),
    ({"custom_id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, ["exactly one of"]),
    ({"custom_id": "a", "prompt": ""}, ["'prompt' is empty"]),
    ({"custom_id": "a", "prompt": []}, ["'prompt' must be"]),
    ({"custom_id": "a", "prompt": 12}, ["'prompt' must be"]),
    ({"custom_id": "a", "prompt": [1, "two"]}, ["'prompt' must be"]),
    ({"custom_id": "a", "prompt": "x", "max_tokens": "5"}, ["max_tokens"]),
    ({"custom_id": "a", "prompt": "x", "max_tokens": 2.5}, ["max_tokens"]),
    ({"custom_id": "a", "prompt": "x", "max_tokens": 0}, ["max_tokens", "positive"]),
    ({"custom_id": "a", "prompt": "x", "max_tokens": -4}, ["max_tokens"]),
    ({"custom_id": "a", "prompt": "x", "temperature": -0.5}, ["temperature", ">= 0"]),
    ({"custom_id": "a", "prompt": "x", "temperature": "hot"}, ["temperature"]),
    ({"custom_id": "a", "prompt": "x", "top_p": 0}, ["top_p", "(0, 1]"]),
    ({"custom_id": "a", "prompt": "x", "top_p": 1.5}, ["top_p"]),
    ({"custom_id": "a", "prompt": "x", "top_k": 2.5}, ["top_k"]),
    ({"custom_id": "a", "prompt": "x", "top_k": -3}, ["top_k"]),
    ({"custom_id": "a", "prompt": "x", "seed": "7"}, ["seed"]),
    ({"custom_id": "a", "prompt": "x", "stop": 5}, ["'stop'"]),
    ({"custom_id": "a", "prompt": "x", "stop": [""]}, ["stop"]),
    ({"custom_id": "a", "prompt": "x", "stop_token_ids": ["a"]}, ["'stop_token_ids'"]),
    ({"custom_id": "a", "prompt": "x", "stop_token_ids": [True]}, ["'stop_token_ids'"]),
    ({"custom_id": "a", "prompt": "x", "ignore_eos": "yes"}, ["'ignore_eos'"]),
    ({"custom_id": "a", "prompt": "x", "temprature": 0.5}, ["unknown field(s) temprature", "supported:"]),
    ({"custom_id": "a", "messages": "hi"}, ["'messages' must be a non-empty list"]),
    ({"custom_id": "a", "messages": [{"content": "hi"}]}, ["'role'"]),
    ({"custom_id": "a", "messages": [{"role": "user", "content": 3}]}, ["'content'"]),
])
def test_bad_fields_name_the_problem_and_keep_the_custom_id(obj, fragments):
    error = parse_error(obj, *fragments)
    assert error.custom_id == "a" and error.form == PLAIN
    assert error_line(error)["custom_id"] == "a"


@pytest.mark.parametrize("custom_id", [5, "", ["a"], True])
def test_bad_custom_id(custom_id):
    parse_error({"custom_id": custom_id, "prompt": "x"}, "'custom_id' must be a non-empty string")


# -- OpenAI Batch form ------------------------------------------------------------------


def test_openai_forms_parse():
    req = parse({"custom_id": "c1", "method": "POST", "url": COMPLETIONS_URL,
                 "body": {"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "n": 1,
                          "stream": False, "stop": ["\n"]}})
    assert (req.form, req.url, req.prompt, req.model, req.is_chat) == (OPENAI, COMPLETIONS_URL, "Hello", "tiny", False)
    assert (req.params.max_tokens, req.params.temperature, req.params.stop) == (5, 0, ("\n",))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    req = parse({"custom_id": "c2", "method": "POST", "url": CHAT_URL,
                 "body": {"model": "tiny", "messages": messages, "max_completion_tokens": 9, "top_p": 0.5}})
    assert (req.form, req.url, req.messages, req.is_chat) == (OPENAI, CHAT_URL, messages, True)
    assert (req.params.max_tokens, req.params.top_p) == (9, 0.5)


@pytest.mark.parametrize("obj,fragments", [
    ({"custom_id": "o", "url": "/v1/embeddings", "body": {"input": "x"}}, ["unsupported url '/v1/embeddings'"]),
    ({"custom_id": "o", "method": "GET", "url": COMPLETIONS_URL, "body": {"prompt": "x"}}, ["'method' must be POST"]),
    ({"custom_id": "o", "url": COMPLETIONS_URL, "body": "prompt"}, ["'body' must be a JSON object"]),
    ({"custom_id": "o", "url": COMPLETIONS_URL, "body": {"prompt": "x", "n": 0}}, ["'n' must be an integer from 1"]),
    ({"custom_id": "o", "url": COMPLETIONS_URL, "body": {"prompt": "x", "stream": True}}, ["'stream' must be false"]),
    ({"custom_id": "o", "url": COMPLETIONS_URL, "body": {"prompt": "x", "suffix": "y"}}, ["unknown field(s) suffix"]),
    ({"custom_id": "o", "url": COMPLETIONS_URL, "body": {"prompt": "x"}, "extra": 1}, ["unknown field(s) extra"]),
    ({"custom_id": "o", "url": COMPLETIONS_URL, "body": {"messages": [{"role": "user", "content": "x"}]}},
     ["takes 'prompt', not 'messages'"]),
    ({"custom_id": "o", "url": CHAT_URL, "body": {"prompt": "x"}}, ["takes 'messages', not 'prompt'"]),
    ({"custom_id": "o", "url": COMPLETIONS_URL, "body": {"prompt": "x", "top_p": 2}}, ["top_p"]),
])
def test_bad_openai_lines(obj, fragments):
    error = parse_error(obj, *fragments)
    assert (error.custom_id, error.form) == ("o", OPENAI)
    line = error_line(error)
    assert line["custom_id"] == "o" and line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["message"] == error.message
    assert is_error(line)


def test_openai_line_without_custom_id_is_an_error():
    error = parse_error({"url": COMPLETIONS_URL, "body": {"prompt": "x"}}, "'custom_id'")
    assert error.form == OPENAI and error.custom_id is None


# -- escapes and numbers JSON allows but nothing downstream takes ---------------------------


@pytest.mark.parametrize("obj,where", [
    ({"custom_id": "a", "prompt": "bad \ud800 text"}, "'prompt'"),
    ({"custom_id": "a", "prompt": ["\udfff"]}, "'prompt[0]'"),
    ({"custom_id": "a", "messages": [{"role": "user", "content": "hi \udc00"}]}, "'messages[0].content'"),
    ({"custom_id": "a", "prompt": "x", "stop": ["\udc00"]}, "'stop[0]'"),
    ({"custom_id": "a", "url": COMPLETIONS_URL, "body": {"prompt": "x", "model": "m\ud800"}}, "'body.model'"),
    ({"custom_id": "a", "prompt": "x", "\ud800": 1}, "a field name"),
    ({"custom_id": "id\ud800", "prompt": "x"}, "'custom_id'"),
])
def test_lone_surrogate_escape_is_an_error_that_can_be_written(obj, where):
    """An escape such as \\ud800 is valid JSON but not text: the tokenizer raised TypeError on it, and a result
    line holding it could not be encoded, which killed the run (or hung it, for a custom_id)."""
    error = parse_error(obj, where, "lone UTF-16 surrogate")
    assert error.custom_id == (None if where == "'custom_id'" else "a")
    json.dumps(error_line(error), ensure_ascii=False).encode("utf-8")  # the error line itself can be written


def test_surrogate_pair_escape_is_text():
    assert parse({"custom_id": "\ud83d\ude00", "prompt": "smile \ud83d\ude00"}).prompt == "smile \U0001f600"


def test_too_deeply_nested_json_is_an_error():
    parse_error(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deeply")


def test_integer_too_large_for_a_float_is_an_error():
    parse_error(b'{"custom_id": "a", "prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature must be")


def test_a_bug_met_by_one_line_fails_that_line(monkeypatch):
    from glinthawk import requests

    def broken(*fields):
        raise KeyError("simulated bug")

    monkeypatch.setattr(requests, "_sampling", broken)
    error = parse_error({"custom_id": "a", "prompt": "x"}, "internal error", "KeyError('simulated bug')")
    assert error.custom_id == "a"


# -- streams ----------------------------------------------------------------------------


def test_over_long_line_is_skipped_and_the_next_line_still_parses():
    long_line = json.dumps({"custom_id": "long", "prompt": "x" * 200}).encode()
    fits = json.dumps({"custom_id": "fits", "prompt": "y" * 20}).encode()
    assert len(fits) <= 64 < len(long_line)
    data = b"\n".join([
        b'{"custom_id": "first", "prompt": "a"}', long_line, fits, b"", b"  ", b'{"prompt": "b"}', long_line,
    ])  # the last line is over-long and has no newline
    items = list(parse_stream(io.BytesIO(data), max_line_bytes=64))
    assert [type(item).__name__ for item in items] == ["Request", "RequestError", "Request", "Request", "RequestError"]
    assert items[0].custom_id == "first" and items[2].custom_id == "fits"
    assert items[1].line == 2 and "longer than the 64-byte limit" in items[1].message
    assert items[3].custom_id == "line-6"  # blank lines are skipped but still counted
    assert items[4].line == 7


def test_line_of_exactly_the_limit_is_accepted():
    line = json.dumps({"custom_id": "x", "prompt": "z" * 30}).encode()
    items = list(parse_stream(io.BytesIO(line + b"\n" + line), max_line_bytes=len(line)))
    assert [getattr(item, "custom_id", None) for item in items] == ["x", "x"]


# -- checks that need the model ----------------------------------------------------------


@pytest.fixture(scope="module")
def intake_parts(tiny_model):
    model, tok = tiny_model("llama_gqa")
    return tok, model.config.max_position_embeddings, model.config.vocab_size


def test_duplicate_custom_id(intake_parts):
    intake = Intake(*intake_parts, capacity_tokens=None)
    intake.admit(parse({"custom_id": "same", "prompt": "a"}, number=1))
    with pytest.raises(RequestError, match="line 2: duplicate custom_id 'same'") as info:
        intake.admit(parse({"custom_id": "same", "prompt": "b"}, number=2))
    assert info.value.custom_id is None  # the output keeps one line with custom_id 'same': the first line's
    intake.admit(parse({"custom_id": "other", "prompt": "b"}, number=3))


def test_prompt_plus_max_tokens_over_the_context(intake_parts):
    tok, context, vocab = intake_parts
    assert context == 256
    intake = Intake(tok, context, vocab, capacity_tokens=None)
    seq = intake.admit(parse({"custom_id": "fits", "prompt": [5] * 250, "max_tokens": 6}))
    assert seq.reserve_tokens == 255
    with pytest.raises(RequestError, match=r"prompt \(250 tokens\) \+ max_tokens \(7\) = 257 exceeds the model's "
                                           r"context of 256 tokens"):
        intake.admit(parse({"custom_id": "over", "prompt": [5] * 250, "max_tokens": 7}))


def test_prompt_token_ids_out_of_the_vocabulary(intake_parts):
    intake = Intake(*intake_parts, capacity_tokens=None)
    with pytest.raises(RequestError, match=r"prompt token ids must lie in \[0, 320\)"):
        intake.admit(parse({"custom_id": "v", "prompt": [5, 320]}))


def test_request_bigger_than_the_kv_cache(intake_parts):
    intake = Intake(*intake_parts, capacity_tokens=20)
    with pytest.raises(RequestError, match="needs 24 KV tokens but the cache holds only 20"):
        intake.admit(parse({"custom_id": "big", "prompt": [5] * 10, "max_tokens": 15}))


def test_chat_without_a_template(intake_parts, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama_gqa")
    shutil.copy(source / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    from glinthawk.tokenizer import Tokenizer

    _, context, vocab = intake_parts
    intake = Intake(Tokenizer(tmp_path), context, vocab, capacity_tokens=None)
    with pytest.raises(RequestError, match="no chat template"):
        intake.admit(parse({"custom_id": "chat", "messages": [{"role": "user", "content": "hi"}]}))


BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content }"


def test_chat_with_a_template_that_does_not_compile(intake_parts, tiny_checkpoint, tmp_path):
    """Each chat line fails, naming the file and the problem; plain prompts still run."""
    shutil.copy(tiny_checkpoint("llama_gqa") / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": BROKEN_TEMPLATE}))
    from glinthawk.tokenizer import Tokenizer

    _, context, vocab = intake_parts
    intake = Intake(Tokenizer(tmp_path), context, vocab, capacity_tokens=None)
    chat = {"role": "user", "content": "hi"}
    for custom_id in ("chat1", "chat2"):
        with pytest.raises(RequestError) as info:
            intake.admit(parse({"custom_id": custom_id, "messages": [chat]}))
        assert info.value.message == (
            f"line 3: {tmp_path / 'tokenizer_config.json'}: its 'chat_template' does not compile (line 1: "
            "unexpected '}'); fix the template there, or send plain prompts (/v1/completions) instead of messages")
    intake.admit(parse({"custom_id": "plain", "prompt": "hi"}))


def test_a_bug_met_by_one_request_fails_that_request(intake_parts, monkeypatch):
    """The tokenizer raising something else than TokenizerError (as it did on a lone surrogate) fails one line."""
    tok, context, vocab = intake_parts
    intake = Intake(tok, context, vocab, capacity_tokens=None)
    real_encode = tok.encode

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        if text == "poison":
            raise TypeError("TextInputSequence must be str")
        return real_encode(text, add_special_tokens)

    monkeypatch.setattr(tok, "encode", encode)
    with pytest.raises(RequestError, match=r"line 3: internal error .*TypeError") as info:
        intake.admit(parse({"custom_id": "p", "prompt": "poison"}))
    assert info.value.custom_id == "p"
    intake.admit(parse({"custom_id": "q", "prompt": "fine"}))


# -- the CLI ----------------------------------------------------------------------------

GOOD_PROMPT = json.dumps({"custom_id": "ok", "prompt": "Once", "max_tokens": 2}) + "\n"


def generate(model_dir: Path, tmp_path: Path, input_text: str = GOOD_PROMPT, *extra: str):
    inputs, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text(input_text)
    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), str(inputs), "-o", str(output),
                                       "--device", "cpu", "--no-progress", *extra])
    return result, output


def assert_clean_failure(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    def copy(variant: str = "llama_gqa") -> Path:
        target = tmp_path / f"model-{variant}"
        shutil.copytree(tiny_checkpoint(variant), target)
        return target

    return copy


def test_cli_end_to_end_with_bad_lines(tiny_checkpoint, tmp_path):
    lines = [
        {"custom_id": "a", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        '{"custom_id": "broken", "prompt": ',
        {"custom_id": "b", "method": "POST", "url": COMPLETIONS_URL,
         "body": {"prompt": "Once", "max_tokens": 3, "ignore_eos": True}},
        "[1, 2, 3]",
        "",
        {"custom_id": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True},
        {"custom_id": "d", "prompt": "x", "colour": "red"},
        {"custom_id": "a", "prompt": "again"},
    ]
    inputs, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    # A real process, as a user runs it.
    glinthawk = Path(sys.executable).with_name("glinthawk")
    command = [str(glinthawk)] if glinthawk.exists() else [sys.executable, "-m", "glinthawk.cli"]
    proc = subprocess.run(
        command + ["generate", str(inputs), "--model", str(tiny_checkpoint("llama_gqa")), "-o", str(output),
                   "--device", "cpu", "--no-progress", "--max-batch-tokens", "4"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "3 done, 4 failed" in proc.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 7
    good = {r["custom_id"]: r for r in records if not is_error(r)}
    errors = [r for r in records if is_error(r)]
    assert set(good) == {"a", "b", "c"}
    assert good["a"]["completion_tokens"] == 4 and good["a"]["finish_reason"] == "length"
    assert good["b"]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert good["c"]["completion_tokens"] == 2
    by_line = {r.get("line"): r for r in errors if r.get("custom_id") is None}
    assert "line 2: invalid JSON" in by_line[2]["error"]["message"]
    assert "line 4: expected a JSON object" in by_line[4]["error"]["message"]
    named = {r["custom_id"]: r["error"]["message"] for r in errors if r.get("custom_id")}
    assert "unknown field(s) colour" in named["d"]
    assert "line 8: duplicate custom_id 'a'" in by_line[8]["error"]["message"]
    assert [r for r in records if r.get("custom_id") == "a"] == [good["a"]]


def test_cli_lone_surrogates_fail_their_lines_only(tiny_checkpoint, tmp_path):
    lines = [
        {"custom_id": "a", "prompt": "Once", "max_tokens": 2},
        {"custom_id": "in-prompt", "prompt": "bad \ud800 text", "max_tokens": 2},
        {"custom_id": "id\ud800", "prompt": "Once", "max_tokens": 2},
        {"custom_id": "c", "prompt": "Once", "max_tokens": 2},
    ]
    jsonl = "".join(json.dumps(line) + "\n" for line in lines)
    result, output = generate(tiny_checkpoint("llama_gqa"), tmp_path, jsonl)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "2 done, 2 failed" in result.output
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    errors = {r["line"]: r for r in records if is_error(r)}
    assert {r["custom_id"] for r in records if not is_error(r)} == {"a", "c"}
    assert errors[2]["custom_id"] == "in-prompt" and "'prompt' holds a lone" in errors[2]["error"]["message"]
    assert errors[3]["custom_id"] is None and "'custom_id' holds a lone" in errors[3]["error"]["message"]


def test_cli_broken_chat_template_fails_chat_lines_only(checkpoint_copy, tmp_path):
    model = checkpoint_copy()
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": BROKEN_TEMPLATE}))
    lines = [{"custom_id": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
             {"custom_id": "plain", "prompt": "Once", "max_tokens": 2, "ignore_eos": True}]
    result, output = generate(model, tmp_path, "".join(json.dumps(line) + "\n" for line in lines))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "1 done, 1 failed" in result.output
    records = {r["custom_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert "tokenizer_config.json: its 'chat_template' does not compile" in records["chat"]["error"]["message"]
    assert records["plain"]["completion_tokens"] == 2


def test_cli_generates_in_process(tiny_checkpoint, tmp_path):
    result, output = generate(tiny_checkpoint("llama_gqa"), tmp_path, GOOD_PROMPT, "--kv-tokens", "64")
    assert result.exit_code == 0, result.output
    assert "1 done, 0 failed" in result.output
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert record["custom_id"] == "ok" and record["completion_tokens"] >= 1


def test_cli_missing_input_file(tiny_checkpoint, tmp_path):
    output = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_checkpoint("llama_gqa")),
                                       str(tmp_path / "nope.jsonl"), "-o", str(output), "--device", "cpu"])
    assert_clean_failure(result, "cannot read input file", "nope.jsonl", "No such file")


def test_cli_unwritable_output(tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(GOOD_PROMPT)
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_checkpoint("llama_gqa")), str(inputs),
                                       "-o", str(tmp_path / "no-such-dir" / "out.jsonl"), "--device", "cpu"])
    assert_clean_failure(result, "cannot write output file", "no-such-dir")


@pytest.mark.parametrize("command", ["run", "submit"])
def test_cli_unwritable_output_fails_before_anything_starts(tiny_checkpoint, tmp_path, command):
    """``run`` used to start a whole cluster and end in a traceback; ``submit`` to connect first."""
    inputs, logs = tmp_path / "in.jsonl", tmp_path / "logs"
    inputs.write_text(GOOD_PROMPT)
    where = (["--model", str(tiny_checkpoint("llama_gqa")), "--tier2-nodes", "1", "--log-dir", str(logs)]
             if command == "run" else ["--to", "127.0.0.1:9"])
    result = CliRunner().invoke(main, [command, str(inputs), "-o", str(tmp_path / "no-such-dir" / "out.jsonl"),
                                       *where])
    assert_clean_failure(result, "cannot write output file", "no-such-dir", "No such file")
    assert not logs.exists()  # no node was started


def test_check_output_keeps_a_file_to_resume_and_leaves_none_behind(tmp_path):
    from glinthawk.cli import check_output

    kept, fresh = tmp_path / "kept.jsonl", tmp_path / "fresh.jsonl"
    kept.write_text('{"custom_id": "a"}\n')
    check_output(str(kept))
    check_output(str(fresh))
    assert kept.read_text() == '{"custom_id": "a"}\n' and not fresh.exists()


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_cli_missing_model_directory(tmp_path):
    result, _ = generate(tmp_path / "no-model", tmp_path)
    assert_clean_failure(result, "no-model", "model directory does not exist")


def test_cli_missing_config(checkpoint_copy, tmp_path):
    model = checkpoint_copy()
    (model / "config.json").unlink()
    result, output = generate(model, tmp_path)
    assert_clean_failure(result, "config.json: missing")
    assert not output.exists()


def test_cli_unsupported_architecture(checkpoint_copy, tmp_path):
    model = checkpoint_copy()
    edit_config(model, architectures=["GPT2LMHeadModel"])
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "config.json", "architecture 'GPT2LMHeadModel' is not supported", "LlamaForCausalLM")


def test_cli_unsupported_rope_type(checkpoint_copy, tmp_path):
    model = checkpoint_copy("llama3_tied_mqa")
    config = json.loads((model / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    edit_config(model, **{key: {**config[key], "rope_type": "yarn"}})
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "config.json", "rope type 'yarn' is not supported")


@pytest.mark.parametrize("rope", ["linear-ish", 5])
def test_cli_malformed_rope_settings(checkpoint_copy, tmp_path, rope):
    model = checkpoint_copy()
    edit_config(model, rope_parameters=None, rope_scaling=rope)
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "config.json", "rope_scaling")


def test_cli_bad_config_value(checkpoint_copy, tmp_path):
    model = checkpoint_copy()
    edit_config(model, num_key_value_heads=3)
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "num_key_value_heads=3", "divisor of num_attention_heads=4")
    edit_config(model, num_key_value_heads=2, hidden_size="64")
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "'hidden_size' must be a positive integer")


def test_cli_truncated_safetensors(checkpoint_copy, tmp_path):
    model = checkpoint_copy()
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "model.safetensors", "truncated or corrupt")


def test_cli_tensor_of_the_wrong_shape(checkpoint_copy, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = checkpoint_copy()
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.down_proj.weight"
    assert tuple(tensors[name].shape) == (64, 128)
    tensors[name] = torch.zeros(64, 100)
    save_file(tensors, weights, metadata={"format": "pt"})
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "model.safetensors", f"'{name}' has shape (64, 100)", "implies (64, 128)")


def test_cli_missing_tensor(checkpoint_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    model = checkpoint_copy()
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "tensor 'model.norm.weight' is missing")


def test_cli_missing_tokenizer(checkpoint_copy, tmp_path):
    model = checkpoint_copy()
    (model / "tokenizer.json").unlink()
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "tokenizer.json: missing")


def test_cli_missing_shard(checkpoint_copy, tmp_path):
    model = checkpoint_copy("mistral")
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    (model / shard).unlink()
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, shard, "weight file is missing (named by the checkpoint index)")


def test_cli_no_weights_at_all(checkpoint_copy, tmp_path):
    model = checkpoint_copy()
    (model / "model.safetensors").unlink()
    result, _ = generate(model, tmp_path)
    assert_clean_failure(result, "no weights found", "model.safetensors")


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox?"}]


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json"])
def test_chat_template_where_current_checkpoints_keep_it(tiny_checkpoint, tmp_path, where):
    """transformers 5 saves the chat template as chat_template.jinja (older processors as
    chat_template.json), not in tokenizer_config.json: such a checkpoint's chat lines are rendered
    and tokenized exactly as transformers' apply_chat_template does."""
    from transformers import AutoTokenizer

    from glinthawk.tokenizer import Tokenizer

    source = tiny_checkpoint("llama_gqa")
    shutil.copy(source / "tokenizer.json", tmp_path)
    config = json.loads((source / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(template)
        expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES, add_generation_prompt=True)
    else:
        (tmp_path / where).write_text(json.dumps({"chat_template": template}))
        expected = AutoTokenizer.from_pretrained(source).apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # transformers 5: an encoding
    assert Tokenizer(tmp_path).encode_chat(MESSAGES) == list(expected)


def test_a_chat_template_jinja_file_comes_before_tokenizer_config(tiny_checkpoint, tmp_path):
    """As in transformers: the .jinja file wins over a template tokenizer_config.json still carries."""
    from glinthawk.tokenizer import Tokenizer

    source = tiny_checkpoint("llama_gqa")
    shutil.copy(source / "tokenizer.json", tmp_path)
    shutil.copy(source / "tokenizer_config.json", tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer(tmp_path).render_chat(MESSAGES) == "[Be brief.][The quick brown fox?]"


def test_chat_template_kwargs_reach_the_template(tiny_checkpoint, tmp_path):
    """vLLM's chat_template_kwargs: further template variables (Qwen3's enable_thinking), in
    both forms; a bad one is its line's error."""
    from glinthawk.tokenizer import Tokenizer

    source = tiny_checkpoint("llama_gqa")
    shutil.copy(source / "tokenizer.json", tmp_path)
    shutil.copy(source / "tokenizer_config.json", tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if enable_thinking %}<think>{% endif %}")
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.render_chat(MESSAGES, {"enable_thinking": True}).endswith("<think>")
    assert not tokenizer.render_chat(MESSAGES).endswith("<think>")
    plain = parse({"custom_id": "a", "messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": True}})
    openai = parse({"custom_id": "b", "url": CHAT_URL, "body": {"messages": MESSAGES,
                                                               "chat_template_kwargs": {"enable_thinking": True}}})
    assert plain.template_kwargs == openai.template_kwargs == {"enable_thinking": True}
    parse_error({"custom_id": "c", "prompt": "x", "chat_template_kwargs": {}}, "goes with 'messages'")
    parse_error({"custom_id": "d", "messages": MESSAGES, "chat_template_kwargs": [1]}, "must be an object")
    parse_error({"custom_id": "e", "messages": MESSAGES, "chat_template_kwargs": {"messages": []}},
                "cannot set messages")
