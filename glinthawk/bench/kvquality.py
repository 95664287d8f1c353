"""What an int8 KV cache costs in accuracy: logits and greedy tokens against the model's dtype.

Both runs go through the same compute functions as Tier 1 and Tier 2 (``forward``, ``head``,
``attend`` over a ``KVStore``): the prompt as one prefill chunk, then one decode step per
token. The quantized run is fed the reference run's tokens (teacher forcing), so every
step's logits compare like for like; greedy agreement is the number of steps before the
first step whose argmax differs, which is exactly how far a free-running greedy decode
over the int8 cache would match.
"""

from __future__ import annotations

import torch

from glinthawk.compute.attention import attend
from glinthawk.compute.kvcache import KVStore
from glinthawk.compute.layers import forward, head


def _logits(model, store: KVStore, token_ids: list[int], start: int) -> torch.Tensor:
    """Logits of tokens start.. (all written to the store), the last row first-class: [n, vocab] float32."""
    count = len(token_ids)

    def local(layer, q, k, v):
        return attend(store, layer, ["seq"], [start], [count], q, k, v)

    ids = torch.tensor(token_ids, dtype=torch.int64)
    x = forward(model, ids, torch.arange(start, start + count), local)
    return head(model, x[-1:]).float()[0]


@torch.inference_mode()
def compare(model, prompt: list[int], new_tokens: int, kv_dtype: torch.dtype = torch.int8) -> dict:
    """Greedy ``new_tokens`` after ``prompt``, K/V in the model's dtype and as ``kv_dtype``:
    {"agree": steps before the first differing argmax, "steps", "mean_abs_dlogit",
    "max_abs_dlogit", "mean_abs_logit"} (means over every step and vocabulary entry), and
    "flip_margin": at that first difference, how far the int8 run's pick trailed the
    reference's top logit in the reference (a near-tie flips on any rounding), else None."""
    cfg = model.config
    stores = [KVStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(prompt) + new_tokens, model.dtype,
                      kv_dtype=dtype) for dtype in (None, kv_dtype)]
    for store in stores:
        store.reserve("seq", len(prompt) + new_tokens)
    feed, start = list(prompt), 0
    agree, margin, diffs, magnitudes = None, None, [], []
    for step in range(new_tokens):
        reference, quantized = (_logits(model, store, feed, start) for store in stores)
        diffs.append((reference - quantized).abs())
        magnitudes.append(reference.abs().mean())
        token = int(reference.argmax())
        if agree is None and int(quantized.argmax()) != token:
            agree, margin = step, float(reference[token] - reference[int(quantized.argmax())])
        start += len(feed)
        feed = [token]
    every = torch.stack(diffs)
    return {"agree": new_tokens if agree is None else agree, "steps": new_tokens,
            "mean_abs_dlogit": float(every.mean()), "max_abs_dlogit": float(every.max()),
            "mean_abs_logit": float(torch.stack(magnitudes).mean()), "flip_margin": margin}
