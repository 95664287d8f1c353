"""The kernels suite's float32 matmul point: one layer's four projections with their weights
cold in memory, as a decode step meets them, on ``_matmul`` against oneDNN in the same run
(docs/PERFORMANCE.md, "float32 matmuls on AVX-512F")."""

from __future__ import annotations

import torch

from glinthawk.bench.measure import best_of, ratio
from glinthawk.compute import matmul

KERNEL = "float32 matmul (cold weights)"


def available() -> bool:
    """Whether both sides run here: ``_matmul`` (``matmul.PANELS``) and oneDNN."""
    return matmul.PANELS and torch.backends.mkldnn.is_available()


def cold_matmul_point(model, rows: int, cycle_bytes: int, repeats: int) -> dict:
    """Layer 0's q/k/v, o, gate/up and down projections in float32 at ``rows`` rows, each
    weight copied until the copies span ``cycle_bytes`` and run in turn, so that each call
    reads its weight from memory; the two backends alternate, best of ``repeats`` each."""
    layer = model.layers[0]
    plain = [matmul.unpack(w).float() for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    copies = max(2, cycle_bytes // sum(w.numel() * 4 for w in plain))
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in plain}
    packers = {"ours": matmul.panel_weight,
               "onednn": torch.ops.mkldnn._reorder_linear_weight}
    weights = {name: [pack(w.clone()) for _ in range(copies) for w in plain] for name, pack in packers.items()}
    best = {name: float("inf") for name in weights}
    for _ in range(2):  # alternated, so that a drift of the host's speed falls on both
        for name, packed in weights.items():
            seconds, _ = best_of(lambda packed=packed: [matmul.linear(inputs[w.shape[1]], w) for w in packed], repeats)
            best[name] = min(best[name], seconds)
    flops = 2 * rows * copies * sum(w.numel() for w in plain)
    return {"kernel": KERNEL, "rows": rows, "copies": copies, "seconds": best["ours"],
            "onednn_seconds": best["onednn"], "flops_per_s": flops / best["ours"],
            "onednn_flops_per_s": flops / best["onednn"], "speed_ratio_to_onednn": ratio(best["onednn"], best["ours"])}
