"""The Tier 2 KV store (reservation accounting, compaction) and ragged batched attention."""

from __future__ import annotations

import pytest
import torch

from glinthawk.compute import attention, attention_kernels, thread_policy
from glinthawk.compute.attention import AttentionPlan, attend, attend_with
from glinthawk.compute.config import ModelConfig
from glinthawk.compute.kvcache import KVCapacityError, KVStore, UnknownSequenceError

LAYERS, KV_HEADS, DIM = 2, 2, 4


def store(capacity: int, dtype=torch.float32, kv_heads: int = KV_HEADS) -> KVStore:
    return KVStore(LAYERS, kv_heads, DIM, capacity, dtype=dtype)


def kv(n: int, seed: int, kv_heads: int = KV_HEADS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, kv_heads, DIM, generator=g), torch.randn(n, kv_heads, DIM, generator=g)


def put(s: KVStore, layer: int, seq_id, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v of tokens start.. of one sequence, the way attention does."""
    s.write(layer, s.rows([seq_id], [start], [k.shape[0]]), k, v)


def fill(s: KVStore, seq_id, n: int, seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Write n tokens of distinct data to every layer; returns what was written, by layer."""
    written = {}
    for layer in range(s.num_layers):
        k, v = kv(n, seed * 100 + layer)
        put(s, layer, seq_id, 0, k, v)
        written[layer] = (k, v)
    return written


def assert_holds(s: KVStore, seq_id, written) -> None:
    for layer, (k, v) in written.items():
        keys, values = s.view(layer, seq_id, k.shape[0])
        assert torch.equal(keys, k.transpose(0, 1))
        assert torch.equal(values, v.transpose(0, 1))


def test_accounting_in_tokens_and_bytes():
    s = store(32)
    # K and V, every layer, every KV head, float32.
    assert s.bytes_per_token == 2 * LAYERS * KV_HEADS * DIM * 4 == 128
    assert s.capacity_bytes == 32 * 128
    assert store(32, torch.bfloat16).bytes_per_token == 64
    cfg = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": KV_HEADS, "head_dim": DIM,
        "max_position_embeddings": 64,
    })
    assert cfg.kv_bytes_per_token(4) == s.bytes_per_token

    assert (s.free_tokens, s.used_tokens, s.num_sequences) == (32, 0, 0)
    s.reserve("a", 10)
    s.reserve("b", 5)
    assert (s.free_tokens, s.used_tokens, s.num_sequences) == (17, 15, 2)
    assert "a" in s and "zz" not in s
    assert s.reserved("a") == 10 and s.reserved("b") == 5


def test_free_returns_room_and_freed_room_is_reused():
    s = store(30)
    for name in "abc":
        s.reserve(name, 10)
    assert s.free_tokens == 0
    with pytest.raises(KVCapacityError):
        s.reserve("d", 1)
    written = fill(s, "c", 10, seed=3)
    s.free("b")
    assert (s.free_tokens, s.num_sequences) == (10, 2) and "b" not in s
    s.reserve("d", 10)  # fits exactly in b's old slot, no compaction needed
    assert s.compactions == 0 and s.free_tokens == 0
    assert_holds(s, "c", written)
    for name in "acd":
        s.free(name)
    assert (s.free_tokens, s.num_sequences) == (30, 0)
    s.reserve("all", 30)  # freed runs coalesced back into one
    assert s.compactions == 0


def test_fragmentation_compacts_and_data_survives():
    s = store(30)
    s.reserve("a", 4)
    s.reserve("b", 10)
    s.reserve("c", 10)  # 6 free at the end
    data_b = fill(s, "b", 10, seed=1)
    data_c = {}
    for layer in range(LAYERS):  # c only partly written, in two pieces
        k, v = kv(7, seed=50 + layer)
        put(s, layer, "c", 0, k[:3], v[:3])
        put(s, layer, "c", 3, k[3:], v[3:])
        data_c[layer] = (k, v)
    s.free("a")  # free: 4 at the front + 6 at the end = 10, largest run 6
    assert s.free_tokens == 10
    s.reserve("d", 8)  # needs compaction; b and c slide left over their own old rows
    assert s.compactions == 1
    assert (s.free_tokens, s.used_tokens) == (2, 28)
    assert_holds(s, "b", data_b)
    assert_holds(s, "c", data_c)
    data_d = fill(s, "d", 8, seed=4)
    assert_holds(s, "b", data_b)
    assert_holds(s, "c", data_c)
    # c can still grow up to its reservation after the move, without touching d.
    for layer in range(LAYERS):
        k, v = kv(3, seed=70 + layer)
        put(s, layer, "c", 7, k, v)
        full_k, full_v = data_c[layer]
        data_c[layer] = (torch.cat([full_k, k]), torch.cat([full_v, v]))
    assert_holds(s, "c", data_c)
    assert_holds(s, "d", data_d)
    assert_holds(s, "b", data_b)


def test_refusal_when_full_is_clear_and_changes_nothing():
    s = store(16)
    s.reserve("a", 10)
    with pytest.raises(KVCapacityError, match=r"KV store full: sequence 'b' needs 7 tokens, 6 of 16 are free"):
        s.reserve("b", 7)
    assert (s.free_tokens, s.num_sequences) == (6, 1) and "b" not in s
    s.reserve("b", 6)
    assert s.free_tokens == 0


def test_bad_reservations():
    s = store(16)
    s.reserve("a", 4)
    with pytest.raises(ValueError, match="already holds"):
        s.reserve("a", 2)
    with pytest.raises(ValueError, match="at least one token"):
        s.reserve("b", 0)
    with pytest.raises(ValueError, match="at least one token"):
        KVStore(1, 1, 2, 0)
    assert s.free_tokens == 12


def test_writing_past_the_reservation_is_refused():
    s = store(32)
    s.reserve("a", 5)
    s.reserve("b", 5)
    data_b = fill(s, "b", 5, seed=2)
    k, v = kv(2, seed=9)
    with pytest.raises(KVCapacityError, match=r"tokens 4\.\.6 exceed its reservation of 5"):
        put(s, 0, "a", 4, k, v)
    with pytest.raises(KVCapacityError):
        put(s, 0, "a", -1, k, v)
    with pytest.raises(KVCapacityError, match="'a'"):  # in a batch with a sequence that fits
        s.rows(["b", "a"], [0, 4], [1, 2])
    assert_holds(s, "b", data_b)  # the neighbour was not overwritten
    put(s, 0, "a", 3, k, v)  # the last two slots are fine
    with pytest.raises(ValueError, match="only 5 written"):
        s.view(0, "a", 6)


def test_rows_pack_a_ragged_batch():
    s = store(32)
    s.reserve("a", 6)
    s.reserve("b", 6)
    base_a, base_b = s.start_of("a"), s.start_of("b")
    rows = s.rows(["b", "a"], [2, 0], [1, 3])
    assert rows.tolist() == [base_b + 2, base_a, base_a + 1, base_a + 2]


def test_unknown_sequence():
    s = store(8)
    k, v = kv(1, seed=0)
    for call in (lambda: s.free("ghost"), lambda: put(s, 0, "ghost", 0, k, v),
                 lambda: s.view(0, "ghost", 1), lambda: s.reserved("ghost")):
        with pytest.raises(UnknownSequenceError, match="'ghost' holds no KV reservation"):
            call()
    s.reserve("a", 2)
    s.free("a")
    with pytest.raises(UnknownSequenceError):
        s.free("a")  # not twice


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """Naive attention: q [n, heads, D] at positions start.., keys/values [start+n, kv_heads, D]."""
    n, heads, dim = q.shape
    group = heads // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)  # [L, heads, D], as transformers' repeat_kv
    v = values.repeat_interleave(group, dim=1)
    out = torch.empty_like(q)
    for i in range(n):
        visible = start + i + 1  # causal: a query sees itself and everything before
        for h in range(heads):
            scores = (k[:visible, h] @ q[i, h]) / dim**0.5
            out[i, h] = torch.softmax(scores, dim=0) @ v[:visible, h]
    return out


@pytest.mark.parametrize("dim", [4, 48, 64, 96, 128])  # 64 and 128 have their own compiled variants
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2), (6, 2)])
def test_ragged_attention_matches_naive_reference(heads, kv_heads, dim, attention_path):
    s = KVStore(LAYERS, kv_heads, dim, 256)
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    # Each sequence: tokens already cached, tokens in this batch (decode 1, prefill chunk > 1).
    # dec_long spans several of the kernel's token blocks.
    # The fresh prompts up to BATCHED_PREFILL_MAX_TOKENS are attended as one padded batch.
    plan = {"dec_a": (7, 1), "chunk": (5, 4), "fresh": (0, 6), "dec_b": (12, 1), "first": (0, 1), "dec_c": (3, 1),
            "fresh_b": (0, 3), "dec_long": (70, 1), "fresh_long": (0, attention.BATCHED_PREFILL_MAX_TOKENS + 1)}
    full = {}  # every token's q, k, v for each sequence, per layer
    for name, (past, new) in plan.items():
        s.reserve(name, past + new + 2)
        full[name] = [(torch.randn(past + new, heads, dim, generator=g),
                       torch.randn(past + new, kv_heads, dim, generator=g),
                       torch.randn(past + new, kv_heads, dim, generator=g)) for _ in range(LAYERS)]
    # Build each past through attend itself, in uneven chunks.
    for name, (past, _) in plan.items():
        done = 0
        while done < past:
            count = min(3, past - done)
            for layer in range(LAYERS):
                q, k, v = (t[done:done + count] for t in full[name][layer])
                attend(s, layer, [name], [done], [count], q, k, v)
            done += count
    names = list(plan)
    starts = [plan[n][0] for n in names]
    counts = [plan[n][1] for n in names]
    step = AttentionPlan.of(s, names, starts, counts)  # planned once, as the engine does, for every layer
    assert step.batched_prefills.sequences == 2 and [names[i] for i in step.prefills] == ["chunk", "fresh_long"]
    for layer in range(LAYERS):
        q, k, v = (torch.cat([full[n][layer][i][plan[n][0]:] for n in names]) for i in range(3))
        out = attend_with(step, layer, q, k, v)
        assert out.shape == q.shape
        offset = 0
        for name, start, count in zip(names, starts, counts):
            fq, fk, fv = full[name][layer]
            expected = reference_attention(fq[start:], fk, fv, start)
            torch.testing.assert_close(out[offset:offset + count], expected, atol=1e-5, rtol=1e-5)
            offset += count


@pytest.mark.parametrize("dim", [4, 48, 64, 96, 128])
def test_bfloat16_decode_matches_float32_reference(dim, attention_path):
    """A bf16 store: each output within bf16 rounding of fp32 attention over the same (rounded) K/V."""
    heads, kv_heads, lengths = 6, 2, [1, 33, 90]
    s = KVStore(1, kv_heads, dim, 256, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(dim)
    names = [f"seq{i}" for i in range(len(lengths))]
    full = {}
    for name, length in zip(names, lengths):
        s.reserve(name, length)
        full[name] = [torch.randn(length, h, dim, generator=g).bfloat16() for h in (heads, kv_heads, kv_heads)]
        if length > 1:
            attend(s, 0, [name], [0], [length - 1], *(t[:-1] for t in full[name]))
    q, k, v = (torch.cat([full[n][i][-1:] for n in names]) for i in range(3))
    out = attend(s, 0, names, [n - 1 for n in lengths], [1] * len(lengths), q, k, v)
    assert out.dtype == torch.bfloat16
    for row, name in enumerate(names):
        fq, fk, fv = (t.float() for t in full[name])
        expected = reference_attention(fq[-1:], fk, fv, fq.shape[0] - 1)
        torch.testing.assert_close(out[row:row + 1].float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_append_and_attend_in_the_callers_dtype(dtype, attention_path):
    """All-decode batches (the fused path appends K/V itself): several steps in a row, each
    output in the store's dtype and the store holding every token."""
    heads, kv_heads, dim, steps = 6, 2, 64, 3
    prompts = [1, 5, 40]
    s = KVStore(1, kv_heads, dim, 128, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    names = [f"seq{i}" for i in range(len(prompts))]
    full = {}
    for name, prompt in zip(names, prompts):
        s.reserve(name, prompt + steps)
        full[name] = [torch.randn(prompt + steps, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]
        attend(s, 0, [name], [0], [prompt], *(t[:prompt] for t in full[name]))
    for step in range(steps):
        starts = [prompt + step for prompt in prompts]
        q, k, v = (torch.cat([full[n][i][start:start + 1] for n, start in zip(names, starts)]) for i in range(3))
        out = attend(s, 0, names, starts, [1] * len(names), q, k, v)
        assert out.dtype == dtype
        for row, (name, start) in enumerate(zip(names, starts)):
            fq, fk, fv = (t[:start + 1].float() for t in full[name])
            keys, values = s.view(0, name, start + 1)
            assert torch.equal(keys.transpose(0, 1).float(), fk) and torch.equal(values.transpose(0, 1).float(), fv)
            expected = reference_attention(fq[start:], fk, fv, start)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[row:row + 1].float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths, decode_first", [
    ([16, 2, 64, 9, 33], False),  # ragged: gathered into a padded batch
    ([16, 16, 16, 16], True),  # one length, one run of rows after the decode: attended in place
    ([8, 8, 8], False),  # one length, one run from row 0
])
def test_short_fresh_prompts_batched_match_the_reference(dtype, lengths, decode_first):
    """Many short prompts in one batch (the padded-batch path) next to a decode: each prompt
    attends only to its own tokens, causally, never to padding."""
    heads, kv_heads, dim = 12, 4, 64
    s = KVStore(1, kv_heads, dim, 256, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    names = [f"p{i}" for i in range(len(lengths))]
    for name, length in zip(names, lengths):
        s.reserve(name, length)
    s.reserve("dec", 6)
    past = [torch.randn(5, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]
    attend(s, 0, ["dec"], [0], [5], *past)
    fresh = [[torch.randn(n, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)] for n in lengths]
    new = [torch.randn(1, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]
    parts = [new] + fresh if decode_first else fresh + [new]
    q, k, v = (torch.cat([part[i] for part in parts]) for i in range(3))
    if decode_first:
        step = AttentionPlan.of(s, ["dec"] + names, [5] + [0] * len(lengths), [1] + lengths)
    else:
        step = AttentionPlan.of(s, names + ["dec"], [0] * len(lengths) + [5], lengths + [1])
    assert step.batched_prefills.sequences == len(lengths) and step.prefills == []
    assert (step.batched_prefills.run is None) == (len(set(lengths)) > 1)
    out = attend_with(step, 0, q, k, v)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    decode_row = 0 if decode_first else len(q) - 1
    offset = 1 if decode_first else 0
    for (fq, fk, fv), n in zip(fresh, lengths):
        expected = reference_attention(fq.float(), fk.float(), fv.float(), 0)
        torch.testing.assert_close(out[offset:offset + n].float(), expected, atol=tolerance, rtol=tolerance)
        offset += n
    keys = torch.cat([past[1], new[1]]).float()
    values = torch.cat([past[2], new[2]]).float()
    torch.testing.assert_close(out[decode_row:decode_row + 1].float(),
                               reference_attention(new[0].float(), keys, values, 5), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 12, 4), (32, 4, 4), (96, 6, 2), (128, 8, 1), (256, 2, 1)])
def test_bfloat16_prefill_chunks_match_float32_reference(dim, heads, kv_heads, attention_path, monkeypatch):
    """Prompts in chunks over a bf16 store (the C prefill kernel where the CPU has AVX512_BF16,
    else SDPA): chunks of every size around the kernel's blocks, the first and later ones."""
    monkeypatch.setattr(thread_policy, "PREFILL_PARALLEL_MIN_WORK", 0)  # split every chunk over the threads
    kernel_calls = []
    real = attention_kernels.prefill_fused
    monkeypatch.setattr(attention_kernels, "prefill_fused", lambda *args: kernel_calls.append(1) or real(*args))
    s = KVStore(1, kv_heads, dim, 512, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(dim + heads)
    chunks = {"one": [1, 1, 2], "short": [3, 17], "blocks": [16, 33, 64, 5], "long": [130]}
    for name, sizes in chunks.items():
        total = sum(sizes)
        s.reserve(name, total)
        q, k, v = (torch.randn(total, h, dim, generator=g).bfloat16() for h in (heads, kv_heads, kv_heads))
        start = 0
        for size in sizes:
            rows = slice(start, start + size)
            out = attend(s, 0, [name], [start], [size], q[rows], k[rows], v[rows])
            assert out.dtype == torch.bfloat16
            expected = reference_attention(q[rows].float(), k[:start + size].float(), v[:start + size].float(), start)
            torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
            start += size
    kernel_expected = attention_path == "fused" and attention_kernels._attention.prefill_supported()
    assert bool(kernel_calls) == kernel_expected


@pytest.mark.parametrize("openmp", [True, False])
def test_kernel_slices_on_openmp_or_our_threads_match_one_thread(openmp, monkeypatch):
    """The C kernels' slices run as one region on torch's OpenMP threads, or one call each on
    our threads: the same result as one slice, for decode and prefill."""
    if attention_kernels._attention is None:
        pytest.skip("the C kernels are not built (no C compiler at install time)")
    if openmp and not thread_policy.OPENMP:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp here")
    monkeypatch.setattr(thread_policy, "OPENMP", openmp)
    monkeypatch.setattr(thread_policy, "FUSED_PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(thread_policy, "PREFILL_PARALLEL_MIN_WORK", 0)
    prompt, batch = 150, 6

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        s = KVStore(1, 2, 64, batch * (prompt + 1), dtype=torch.bfloat16)
        for i in range(batch):
            s.reserve(i, prompt + 1)
        q, k = (torch.randn(batch * prompt, h, 64, generator=torch.Generator().manual_seed(h)).bfloat16() for h in (6, 2))
        prefill = attend(s, 0, list(range(batch)), [0] * batch, [prompt] * batch, q, k, k)
        q1, k1 = (torch.randn(batch, h, 64, generator=torch.Generator().manual_seed(10 + h)).bfloat16() for h in (6, 2))
        return prefill, attend(s, 0, list(range(batch)), [prompt] * batch, [1] * batch, q1, k1, k1)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run()
        torch.set_num_threads(3)
        parallel = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])


def test_torch_openmp_is_found_where_torch_loaded_libgomp():
    """The kernels take torch's OpenMP threads wherever torch uses GNU libgomp (a silent
    fallback to our own threads would cost decode attention a third)."""
    if attention_kernels._attention is None:
        pytest.skip("the C kernels are not built (no C compiler at install time)")
    try:
        with open("/proc/self/maps") as maps:
            loaded = any("libgomp" in line for line in maps)
    except OSError:
        pytest.skip("no /proc/self/maps")
    assert thread_policy.OPENMP == loaded


def test_c_kernels_are_built_where_a_compiler_is():
    """pip install builds the C kernels when it can; a silent fallback would hide a broken build."""
    import shutil
    import sysconfig

    from glinthawk.compute import elementwise, sampling

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine: torch's ops are the expected path")
    assert attention_kernels._attention is not None, "glinthawk/compute/_attention.c was not built"
    assert elementwise._elementwise is not None, "glinthawk/compute/_elementwise.c was not built"
    assert sampling._sampling is not None, "glinthawk/compute/_sampling.c was not built"


def test_attend_rejects_mismatched_rows():
    s = store(8)
    s.reserve("a", 4)
    q, k, v = torch.randn(3, 4, DIM), torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    with pytest.raises(ValueError, match="3 query rows for 2 tokens"):
        attend(s, 0, ["a"], [0], [2], q, k, v)
    with pytest.raises(ValueError, match="only 0 written"):  # the bad frame recorded no tokens as written
        s.view(0, "a", 1)
    plan = AttentionPlan.of(s, ["a"], [0], [2])
    with pytest.raises(ValueError, match="3 query rows for 2 tokens"):
        attend_with(plan, 0, q, k, v)


@pytest.mark.parametrize("shapes, message", [
    (((1, 4, 2 * DIM), (1, KV_HEADS, DIM), (1, KV_HEADS, DIM)), "q must be"),  # would write past the store
    (((1, 4, DIM), (1, KV_HEADS, DIM // 2), (1, KV_HEADS, DIM)), "k and v must be"),  # would be read past its end
    (((1, 4, DIM), (1, KV_HEADS, DIM), (1, KV_HEADS + 1, DIM)), "k and v must be"),
    (((1, 3, DIM), (1, KV_HEADS, DIM), (1, KV_HEADS, DIM)), "a multiple of"),
    (((1, 4 * DIM), (1, KV_HEADS, DIM), (1, KV_HEADS, DIM)), "3-D"),
])
def test_attend_rejects_tensors_that_do_not_fit_the_store(attention_path, shapes, message):
    """The kernels trust their shapes: q, k, v of another head size or head count than the
    store's are refused before anything is written or read."""
    s = store(8)
    s.reserve("a", 4)
    q, k, v = (torch.randn(*shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        attend(s, 0, ["a"], [0], [1], q, k, v)
    with pytest.raises(ValueError, match="only 0 written"):
        s.view(0, "a", 1)


def test_attend_rejects_a_query_of_another_dtype_than_the_store():
    """The bf16 kernels would read a float32 query as bf16 bits: refused instead."""
    s = KVStore(1, KV_HEADS, 64, 16, dtype=torch.bfloat16)
    s.reserve("a", 8)
    q, k, v = torch.randn(8, 4, 64), torch.randn(8, KV_HEADS, 64).bfloat16(), torch.randn(8, KV_HEADS, 64).bfloat16()
    with pytest.raises(ValueError, match="q must be a 3-D torch.bfloat16 tensor"):
        attend(s, 0, ["a"], [0], [8], q, k, v)


def test_a_plan_made_before_a_compaction_is_replanned_not_used(attention_path):
    """A plan points at buffer rows; after the store compacts it must be made again."""
    s = store(24)
    s.reserve("gone", 8)
    s.reserve("a", 8)
    prompt, decode = kv(5, seed=1), kv(1, seed=2)
    q_prompt, q_decode = torch.randn(5, 4, DIM), torch.randn(1, 4, DIM)
    plan = AttentionPlan.of(s, ["a"], [0], [5])
    attend_with(plan, 0, q_prompt, *prompt)
    s.free("gone")
    s.reserve("b", 10)  # free runs of 8 and 8: compacts, and "a" moves to the front
    assert s.compactions == 1 and s.start_of("a") == 0 and plan.stale
    with pytest.raises(ValueError, match="compacted"):
        attend_with(plan, 1, q_prompt, *prompt)
    again = plan.replanned()
    assert not again.stale
    out = attend_with(again, 1, q_prompt, *prompt)  # layer 1 of the same step, at the rows "a" holds now
    decode_plan = AttentionPlan.of(s, ["a"], [5], [1])
    decoded = [attend_with(decode_plan, layer, q_decode, *decode) for layer in range(LAYERS)]

    fresh = store(8)
    fresh.reserve("a", 8)
    assert torch.allclose(out, attend(fresh, 1, ["a"], [0], [5], q_prompt, *prompt), atol=1e-5)
    attend(fresh, 0, ["a"], [0], [5], q_prompt, *prompt)
    for layer in range(LAYERS):
        expected = attend(fresh, layer, ["a"], [5], [1], q_decode, *decode)
        assert torch.allclose(decoded[layer], expected, atol=1e-5)


def test_long_decodes_on_several_threads_match_one_thread(attention_path, monkeypatch):
    """Long decodes are spread over threads; results must not change, in or out of inference mode."""
    monkeypatch.setattr(thread_policy, "FUSED_PARALLEL_MIN_WORK", 0)
    torch.manual_seed(0)
    length, batch = attention.BATCHED_DECODE_MAX_CONTEXT + 8, 5
    store = KVStore(1, 2, 8, batch * (length + 1))
    for i in range(batch):
        store.reserve(i, length + 1)
    k = torch.randn(batch * length, 2, 8)
    attend(store, 0, list(range(batch)), [0] * batch, [length] * batch, torch.randn(batch * length, 4, 8), k, k)
    q, kv = torch.randn(batch, 4, 8), torch.randn(batch, 2, 8)
    args = (store, 0, list(range(batch)), [length] * batch, [1] * batch, q, kv, kv)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = attend(*args)
        torch.set_num_threads(3)
        parallel = attend(*args)
        with torch.inference_mode():
            parallel_inference = attend(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel) and torch.equal(serial, parallel_inference)
