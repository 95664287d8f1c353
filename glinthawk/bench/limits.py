"""limits: what this machine can do at best, the yardstick for every other suite.

- read bandwidth: ``torch.sum`` over a large float32 tensor (bytes read / best time);
- copy bandwidth: ``dst.copy_(src)``, counted as bytes read + bytes written;
- matmul peak per dtype: square matmuls of a few sizes, best of N, each both as
  ``torch.matmul`` and as the engine's own ``matmul.linear`` on a packed weight (on a
  non-Intel CPU, MKL's float32 matmul is 2-3x slower than oneDNN's); the peak is the best.

Other suites call ``calibrate`` to measure the same figures in their own run.
"""

from __future__ import annotations

import torch

from glinthawk.bench import knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import best_of, ratio
from glinthawk.compute import matmul

DEVICES = ("cpu", "cuda")  # where the suite can run its model (--device)
DEFAULTS, QUICK = knobs.LIMITS, knobs.LIMITS_QUICK
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_bandwidth(nbytes: int, repeats: int, device: str = "cpu") -> float:
    """Bytes per second that ``sum`` streams from memory."""
    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best, _ = best_of(lambda: data.sum(), repeats, device=device)
    return data.numel() * 4 / best


def copy_bandwidth(nbytes: int, repeats: int, device: str = "cpu") -> float:
    """Bytes per second moved by a copy (read + write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best, _ = best_of(lambda: dst.copy_(src), repeats, device=device)
    return 2 * src.numel() * 4 / best


def matmul_flops(size: int, dtype: torch.dtype, repeats: int, device: str = "cpu") -> float:
    """FLOP/s of a size^3 product: the better of torch.matmul and the engine's packed linear."""
    a = torch.randn(size, size).to(device, dtype)
    b = torch.randn(size, size).to(device, dtype)
    packed = matmul.pack(b)
    best = min(best_of(lambda: torch.matmul(a, b), repeats, device=device)[0],
               best_of(lambda: matmul.linear(a, packed), repeats, device=device)[0])
    return 2 * size**3 / best


def matmul_peak(dtype: torch.dtype, sizes: list[int], repeats: int, device: str = "cpu") -> float:
    return max(matmul_flops(size, dtype, repeats, device) for size in sizes)


def read_limit(ctx: BenchContext) -> float:
    """This machine's read bandwidth now, on ``ctx.device``, with the suite's knobs (read_mib, best of N)."""
    return read_bandwidth(ctx.knobs("limits", DEFAULTS, QUICK)["read_mib"] << 20, ctx.best_of, ctx.device)


def matmul_limit(ctx: BenchContext) -> float:
    """The matmul peak in ``ctx.dtype`` on ``ctx.device`` now, with the suite's knobs (matmul_sizes, best of N)."""
    return matmul_peak(DTYPES[ctx.dtype], ctx.knobs("limits", DEFAULTS, QUICK)["matmul_sizes"], ctx.best_of,
                       ctx.device)


def calibrate(ctx: BenchContext) -> dict[str, float]:
    """Read bandwidth and matmul peak (in ``ctx.dtype``), measured now, for a suite's roofline."""
    knobs = ctx.knobs("limits", DEFAULTS, QUICK)
    return {"read_bandwidth": read_limit(ctx), "matmul_peak": matmul_limit(ctx),
            "matmul_sizes": knobs["matmul_sizes"], "read_mib": knobs["read_mib"]}


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("limits", DEFAULTS, QUICK)
    repeats = ctx.best_of
    nbytes = knobs["read_mib"] << 20
    read = read_bandwidth(nbytes, repeats, ctx.device)
    copy = copy_bandwidth(nbytes, repeats, ctx.device)
    results = [
        {"kind": "bandwidth", "name": "read (sum)", "value": read, "unit": "B/s", "ratio_to_read": 1.0},
        {"kind": "bandwidth", "name": "copy (read+write)", "value": copy, "unit": "B/s",
         "ratio_to_read": ratio(copy, read)},
    ]
    matmul_rows = []
    for name in [d.strip() for d in knobs["dtypes"].split(",") if d.strip()]:
        for size in knobs["matmul_sizes"]:
            matmul_rows.append({"kind": "matmul", "name": f"matmul {name} {size}^3", "dtype": name, "size": size,
                                "value": matmul_flops(size, DTYPES[name], repeats, ctx.device), "unit": "FLOP/s"})
    peaks = {}
    for row in matmul_rows:
        peaks[row["dtype"]] = max(peaks.get(row["dtype"], 0.0), row["value"])
    baseline = peaks.get("float32") or next(iter(peaks.values()), None)
    for row in matmul_rows:
        row["ratio_to_float32_peak"] = ratio(row["value"], baseline)
        row["ratio_to_dtype_peak"] = ratio(row["value"], peaks[row["dtype"]])
    results += matmul_rows
    summary = {
        "read_bandwidth": read, "copy_bandwidth": copy, "copy_to_read": ratio(copy, read),
        **{f"matmul_peak_{name}": value for name, value in peaks.items()},
        **{f"matmul_peak_{name}_to_float32": ratio(value, baseline) for name, value in peaks.items()},
    }
    table_rows = [{"name": r["name"],
                   "value": r["value"] / 1e9,
                   "unit": "GB/s" if r["kind"] == "bandwidth" else "GFLOP/s",
                   "ratio": r.get("ratio_to_read", r.get("ratio_to_float32_peak"))} for r in results]
    return {
        "config": {**knobs, "repeats": repeats, "read_bytes": nbytes, "device": ctx.device},
        "baseline": {"bandwidth": "read (sum)", "matmul": "float32 peak"},
        "results": results,
        "summary": summary,
        "targets": {},
        "notes": ["copy bandwidth counts bytes read + bytes written",
                  "matmul peak = best of the sizes listed, each best of N runs"],
        "table": ([("name", "measurement"), ("value", "value"), ("unit", "unit"),
                   ("ratio", "ratio to baseline")], table_rows),
    }


def plot(result: dict, figure) -> None:
    left, right = figure.subplots(1, 2)
    bands = [r for r in result["results"] if r["kind"] == "bandwidth"]
    left.bar([r["name"] for r in bands], [r["value"] / 1e9 for r in bands], color=["tab:blue", "tab:orange"])
    left.set_ylabel("GB/s")
    left.set_title("memory bandwidth")
    mats = [r for r in result["results"] if r["kind"] == "matmul"]
    dtypes = sorted({r["dtype"] for r in mats})
    for dtype in dtypes:
        rows = [r for r in mats if r["dtype"] == dtype]
        right.plot([r["size"] for r in rows], [r["value"] / 1e9 for r in rows], marker="o", label=dtype)
    right.set_xscale("log", base=2)
    right.set_xlabel("square matmul size n")
    right.set_ylabel("GFLOP/s")
    right.set_title("matmul throughput")
    right.legend()
