"""What every benchmark suite shares: machine facts, timing, the benchmark checkpoint,
workloads and the runners that drive glinthawk on them, and JSON/PNG/table output.

Conventions:
- A suite module has ``DEFAULTS`` and ``QUICK`` (its knobs, full and ``--quick`` sizes,
  written in the torch-free ``knobs`` so that ``--help`` can list them), ``run(ctx) -> dict``
  and ``plot(result, figure)``. ``run`` returns
  ``{"config", "results", "summary", "targets", "notes", "table"}``; ``run_suite`` adds
  the machine facts, versions and timings, writes ``SUITE.json`` and ``SUITE.png`` and
  prints the table.
- Every speed figure comes with a ratio to a baseline measured in the same run.
- Generated-token throughput (tok/s) counts sampled tokens only; prompts are token-id lists,
  decoding is greedy with ``ignore_eos`` so every request produces exactly ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import importlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from glinthawk.cluster import stop_process
from glinthawk.compute.loader import cpu_info
from glinthawk.settings import StepSettings
from glinthawk.threads import THREAD_VARIABLES

SCHEMA_VERSION = 1


# -- the benchmark model ----------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A random Llama built with transformers (fixed seed) and cached on disk."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 16384
    seed: int = 0

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        per_layer = (self.hidden * (self.heads + 2 * self.kv_heads) * head_dim + self.heads * head_dim * self.hidden
                     + 3 * self.hidden * self.intermediate + 2 * self.hidden)
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


BENCH_MODEL = ModelSpec("llama-125m", hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000)
QUICK_MODEL = ModelSpec("llama-tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                        max_positions=4096)
BOS_ID, EOS_ID, FIRST_PLAIN_ID = 1, 2, 3


def cache_root() -> Path:
    return Path(os.environ.get("GLINTHAWK_BENCH_CACHE") or Path.home() / ".cache" / "glinthawk-bench")


def bench_checkpoint(spec: ModelSpec, root: Path | None = None) -> Path:
    """The checkpoint directory for ``spec``: built on first use, then reused.

    Built in a temporary directory next to the final one and renamed into place, so a
    concurrent or interrupted build never leaves a half-written checkpoint behind.
    """
    root = Path(root or cache_root())
    directory = root / spec.name
    marker = directory / "bench-spec.json"
    wanted = asdict(spec)
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted:
                return directory
        except (OSError, json.JSONDecodeError):
            pass
    try:
        import transformers
    except ImportError:
        raise click.ClickException(
            "the benchmark checkpoint is generated with transformers: pip install 'glinthawk[bench]' "
            "(or pass --model DIR)"
        ) from None
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        config = transformers.LlamaConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_positions, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            pad_token_id=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
        )
        torch.manual_seed(spec.seed)
        transformers.LlamaForCausalLM(config).eval().save_pretrained(staging)
        write_tokenizer(staging, spec.vocab)
        (staging / "bench-spec.json").write_text(json.dumps(wanted, indent=1))
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        try:
            staging.rename(directory)
        except OSError:  # another process won the race; its copy is as good as ours
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer covering every id: ``<unk> <s> </s> t3 t4 ...``.

    Prompts are given as token ids, so it only has to decode what the model generates.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    table = {"<unk>": 0, "<s>": BOS_ID, "</s>": EOS_ID}
    table.update({f"t{i}": i for i in range(FIRST_PLAIN_ID, vocab)})
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
    }))


# -- run context ------------------------------------------------------------------------
@dataclass
class BenchContext:
    """Options of one ``glinthawk bench`` invocation, shared by the suites it runs."""

    out_dir: Path
    quick: bool = False
    dtype: str = "float32"
    device: str = "cpu"  # where the model runs: "cpu" or "cuda" (suites that support it)
    repeats: int | None = None
    model_dir: Path | None = None  # None: the generated benchmark checkpoint
    overrides: dict[str, str] = field(default_factory=dict)  # "key" or "suite.key" -> raw value
    echo: Callable[[str], None] = field(default=lambda message: click.echo(message, err=True))
    _loaded: dict = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> ModelSpec:
        return QUICK_MODEL if self.quick else BENCH_MODEL

    @property
    def best_of(self) -> int:
        return self.repeats or (2 if self.quick else 7)

    def checkpoint(self) -> Path:
        if self.model_dir is not None:
            return self.model_dir
        if "checkpoint" not in self._loaded:
            started = time.perf_counter()
            self._loaded["checkpoint"] = bench_checkpoint(self.spec)
            took = time.perf_counter() - started
            if took > 1:
                self.echo(f"built benchmark checkpoint {self._loaded['checkpoint']} in {took:.1f} s")
        return self._loaded["checkpoint"]

    def load(self):
        """(Model, Tokenizer) on ``self.device`` in ``self.dtype``, loaded once per invocation."""
        if "model" not in self._loaded:
            from glinthawk.compute.loader import load_model
            from glinthawk.tokenizer import Tokenizer

            directory = self.checkpoint()
            model = load_model(directory, dtype=self.dtype, device=self.device)
            self._loaded["model"] = (model, Tokenizer(directory, extra_eos_ids=model.config.eos_token_ids))
        return self._loaded["model"]

    def knobs(self, suite: str, defaults: dict[str, Any], quick: dict[str, Any]) -> dict[str, Any]:
        """The suite's knobs: defaults (or quick sizes), then ``--set`` overrides."""
        values = dict(defaults)
        if self.quick:
            values.update(quick)
        for key in values:
            for name in (key, f"{suite}.{key}"):
                if name in self.overrides:
                    values[key] = parse_knob(self.overrides[name], defaults[key], name)
        return values

    def model_info(self) -> dict[str, Any]:
        model, _ = self.load()
        cfg = model.config
        return {
            "checkpoint": str(self.checkpoint()),
            "spec": asdict(self.spec) if self.model_dir is None else None,
            "architecture": cfg.architecture, "hidden": cfg.hidden_size, "layers": cfg.num_layers,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "parameters": model.parameter_count(),
            "weight_bytes": model.weight_bytes(), "dtype": self.dtype,
            "kv_bytes_per_token": cfg.kv_bytes_per_token(model.embed_tokens.element_size()),
        }


def parse_knob(raw: str, default: Any, name: str) -> Any:
    """Parse ``raw`` as the type of ``default`` (bool, int, float, str, or a list of ints/floats, where
    "auto" may stand for a micro-batch count that Tier 1 measures)."""
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, tuple)):
            kind = float if any(isinstance(v, float) for v in default) else int
            return [v.strip() if v.strip() == "auto" else kind(v) for v in raw.split(",") if v.strip()]
        return raw
    except ValueError:
        raise click.BadParameter(f"{name}={raw!r}: expected {type(default).__name__} like {default!r}",
                                 param_hint="--set") from None


# -- machine facts ------------------------------------------------------------------------
def machine_facts() -> dict[str, Any]:
    cpu_model, flags = cpu_info()
    mem_total = _meminfo("MemTotal")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_features": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "thread_environment": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "ram_bytes": mem_total,
        "ram_available_bytes": _meminfo("MemAvailable"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "gpu_model": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "numpy", "transformers", "glinthawk", "matplotlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch"] = torch.__version__
    try:
        repo = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return found


# -- timing -------------------------------------------------------------------------------
def best_of(fn: Callable[[], Any], repeats: int, warmup: int = 1,
            device: torch.device | str = "cpu") -> tuple[float, list[float]]:
    """Best wall time of ``repeats`` calls (after ``warmup`` untimed ones), and all samples.

    On CUDA each call is timed to the end of the work it queued, not to its return.
    """
    finish = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        finish()
        started = time.perf_counter()
        fn()
        finish()
        samples.append(time.perf_counter() - started)
    return min(samples), samples


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0 or not math.isfinite(value) or not math.isfinite(baseline):
        return None
    return value / baseline


def target(description: str, value: float | None, threshold: float, higher_is_better: bool = True) -> dict:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": description, "value": value, "threshold": threshold, "met": met}


# -- roofline ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Roofline:
    """Per-token costs of a decode step, from the model's geometry.

    Bytes read per step: every weight the step multiplies by (all layers, final norm, LM
    head; the embedding only for the rows it looks up) plus each sequence's cached K/V.
    FLOPs: 2 per weight per token (the LM head counted for every sampled row) plus
    attention's q.K and p.V over the context.
    """

    weight_bytes: int
    linear_params: int
    embed_row_bytes: int
    kv_bytes_per_token: int
    attn_flops_per_context_token: int  # per new token, per cached token it attends to (all layers)
    read_bandwidth: float  # bytes/s
    matmul_peak: float  # FLOP/s

    @classmethod
    def of(cls, model, read_bandwidth: float, matmul_peak: float) -> Roofline:
        cfg = model.config
        itemsize = model.embed_tokens.element_size()
        # Read per step: every weight but the embedding table, of which a step gathers a few rows,
        # unless the table itself is the LM head.
        shared = model.lm_head is model.embed_tokens
        weight_bytes = model.weight_bytes() - (0 if shared else model.embed_tokens.numel() * itemsize)
        linear = sum(t.numel() for layer in model.layers for t in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
        linear += model.lm_head.numel()
        return cls(weight_bytes, linear, cfg.hidden_size * itemsize, cfg.kv_bytes_per_token(itemsize),
                   4 * cfg.num_layers * cfg.num_heads * cfg.head_dim, read_bandwidth, matmul_peak)

    def step(self, batch: int, context_tokens: int) -> dict[str, float]:
        """Floors of one decode step of ``batch`` sequences attending ``context_tokens`` cached tokens in all."""
        nbytes = self.weight_bytes + batch * self.embed_row_bytes + context_tokens * self.kv_bytes_per_token
        flops = 2 * batch * self.linear_params + context_tokens * self.attn_flops_per_context_token
        return {"bytes": nbytes, "flops": flops, "bytes_s": nbytes / self.read_bandwidth,
                "flops_s": flops / self.matmul_peak}

    def floor_seconds(self, batch: int, context_tokens: int) -> float:
        step = self.step(batch, context_tokens)
        return max(step["bytes_s"], step["flops_s"])


# -- workloads ----------------------------------------------------------------------------
def token_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_PLAIN_ID, vocab) for _ in range(length)] for _ in range(count)]


def request_lines(prompts: list[list[int]], max_tokens: int, prefix: str = "r") -> list[dict]:
    return [{"custom_id": f"{prefix}{i}", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True} for i, prompt in enumerate(prompts)]


def write_jsonl(path: Path, lines: Iterable[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def parse_requests(lines: list[dict]):
    from glinthawk.requests import parse_line

    return [parse_line(i + 1, json.dumps(line).encode()) for i, line in enumerate(lines)]


@dataclass
class RunResult:
    seconds: float
    generated_tokens: int
    requests: int
    # (seconds since start, tokens generated, sequences that have their first token)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    def decode_tokens_per_s(self) -> float | None:
        """Generation rate once every sequence has its first token (all prefills done)."""
        return decode_rate(self.timeline, self.requests, self.generated_tokens)


def decode_rate(timeline: list[tuple[float, int, int]], sequences: int, total: int) -> float | None:
    """Tokens per second from the moment all ``sequences`` have their first token to the ``total``-th token."""
    start = next(((t, n) for t, n, started in timeline if started >= sequences), None)
    end = next(((t, n) for t, n, _ in timeline if n >= total), None)
    if start is None or end is None or end[0] <= start[0] or end[1] <= start[1]:
        return None
    return (end[1] - start[1]) / (end[0] - start[0])


def check_results(lines: list[dict], expected_tokens: int) -> int:
    """Fail loudly if any request errored or generated a different number of tokens."""
    from glinthawk.requests import is_error

    errors = [line for line in lines if is_error(line)]
    if errors:
        raise click.ClickException(f"{len(errors)} benchmark requests failed, e.g. {errors[0]}")
    generated = sum(int(line.get("completion_tokens", 0)) for line in lines)
    if generated != expected_tokens:
        raise click.ClickException(f"expected {expected_tokens} generated tokens, got {generated}")
    return generated


def run_engine(model, tokenizer, lines: list[dict], *, kv_tokens: int,
               max_batch_tokens: int = StepSettings.max_batch_tokens, max_seqs: int = StepSettings.max_seqs,
               roofline: Roofline | None = None) -> RunResult:
    """The single-process Engine on ``lines``; records each step (and its roofline floor)."""
    from glinthawk.engine import Engine

    engine = Engine(model, tokenizer, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs)
    requests = parse_requests(lines)
    steps: list[dict] = []
    timeline: list[tuple[float, int, int]] = []
    inner = engine.step
    started = time.perf_counter()

    def traced_step(running):
        rows = running[:max_batch_tokens]
        decode = all(seq.pending == 1 for seq in running) and len(running) <= max_batch_tokens
        context = sum(seq.num_cached + 1 for seq in rows) if decode else None
        t0 = time.perf_counter()
        finished = inner(running)
        t1 = time.perf_counter()
        record = {"seconds": t1 - t0, "batch": len(rows), "decode": decode, "context_tokens": context}
        if decode and roofline is not None:
            record["floor_seconds"] = roofline.floor_seconds(len(rows), context)
        steps.append(record)
        timeline.append((t1 - started, engine.stats.generated_tokens, engine.stats.first_tokens))
        return finished

    engine.step = traced_step
    out: list[dict] = []
    engine.run(requests, out.append)
    seconds = time.perf_counter() - started
    generated = check_results(out, sum(line["max_tokens"] for line in lines))
    outputs = {line["custom_id"]: line["token_ids"] for line in out}
    return RunResult(seconds, generated, len(lines), timeline, {"steps": steps, "outputs": outputs})


def decode_summary(steps: list[dict]) -> dict[str, float | None]:
    """Decode-only steps of a traced Engine run: tok/s measured and at the roofline."""
    decode = [s for s in steps if s["decode"]]
    seconds = sum(s["seconds"] for s in decode)
    tokens = sum(s["batch"] for s in decode)
    floor = sum(s.get("floor_seconds", 0.0) for s in decode)
    return {
        "decode_steps": len(decode), "decode_seconds": seconds,
        "decode_tok_s": tokens / seconds if seconds else None,
        "roofline_tok_s": tokens / floor if floor else None,
        "prefill_seconds": sum(s["seconds"] for s in steps if not s["decode"]),
    }


async def _two_tier(model, tokenizer, requests_path: Path, out_path: Path, *, nodes: int, micro_batches: int,
                    netem, kv_tokens: int | None, max_batch_tokens: int, max_seqs: int, poll_s: float,
                    kv_memory: int | None = None, kv_dtype: str = "auto") -> RunResult:
    from glinthawk.client import submit
    from glinthawk.node.tier1 import Tier1Node
    from glinthawk.node.tier2 import Tier2Node

    tier2 = [Tier2Node(kv_tokens=kv_tokens, kv_memory=kv_memory, netem=netem, kv_dtype=kv_dtype)
             for _ in range(nodes)]
    tier1 = None
    try:
        ports = [await node.start("127.0.0.1", 0) for node in tier2]
        tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{port}" for port in ports], micro_batches=micro_batches,
                          max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, netem=netem)
        port = await tier1.start("127.0.0.1", 0)
        timeline: list[tuple[float, int, int]] = []
        started = time.perf_counter()

        async def poll() -> None:  # O(1): the poller shares the event loop with the node it watches
            while True:
                timeline.append((time.perf_counter() - started, tier1.generated_tokens, tier1.stats.first_tokens))
                await asyncio.sleep(poll_s)

        poller = asyncio.get_running_loop().create_task(poll())
        try:
            await submit(requests_path, "127.0.0.1", port, out_path, progress=False)
        finally:
            poller.cancel()
        seconds = time.perf_counter() - started
        timeline.append((seconds, tier1.generated_tokens, tier1.stats.first_tokens))
        stats = tier1.merger.stats
        extra = {"tier1_busy_seconds": stats.busy_seconds, "tier1_jobs": stats.jobs,
                 "tier1_micro_batches_per_job": stats.micro_batches / stats.jobs if stats.jobs else None}
        return RunResult(seconds, tier1.generated_tokens, 0, timeline, extra)
    finally:
        if tier1 is not None:
            await tier1.close()
        if netem is not None:  # let frames the emulated link still holds land before Tier 2 shuts down
            await asyncio.sleep((netem.delay_ms + netem.jitter_ms) / 1000 + 0.05)
        for node in tier2:
            await node.close()


def run_two_tier_inprocess(model, tokenizer, lines: list[dict], work_dir: Path, *, nodes: int = 1,
                           micro_batches: int | None = None, delay_ms: float = 0.0,
                           kv_tokens: int | None = None, max_batch_tokens: int = StepSettings.max_batch_tokens,
                           max_seqs: int = StepSettings.max_seqs, poll_s: float = 0.005, kv_memory: int | None = None,
                           kv_dtype: str = "auto") -> RunResult:
    """Tier 1 and Tier 2 nodes in this process (one event loop, real TCP on loopback, real delays);
    each Tier 2 node sized by ``kv_tokens`` or ``kv_memory`` (bytes), keeping K/V as ``kv_dtype``."""
    from glinthawk.net.connection import run
    from glinthawk.net.netem import NetEm

    requests_path = write_jsonl(work_dir / "requests.jsonl", lines)
    out_path = work_dir / "results.jsonl"
    netem = NetEm(delay_ms=delay_ms) if delay_ms > 0 else None
    result = run(_two_tier(model, tokenizer, requests_path, out_path, nodes=nodes, micro_batches=micro_batches,
                           netem=netem, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs,
                           poll_s=poll_s, kv_memory=kv_memory, kv_dtype=kv_dtype))
    result.requests = len(lines)
    check_results(read_jsonl(out_path), sum(line["max_tokens"] for line in lines))
    return result


def run_local_cluster(model_dir: Path, lines: list[dict], work_dir: Path, *, dtype: str, tier2_nodes: int,
                      kv_tokens: int, micro_batches: int | str | None = None,
                      max_batch_tokens: int = StepSettings.max_batch_tokens, max_seqs: int = StepSettings.max_seqs,
                      delay_ms: float = 0.0, stages: int | None = None) -> RunResult:
    """``glinthawk run``: real Tier 2 and Tier 1 processes on loopback; times the submit only.
    ``micro_batches``: see ``LocalCluster`` ("auto": Tier 1 measures the count)."""
    from glinthawk.client import fetch_status, submit
    from glinthawk.cluster import ClusterError, LocalCluster
    from glinthawk.net.connection import run

    requests_path = write_jsonl(work_dir / "requests.jsonl", lines)
    out_path = work_dir / "results.jsonl"
    cluster = LocalCluster(model_dir, tier2_nodes=tier2_nodes, kv_tokens=kv_tokens, dtype=dtype, device="cpu",
                           micro_batches=micro_batches, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs,
                           delay_ms=delay_ms, log_dir=work_dir / "logs", stages=stages if stages != 1 else None)
    started = time.perf_counter()
    try:
        with cluster:
            up = time.perf_counter() - started
            host, port = cluster.tier1_address
            started = time.perf_counter()
            summary = run(submit(requests_path, host, port, out_path, progress=False))
            seconds = time.perf_counter() - started
            chosen = run(fetch_status(host, port)).get("micro_batches")  # what Tier 1 ran with (or measured)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    check_results(read_jsonl(out_path), sum(line["max_tokens"] for line in lines))
    return RunResult(seconds, summary.generated_tokens, len(lines), extra={"startup_seconds": up,
                                                                           "micro_batches_used": chosen})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# -- processes ----------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident set size of a live process (VmRSS), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    address: str | None = None

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.process, timeout)


def spawn_ready(name: str, argv: list[str], work_dir: Path, timeout: float = 120.0) -> Child:
    """Start ``python argv... --ready-file F`` and wait until it writes its address to F."""
    ready = work_dir / f"{name}.addr"
    ready.unlink(missing_ok=True)
    log_path = work_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, *argv, "--ready-file", str(ready)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    child = Child(name, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            child.address = ready.read_text().strip()
            return child
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise click.ClickException(f"{name} exited with code {process.returncode} before it was ready:\n{tail}")
        time.sleep(0.05)
    child.stop()
    raise click.ClickException(f"{name} not ready after {timeout:.0f} s; see {log_path}")


# -- output -------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 1e5:
            return f"{value:.3g}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def render_table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """``columns``: (key, header) pairs."""
    cells = [[header for _, header in columns]] + [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save_plot(path: Path, plot: Callable[[dict, Any], None], result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(11, 4.8), dpi=110)
    try:
        plot(result, figure)
        label = f"{result['suite']} | {result['machine'].get('cpu_model')} | {result['config'].get('dtype', '')}"
        if result.get("quick"):
            label += " | --quick"
        figure.suptitle(label, fontsize=9)
        figure.tight_layout(rect=(0, 0, 1, 0.95))
        figure.savefig(path)
    finally:
        plt.close(figure)


def run_suite(name: str, ctx: BenchContext) -> dict:
    """Run one suite: measure, then write ``NAME.json``, ``NAME.png`` and print the table."""
    module = importlib.import_module(f"glinthawk.bench.{name}")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    ctx.echo(f"== bench {name}{' (quick)' if ctx.quick else ''}")
    machine = machine_facts()
    started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    body = module.run(ctx)
    elapsed = time.perf_counter() - started
    result = {
        "suite": name,
        "schema": SCHEMA_VERSION,
        "quick": ctx.quick,
        "started_at": started_at,
        "elapsed_seconds": elapsed,
        "machine": machine | {"load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": versions(),
        "command": sys.argv,
        **body,
    }
    result["config"] = {"dtype": ctx.dtype, "quick": ctx.quick, "best_of": ctx.best_of, **body.get("config", {})}
    table = result.pop("table", None)
    json_path = ctx.out_dir / f"{name}.json"
    json_path.write_text(json.dumps(_finite(result), indent=1, default=_json_default) + "\n", encoding="utf-8")
    save_plot(ctx.out_dir / f"{name}.png", module.plot, result)
    if table is not None:
        click.echo(render_table(*table))
    for key, check in result.get("targets", {}).items():
        verdict = {True: "met", False: "NOT met", None: "n/a"}[check["met"]]
        click.echo(f"  target {key}: {check['target']} -> {fmt(check['value'])} ({verdict})")
    for note in result.get("notes", []):
        click.echo(f"  note: {note}")
    click.echo(f"  wrote {json_path} and {name}.png ({elapsed:.1f} s)")
    return result
