"""The single-process engine: batching, chunked prefill, KV admission, stop rules, output lines."""

from __future__ import annotations

import pytest
import torch
from engine_util import PROMPTS, ok, request, run_engine

from glinthawk.engine import Engine
from glinthawk.requests import parse_line
from glinthawk.sequence import Sequence, plan_step
from glinthawk.tokenizer import Tokenizer

VARIANT = "llama_gqa"
SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=20)


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model(VARIANT)


@pytest.fixture(scope="module")
def greedy_streams(llama):
    """Each prompt's greedy continuation (16 tokens, EOS ignored), generated alone."""
    model, tok = llama
    streams = {}
    for i, prompt in enumerate(PROMPTS):
        lines, _ = run_engine(model, tok, [request("r", prompt, max_tokens=16, temperature=0, ignore_eos=True)])
        streams[i] = ok(lines["r"])["token_ids"]
        assert len(streams[i]) == 16
    return streams


def mixed_requests(max_tokens: int = 10) -> list:
    """Greedy and seeded-sampled requests over prompts of different lengths."""
    reqs = [request(f"g{i}", p, max_tokens=max_tokens, temperature=0, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    reqs += [request(f"s{i}", p, max_tokens=max_tokens, seed=100 + i, ignore_eos=True, **SAMPLED)
             for i, p in enumerate(PROMPTS)]
    return reqs


def tokens_of(lines: dict) -> dict[str, list[int]]:
    return {cid: ok(line)["token_ids"] for cid, line in lines.items()}


def test_chunked_prefill_gives_the_same_tokens(llama):
    model, tok = llama
    whole, whole_engine = run_engine(model, tok, mixed_requests(), max_batch_tokens=4096)
    chunked, chunked_engine = run_engine(model, tok, mixed_requests(), max_batch_tokens=3)
    assert tokens_of(chunked) == tokens_of(whole)
    # The 70-token prompt alone needs 24 passes at 3 tokens each: prefill really was chunked.
    assert chunked_engine.stats.steps > whole_engine.stats.steps + 20
    assert chunked_engine.stats.generated_tokens == whole_engine.stats.generated_tokens == 8 * 10
    # A prefill spread over many steps still counts once, at its first token.
    assert chunked_engine.stats.first_tokens == whole_engine.stats.first_tokens == 8


def test_mixed_length_batch_matches_each_prompt_alone(llama, greedy_streams):
    model, tok = llama
    together = tokens_of(run_engine(model, tok, mixed_requests(), max_batch_tokens=64)[0])
    for req in mixed_requests():
        alone = tokens_of(run_engine(model, tok, [req])[0])
        assert together[req.custom_id] == alone[req.custom_id], req.custom_id
        if req.custom_id.startswith("g"):
            assert alone[req.custom_id] == greedy_streams[int(req.custom_id[1:])][:10]


def test_tiny_kv_cache_runs_everything_one_or_two_at_a_time(llama):
    model, tok = llama
    # Prompts of 10..15 token ids + 6 new tokens reserve 15..20 KV slots each; 40 slots hold
    # at most two of them at once.
    requests = [request(f"r{i}", list(range(5 + i, 5 + i + n)), max_tokens=6, temperature=0, ignore_eos=True)
                for i, n in enumerate((10, 11, 15, 12, 14, 13, 10))]
    requests.insert(3, request("too-big", list(range(5, 45)), max_tokens=6, temperature=0))
    reference, _ = run_engine(model, tok, [r for r in requests if r.custom_id != "too-big"])

    engine = Engine(model, tok, kv_tokens=40, max_batch_tokens=8)
    concurrent = []
    reserve = engine.store.reserve

    def tracking_reserve(seq_id, tokens, prefix=None):
        reserve(seq_id, tokens, prefix=prefix)
        concurrent.append(engine.store.num_sequences)

    engine.store.reserve = tracking_reserve
    lines: list[dict] = []
    engine.run(requests, lines.append)

    by_id = {}
    for line in lines:
        assert line["custom_id"] not in by_id, f"duplicate answer for {line['custom_id']}"
        by_id[line["custom_id"]] = line
    assert set(by_id) == {r.custom_id for r in requests}
    assert "needs 45 KV tokens but the cache holds only 40" in by_id.pop("too-big")["error"]["message"]
    assert tokens_of(by_id) == tokens_of(reference)
    assert max(concurrent) == 2 and len(concurrent) == 7
    assert engine.store.num_sequences == 0 and engine.store.free_tokens == 40
    assert (engine.stats.requests_done, engine.stats.requests_failed) == (7, 1)


def test_max_seqs_limits_running_sequences(llama):
    model, tok = llama
    engine = Engine(model, tok, kv_tokens=4096, max_seqs=1)
    seen = []
    step = engine.step

    def tracking_step(running):
        seen.append(len(running))
        return step(running)

    engine.step = tracking_step
    lines: list[dict] = []
    engine.run(mixed_requests(max_tokens=3), lines.append)
    assert max(seen) == 1 and len(lines) == 8
    assert tokens_of({line["custom_id"]: line for line in lines}) == tokens_of(run_engine(model, tok, mixed_requests(3))[0])


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llama):
    model, tok = llama
    target = request("target", PROMPTS[2], max_tokens=12, seed=77, ignore_eos=True, **SAMPLED)
    first = tokens_of(run_engine(model, tok, [target])[0])["target"]
    again = tokens_of(run_engine(model, tok, [target])[0])["target"]
    assert first == again
    crowd = mixed_requests(max_tokens=7)
    for batch, budget in ((crowd[:3] + [target] + crowd[3:], 5), ([target] + crowd, 64), (crowd + [target], 11)):
        assert tokens_of(run_engine(model, tok, batch, max_batch_tokens=budget)[0])["target"] == first
    # Not greedy in disguise: another seed gives another continuation.
    other = request("other", PROMPTS[2], max_tokens=12, seed=78, ignore_eos=True, **SAMPLED)
    assert tokens_of(run_engine(model, tok, [other])[0])["other"] != first


def first_new_index(stream: list[int], at_least: int = 1) -> int:
    """The first index >= at_least whose token does not occur earlier in the stream."""
    return next(i for i in range(at_least, len(stream)) if stream[i] not in stream[:i])


def test_stop_token_ids_and_eos_finish_with_stop(llama, tiny_checkpoint, greedy_streams):
    model, tok = llama
    stream = greedy_streams[1]
    i = first_new_index(stream)
    lines, _ = run_engine(model, tok, [
        request("stop-id", PROMPTS[1], max_tokens=16, temperature=0, stop_token_ids=(stream[i],)),
        request("stop-id-ignore-eos", PROMPTS[1], max_tokens=16, temperature=0, ignore_eos=True,
                stop_token_ids=(stream[i],)),
    ])
    for cid in ("stop-id", "stop-id-ignore-eos"):
        assert ok(lines[cid])["token_ids"] == stream[:i + 1]
        assert lines[cid]["finish_reason"] == "stop"

    # Make the first greedy token an EOS of the tokenizer, as a checkpoint's eos_token_id would.
    eos_tok = Tokenizer(tiny_checkpoint(VARIANT), extra_eos_ids=(stream[0],))
    lines, _ = run_engine(model, eos_tok, [
        request("eos", PROMPTS[1], max_tokens=16, temperature=0),
        request("ignore", PROMPTS[1], max_tokens=16, temperature=0, ignore_eos=True),
    ])
    assert ok(lines["eos"])["token_ids"] == stream[:1]
    assert (lines["eos"]["finish_reason"], lines["eos"]["completion_tokens"]) == ("stop", 1)
    assert ok(lines["ignore"])["token_ids"] == stream
    assert lines["ignore"]["finish_reason"] == "length"


def test_max_tokens_finishes_with_length(llama, greedy_streams):
    model, tok = llama
    lines, _ = run_engine(model, tok, [request(f"m{n}", PROMPTS[3], max_tokens=n, temperature=0, ignore_eos=True)
                                       for n in (1, 2, 5)])
    for n in (1, 2, 5):
        line = ok(lines[f"m{n}"])
        assert (line["finish_reason"], line["completion_tokens"]) == ("length", n)
        assert line["token_ids"] == greedy_streams[3][:n]


def pick_stop(text: str, at_least: int) -> tuple[str, int]:
    """A two-character ASCII stop string whose first occurrence in ``text`` is at index >= at_least."""
    for k in range(at_least, len(text) - 1):
        candidate = text[k:k + 2]
        if candidate.isascii() and candidate.strip() and text.find(candidate) == k:
            return candidate, k
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_text_before_them(llama, greedy_streams):
    model, tok = llama
    for index in (0, 2, 3):
        stream = greedy_streams[index]
        text = tok.decode(stream)
        stop, k = pick_stop(text, 2)
        later, k_later = pick_stop(text, k + 2)
        lines, _ = run_engine(model, tok, [
            request("one", PROMPTS[index], max_tokens=16, temperature=0, ignore_eos=True, stop=(stop,)),
            request("two", PROMPTS[index], max_tokens=16, temperature=0, ignore_eos=True, stop=(later, stop)),
            request("late", PROMPTS[index], max_tokens=16, temperature=0, ignore_eos=True, stop=(later,)),
            request("never", PROMPTS[index], max_tokens=16, temperature=0, ignore_eos=True, stop=("\x00never",)),
        ])
        for cid, cut, hit in (("one", k, stop), ("two", k, stop), ("late", k_later, later)):
            line = ok(lines[cid])
            assert line["finish_reason"] == "stop"
            assert line["text"] == text[:cut]
            ids = line["token_ids"]
            assert ids == stream[:len(ids)]
            # Generation stopped at the token that completed the stop string, not later.
            assert hit in tok.decode(ids)
            assert hit not in tok.decode(ids[:-1])
            assert line["completion_tokens"] == len(ids)
        assert ok(lines["never"])["finish_reason"] == "length"
        assert lines["never"]["text"] == text


class _StubTokenizer:
    """Decodes by table, to put a stop string deep inside one long token."""

    eos_token_ids = frozenset({1})

    def __init__(self, pieces: dict[int, str]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_stop_string_inside_a_long_token_is_found():
    tok = _StubTokenizer({5: "def f():", 6: "\n" + " " * 40 + "return 1", 7: "x"})
    seq = Sequence(request("c", [3], max_tokens=10, stop=("\n",)), [3], seed=0)
    assert not seq.append(5, tok)
    assert seq.append(6, tok)
    assert seq.finish_reason == "stop"
    assert seq.completion(tok).text == "def f():"
    # A stop string completed across tokens, and one only completed several tokens later.
    seq = Sequence(request("c", [3], max_tokens=10, stop=("x\n", "xxx")), [3], seed=0)
    assert [seq.append(t, tok) for t in (5, 7, 7, 7)] == [False, False, False, True]
    assert seq.completion(tok).text == "def f():"


def test_output_record_fields(llama):
    model, tok = llama
    lines, _ = run_engine(model, tok, [request("rec", PROMPTS[2], max_tokens=5, temperature=0, ignore_eos=True)])
    line = lines["rec"]
    assert set(line) == {"custom_id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
    assert line["custom_id"] == "rec"
    assert line["prompt_tokens"] == len(tok.encode(PROMPTS[2]))
    assert line["completion_tokens"] == len(line["token_ids"]) == 5
    assert all(isinstance(t, int) for t in line["token_ids"])
    assert line["text"] == tok.decode(line["token_ids"])
    assert line["finish_reason"] == "length"


def test_openai_form_lines_and_errors_flow_through_the_engine(llama, greedy_streams):
    model, tok = llama
    items = [
        parse_line(1, b'{"custom_id": "c1", "url": "/v1/completions", "body": {"model": "m", "prompt": "Once", '
                      b'"max_tokens": 4, "temperature": 0, "ignore_eos": true}}'),
        parse_line(2, b'{"custom_id": "c2", "url": "/v1/chat/completions", "body": {"messages": '
                      b'[{"role": "user", "content": "hi"}], "max_completion_tokens": 3}}'),
        request("dup", "Once", line=3, max_tokens=2),
        request("dup", "Once", line=4, max_tokens=2),
    ]
    lines: list[dict] = []
    Engine(model, tok, kv_tokens=512, model_name="tiny").run(items, lines.append)
    by_id = {}
    for line in lines:
        by_id.setdefault(line["custom_id"], []).append(line)
    completion = by_id["c1"][0]["response"]
    assert completion["status_code"] == 200
    body = completion["body"]
    assert body["object"] == "text_completion" and body["model"] == "m"
    assert body["choices"][0]["text"] == tok.decode(greedy_streams[0][:4])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    chat = by_id["c2"][0]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["model"] == "tiny"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["prompt_tokens"] == len(tok.encode_chat([{"role": "user", "content": "hi"}]))
    # The duplicate's error line leaves custom_id null, so one line carries the id: the first one's answer.
    assert len(by_id["dup"]) == 1 and "error" not in by_id["dup"][0]
    errors = by_id[None]
    assert len(errors) == 1 and "duplicate custom_id 'dup'" in errors[0]["error"]["message"]


def _seq(pending_prompt: int, generated: int = 0) -> Sequence:
    seq = Sequence(request("p", list(range(pending_prompt + generated)), max_tokens=20),
                   list(range(pending_prompt + generated)), seed=0)
    seq.num_cached = generated  # "generated" tokens of history are cached; the rest pending
    return seq


def test_plan_step_puts_decodes_first_then_prefill_chunks():
    a, b, c, d = _seq(1, 5), _seq(10), _seq(1, 3), _seq(4)
    plan = plan_step([a, b, c, d], budget=5)
    assert [(s is x, n) for (s, n), x in zip(plan, (a, c, b))] == [(True, 1), (True, 1), (True, 3)]
    plan = plan_step([a, b, c, d], budget=40)
    assert [n for _, n in plan] == [1, 1, 10, 4]
    assert [n for _, n in plan_step([a, b, c, d], budget=1)] == [1]


def test_head_in_chunks_samples_what_the_whole_batch_samples(llama, monkeypatch):
    """The head makes and samples the logits a few rows at a time; chunks change nothing."""
    from glinthawk.compute import layers
    from glinthawk.compute.sampling import SamplingParams
    from glinthawk.compute.stages import head_and_sample

    model, _ = llama
    x = torch.randn(11, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(model.dtype)
    params = [SamplingParams(temperature=0), SamplingParams(**SAMPLED, logprobs=3)] * 5 \
        + [SamplingParams(temperature=1.2, logprobs=0)]
    seeds, steps = list(range(100, 111)), list(range(11))
    whole = head_and_sample(model, x, params, seeds, steps)
    assert layers.head_rows(model) >= 11  # the tiny model's head takes these rows in one chunk
    monkeypatch.setattr(layers, "HEAD_CHUNK_BYTES", 4 * 4 * model.config.vocab_size)
    assert layers.head_rows(model) == 4
    chunked = head_and_sample(model, x, params, seeds, steps)
    assert torch.equal(chunked.tokens, whole.tokens)
    assert len(chunked.logprobs) == 6  # the rows that asked, in their order
    assert torch.equal(chunked.logprobs.logprob, whole.logprobs.logprob)
    assert torch.equal(chunked.logprobs.top_ids, whole.logprobs.top_ids)


def record_matmuls(monkeypatch, model) -> list[tuple[int, bool, bool]]:
    """Every linear call from now on as (rows, is the LM head, inside warm_up)."""
    from glinthawk import engine
    from glinthawk.compute import matmul

    calls, warming = [], []
    real_multiply, real_warm_up = matmul._multiply, engine.warm_up

    def recording(x, weight, bias):
        calls.append((x.shape[0], weight is model.lm_head, bool(warming)))
        return real_multiply(x, weight, bias)

    def warm_up(*args):
        warming.append(True)
        try:
            real_warm_up(*args)
        finally:
            warming.pop()

    monkeypatch.setattr(matmul, "_multiply", recording)
    monkeypatch.setattr(engine, "warm_up", warm_up)
    return calls


def assert_warmed_before_use(calls: list[tuple[int, bool, bool]]) -> set[tuple[int, bool]]:
    """Each (rows, head) shape the steps used was run by warm_up first; returns the warmed shapes."""
    warmed = set()
    for rows, is_head, warming in calls:
        if warming:
            warmed.add((rows, is_head))
        else:
            assert (rows, is_head) in warmed, f"{rows} rows ({'head' if is_head else 'layer'}) not warmed first"
    return warmed


def test_lm_head_sees_only_warmed_chunks(tiny_model, monkeypatch):
    """With chunks of 16 rows and 20 sequences, the LM head sees at most 16 rows a call, each
    count warmed before its first use, and none above 16 (not up to max_seqs)."""
    from glinthawk.compute import layers, matmul

    model, tok = tiny_model(VARIANT, "bfloat16")
    monkeypatch.setattr(layers, "HEAD_CHUNK_BYTES", 16 * 4 * model.config.vocab_size)
    calls = record_matmuls(monkeypatch, model)
    engine = Engine(model, tok, kv_tokens=4096, max_batch_tokens=256, max_seqs=24)
    reqs = [request(f"r{i}", PROMPTS[i % len(PROMPTS)], max_tokens=3, temperature=0, ignore_eos=True)
            for i in range(20)]
    lines = []
    engine.run(reqs, lines.append)
    assert len(lines) == len(reqs) and all(ok(line) for line in lines)
    head_rows = [rows for rows, is_head, warming in calls if is_head and not warming]
    assert head_rows and max(head_rows) <= 16
    if matmul.pads_rows(model.lm_head):
        warmed = {rows for rows, is_head in assert_warmed_before_use(calls) if is_head}
        assert warmed == {matmul.padded_rows(n) for n in range(1, 17)}


def test_head_chunk_rows_follow_the_vocabulary():
    from types import SimpleNamespace

    from glinthawk.compute import layers

    for vocab, rows in ((32000, 256), (128256, 64), (50000, 128), (10**9, 1)):
        assert layers.head_rows(SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))) == rows
        assert rows * 4 * vocab <= layers.HEAD_CHUNK_BYTES or rows == 1


def test_invalid_engine_settings(llama):
    model, tok = llama
    with pytest.raises(ValueError):
        Engine(model, tok, kv_tokens=16, max_batch_tokens=0)
    with pytest.raises(ValueError):
        Engine(model, tok, kv_tokens=16, max_seqs=0)
    with pytest.raises(ValueError, match="at least one token"):
        Engine(model, tok, kv_tokens=0)


def test_padded_rows_buckets():
    from glinthawk.compute.layers import padded_rows

    buckets = sorted({padded_rows(n) for n in range(1, 4097)})
    for n in range(1, 4097):
        padded = padded_rows(n)
        assert n <= padded and padded_rows(padded) == padded
        if n > 64:
            assert padded - n < n / 4
    for low in (64, 128, 256, 512, 1024, 2048):  # four row counts per octave above 64
        assert len([b for b in buckets if low < b <= 2 * low]) == 4
    assert buckets[:8] == [8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_matmuls_see_only_bucketed_row_counts(tiny_model, monkeypatch, dtype):
    """oneDNN keeps memory for every row count it sees: continuous batching must show it only
    the buckets, each run once by warm_up before a step first needs it, so resident memory
    stays flat once the run has reached its largest batch."""
    import torch

    from glinthawk.compute import matmul

    model, tok = tiny_model(VARIANT, dtype)
    gate_up = model.layers[0].gate_up
    assert gate_up.is_mkldnn == matmul.packs(torch.empty(gate_up.shape, dtype=model.dtype))
    calls = record_matmuls(monkeypatch, model)
    engine = Engine(model, tok, kv_tokens=4096, max_batch_tokens=37, max_seqs=3)
    assert not calls  # nothing is warmed before the run shows its batch sizes
    reqs = [request(f"r{i}", p, max_tokens=3 + 2 * i, temperature=0, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    lines = []
    engine.run(reqs, lines.append)
    assert len(lines) == len(reqs) and all(ok(line) for line in lines)
    if not matmul.pads_rows(model.layers[0].gate_up):  # float32 without oneDNN: nothing to keep flat
        assert not any(warming for _, _, warming in calls)
        return
    warmed = {rows for rows, is_head in assert_warmed_before_use(calls) if not is_head}
    used = {rows for rows, is_head, warming in calls if not is_head and not warming}
    assert warmed <= {matmul.padded_rows(n) for n in range(1, 38)} and len(used) > 2
    assert max(warmed) == max(used)  # no bucket beyond the largest batch the run reached


def test_one_short_prompt_warms_only_its_own_buckets(tiny_model, monkeypatch):
    """A run of one short prompt (under 8 tokens) warms the 8-row bucket, not every bucket up to max_batch_tokens."""
    from glinthawk.compute import matmul

    model, tok = tiny_model(VARIANT, "bfloat16")
    calls = record_matmuls(monkeypatch, model)
    lines = []
    Engine(model, tok, kv_tokens=4096, max_batch_tokens=2048, max_seqs=256).run(
        [request("r", PROMPTS[0], max_tokens=4, temperature=0, ignore_eos=True)], lines.append)
    assert len(lines) == 1 and ok(lines[0])
    if matmul.pads_rows(model.layers[0].gate_up):
        assert assert_warmed_before_use(calls) == {(8, False), (8, True)}


def test_warm_all_warms_every_bucket_before_the_run(tiny_model, monkeypatch):
    """What the benchmarks call before their timed runs: every bucket at once, none during the run."""
    from glinthawk.compute import matmul

    model, tok = tiny_model(VARIANT, "bfloat16")
    calls = record_matmuls(monkeypatch, model)
    engine = Engine(model, tok, kv_tokens=4096, max_batch_tokens=37, max_seqs=3)
    engine.warm_all()
    if not matmul.pads_rows(model.layers[0].gate_up):
        pytest.skip("no oneDNN bf16 here: nothing to warm")
    assert {rows for rows, is_head, _ in calls if not is_head} == {matmul.padded_rows(n) for n in range(1, 38)}
    before = len(calls)
    lines = []
    engine.run([request("r", PROMPTS[3], max_tokens=3, temperature=0, ignore_eos=True)], lines.append)
    assert ok(lines[0]) and len(calls) > before and not any(warming for _, _, warming in calls[before:])


def test_warm_up_runs_new_buckets_largest_first(tiny_model, monkeypatch):
    """warm_up goes from the largest bucket down (the heap grows once) and skips those already warmed."""
    from glinthawk.compute import layers, matmul

    model, _ = tiny_model(VARIANT, "bfloat16")
    if not matmul.pads_rows(model.layers[0].gate_up):
        pytest.skip("no oneDNN bf16 here: warm_up has nothing to do")
    calls = record_matmuls(monkeypatch, model)
    layers.warm_up(model, 100, 20, warmed_rows=30, warmed_sampled_rows=8)
    layer_rows = [rows for rows, is_head, _ in calls if not is_head]
    assert layer_rows == [n for n in (112, 96, 80, 64, 56, 48, 40) for _ in range(4)]
    assert [rows for rows, is_head, _ in calls if is_head] == [24, 16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_on_a_packed_weight_is_f_linear(dtype):
    """Packed (oneDNN) and padded: the same product as F.linear on the plain weight; in bf16
    the same bits, as both are oneDNN's."""
    from glinthawk.compute import matmul

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 32, generator=generator).to(dtype), torch.randn(40, generator=generator).to(dtype)
    packed = matmul.pack(weight)
    assert packed.is_mkldnn == matmul.packs(weight) and packed.shape == weight.shape
    for rows in (1, 13, 64, 70):
        x = torch.randn(rows, 32, generator=generator).to(dtype)
        for b in (None, bias):
            expected = torch.nn.functional.linear(x, weight, b)
            got = matmul.linear(x, packed, b)
            if dtype == torch.bfloat16:
                assert torch.equal(got, expected)
            else:
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(matmul.linear(torch.empty(0, 32, dtype=dtype), packed), torch.empty(0, 40, dtype=dtype))