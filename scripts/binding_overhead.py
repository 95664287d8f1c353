"""What the C kernels' checked bindings (glinthawk/compute/cbind.py) add to each call.

    python scripts/binding_overhead.py

Each ``cbind`` entry runs with its C function swapped for a no-op, against the same no-op
called with ``data_ptr()``s and the same output allocations, as the wrappers did before the
bindings checked anything. Sizes: a bench-like Llama geometry (32 heads, 8 KV heads,
head_dim 128, 32 sequences, 32,000-token vocabulary). Prints microseconds per call (best of
9 repeats); the table in docs/PERFORMANCE.md comes from here.
"""

from __future__ import annotations

import timeit
import types

import torch

from glinthawk.compute import cbind, thread_policy

B, H, KV, D, CAP, VOCAB, N = 32, 32, 8, 128, 4096, 32000, 64
f32, i32, i64 = torch.float32, torch.int32, torch.int64


def noop(*args) -> None:
    pass


def cases() -> dict:
    real = cbind._attention
    q, new = torch.randn(B, H, D), torch.randn(B, KV, D)
    keys, values = torch.empty(KV, CAP, D), torch.empty(KV, CAP, D)
    bases, lengths, slices = torch.zeros(B, dtype=i64), torch.ones(B, dtype=i64), torch.tensor([[0, B * KV]])
    rows = cbind.DecodeRows(bases, lengths, slices)
    x, w = torch.randn(B, 4096), torch.ones(4096)
    qkv = torch.randn(B, (H + 2 * KV) * D)
    xr, cos, sin = qkv[:, :H * D].view(B, H, D), torch.randn(B, D), torch.randn(B, D)
    logits, index, masks = torch.randn(B, VOCAB), torch.arange(B), torch.zeros(B, VOCAB // 32, dtype=i32)
    column, top_k, draws, tokens = torch.ones(B), torch.zeros(B, dtype=i64), torch.rand(B, dtype=torch.float64), \
        torch.empty(B, dtype=i64)
    qp = torch.randn(N, H, D).bfloat16()
    kp, vp = torch.randn(KV, CAP, D).bfloat16()[:, :N], torch.randn(KV, CAP, D).bfloat16()[:, :N]
    kw, vw = real.packed_kv_words(N, D)

    def raw_decode() -> None:
        out = torch.empty_like(q)
        thread_policy.run_slices(lambda first, n: noop(
            q.data_ptr(), out.data_ptr(), new.data_ptr(), new.data_ptr(), keys.data_ptr(), values.data_ptr(), 0, 0,
            bases.data_ptr(), lengths.data_ptr(), slices.data_ptr(), n, H, KV, D, keys.stride(0), 0, 0, 0, 0.1, 2), 1)

    def raw_prefill() -> None:
        real.packed_kv_words(N, D)
        pk, pv = torch.empty(KV, kw, dtype=i32), torch.empty(KV, vw, dtype=i32)
        noop(kp.data_ptr(), vp.data_ptr(), 0, 0, pk.data_ptr(), pv.data_ptr(), N, KV, D, kp.stride(0), 0)
        out = torch.empty_like(qp)
        thread_policy.run_slices(lambda first, n: noop(qp.data_ptr(), out.data_ptr(), pk.data_ptr(), pv.data_ptr(), 0,
                                                       N, H, KV, D, 0.1, slices.data_ptr(), n), 1)

    return {
        "rms_norm": (lambda: cbind.rms_norm(x, w, 1e-5),
                     lambda: noop(x.data_ptr(), w.data_ptr(), torch.empty_like(x).data_ptr(), B, 4096, 1e-5, 0)),
        "rotary": (lambda: cbind.rotary(xr, cos, sin),
                   lambda: noop(xr.data_ptr(), cos.data_ptr(), sin.data_ptr(), torch.empty(B, H, D).data_ptr(), B, H,
                                D, xr.stride(0), 0)),
        "argmax": (lambda: cbind.argmax(logits),
                   lambda: noop(logits.data_ptr(), torch.empty(B, dtype=i64).data_ptr(), B, VOCAB, 0)),
        "mask_logits": (lambda: cbind.mask_logits(logits, index, masks),
                        lambda: noop(logits.data_ptr(), index.data_ptr(), B, VOCAB, masks.data_ptr(), VOCAB // 32, 0)),
        "sample": (lambda: cbind.sample(logits, index, column, top_k, column, column, draws, tokens, 1),
                   lambda: noop(logits.data_ptr(), index.data_ptr(), B, VOCAB, 0, column.data_ptr(), top_k.data_ptr(),
                                column.data_ptr(), column.data_ptr(), draws.data_ptr(), tokens.data_ptr(), 1)),
        "decode_attention (appending)": (
            lambda: cbind.decode_attention(q, (new, new), keys, values, None, rows, 0.1, 2), raw_decode),
        "DecodeRows (once per step)": (lambda: cbind.DecodeRows(bases, lengths, slices), lambda: None),
        "pack_kv + prefill_attention": (
            lambda: cbind.prefill_attention(qp, cbind.pack_kv(kp, vp, None), 0, 0.1, slices), raw_prefill),
    }


def main() -> None:
    table = cases()  # built with the real kernels (packed_kv_words), then run with no-ops
    cbind._elementwise = types.SimpleNamespace(rms_norm=noop, rotary=noop, argmax=noop, mask_logits=noop)
    cbind._sampling = types.SimpleNamespace(sample=noop)
    cbind._attention = types.SimpleNamespace(decode_attention=noop, pack_kv=noop, prefill_attention=noop,
                                             packed_kv_words=cbind._attention.packed_kv_words)
    thread_policy.OPENMP = True  # one call for all slices, as on torch's OpenMP threads

    def best(fn) -> float:
        return min(timeit.repeat(fn, number=20000, repeat=9)) / 20000 * 1e6

    print("| entry | checked µs | unchecked µs | overhead µs |\n|---|---|---|---|")
    for name, (checked, raw) in table.items():
        a, b = best(checked), best(raw)
        print(f"| {name} | {a:.2f} | {b:.2f} | {a - b:.2f} |")


if __name__ == "__main__":
    main()
