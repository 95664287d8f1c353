"""Every role's settings, each declared once: name, default, valid range and help text.

The nodes take these objects; the command-line options (``options.setting_options``),
the cluster file's keys and ``LocalCluster`` are all built from the same fields, so a
default lives in exactly one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, help: str, *, minimum: float | None = None, flag: str | None = None,
            text: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A settings field: its default, its help text, the least value it takes, its command-line
    flag (default: from its name), for text what it holds ("size", "bandwidth") and the values
    it may take (``choices``)."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "flag": flag, "text": text,
                                            "choices": choices})


class _Settings:
    """Refuses a value below its field's least one, or not among its choices, as the command line does."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value, minimum = getattr(self, item.name), item.metadata.get("minimum")
            if minimum is not None and value is not None and value < minimum:
                raise ValueError(f"{item.name} must be at least {minimum}, got {value!r}")
            choices = item.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{item.name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class StepSettings(_Settings):
    """How large a step is: shared by the single-process engine and Tier 1."""

    max_batch_tokens: int = setting(2048, "Tokens (decode + prefill chunks) per step.", minimum=1)
    max_seqs: int = setting(256, "Sequences running at once (on Tier 1: per micro-batch).", minimum=1)
    prefix_cache: bool = setting(
        True, "Keep the KV of a prompt prefix that several requests share once, and skip its prefill for each "
        "(outputs are the same either way).")
    cuda_graphs: bool = setting(
        False, "On CUDA, run decode steps through CUDA graphs captured per stage and bucketed batch size (fewer "
        "kernel launches; no effect on a CPU). Off by default: not yet verified on GPU hardware.")


@dataclass(frozen=True)
class Tier1Settings(StepSettings):
    micro_batches: int | None = setting(
        None, "Micro-batches in flight, each may span every Tier 2 node (default: as many as measured compute and "
        "round-trip times call for, at least one per pipeline stage, or per stage that computes at once where they "
        "share cores).", minimum=1)
    concurrent_stages: int | None = setting(
        None, "Where the pipeline's stages share one machine's cores (glinthawk run starts them so): how many of "
        "them compute at once, its cores over a stage's threads. The measured micro-batch count then plans for that "
        "many computing stages, not one a stage (default: every stage has a device of its own).", minimum=1)
    max_waiting: int = setting(4096, "Requests queued for KV room before clients are read no further.", minimum=1)
    heartbeat_s: float = setting(2.0, "Seconds between PINGs to each Tier 2 node.", minimum=0.01,
                                 flag="--heartbeat-interval")
    heartbeat_timeout_s: float = setting(
        10.0, "Seconds a Tier 2 node may stay silent before it is declared lost (an answer that is overdue "
        "against the node's measured round trips is declared sooner).", minimum=0.1, flag="--heartbeat-timeout")
    reconnect_seconds: float = setting(1.0, "Seconds between attempts to reach a Tier 2 node that is down.",
                                       minimum=0.01, flag="--reconnect-interval")


DEFAULT_KV_MEMORY = "1GiB"
DRAIN_TIMEOUT_S = 60.0  # a leaving Tier 2 node's sequences finish within this, or are moved
KV_DTYPES = ("auto", "int8")  # how a Tier 2 node keeps K/V (auto: in the model's dtype)
LOCAL_TIER2_NODES = 2  # Tier 2 processes a local cluster (glinthawk run, LLM()) starts


@dataclass(frozen=True)
class Tier2Settings(_Settings):
    """A Tier 2 node's KV cache: a size in tokens, else in bytes (default ``DEFAULT_KV_MEMORY``)."""

    kv_memory: str | None = setting(None, f"KV cache size, e.g. 8GiB (default: {DEFAULT_KV_MEMORY}).", text="size")
    kv_tokens: int | None = setting(None, "KV cache size in tokens (wins over --kv-memory).", minimum=1)
    kv_dtype: str = setting(
        "auto", "How K/V are kept: auto, in the model's dtype; int8, quantized with a bf16 scale per token and KV "
        "head: about twice the tokens in the same --kv-memory (accuracy: docs/PERFORMANCE.md).",
        choices=KV_DTYPES)

    @property
    def sized(self) -> bool:
        """Whether a KV size was given (else the default, or on Ray the largest that Ray's machines hold)."""
        return self.kv_tokens is not None or self.kv_memory is not None

    @property
    def dtype_args(self) -> list[str]:
        """The node's --kv-dtype, unless auto."""
        return [] if self.kv_dtype == "auto" else ["--kv-dtype", self.kv_dtype]

    @property
    def kv_args(self) -> list[str]:
        """The node's command-line arguments for this KV cache (its size; its dtype unless auto)."""
        if self.kv_tokens is not None:
            return ["--kv-tokens", str(self.kv_tokens), *self.dtype_args]
        return ["--kv-memory", self.kv_memory or DEFAULT_KV_MEMORY, *self.dtype_args]


@dataclass(frozen=True)
class NetemSettings(_Settings):
    """A slower network, emulated by every node on what it sends."""

    delay_ms: float = setting(0.0, "One-way delay added to everything a node sends (emulates a slower network).",
                              minimum=0, flag="--inject-delay-ms")
    jitter_ms: float = setting(0.0, "± jitter on that delay.", minimum=0, flag="--inject-jitter-ms")
    bandwidth: str | None = setting(None, "Cap on what a node sends, e.g. 1Gbit.", flag="--inject-bandwidth",
                                    text="bandwidth")


def flag_of(item: dataclasses.Field) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def to_args(settings: object) -> list[str]:
    """The command-line arguments that give a node ``settings`` (fields that are None are left out)."""
    return args_for(type(settings), dataclasses.asdict(settings))


def args_for(cls: type, values: dict[str, Any]) -> list[str]:
    """The command-line arguments for the entries of ``values`` that are fields of ``cls`` and not None."""
    return [arg for item in dataclasses.fields(cls) if (value := values.get(item.name)) is not None
            for arg in (_switch(item, value) if isinstance(value, bool) else (flag_of(item), str(value)))]


def _switch(item: dataclasses.Field, on: bool) -> tuple[str]:
    flag = flag_of(item)
    return (flag,) if on else ("--no-" + flag[2:],)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(item.name for item in dataclasses.fields(cls))


def pick(cls: type, values: dict[str, Any]):
    """``cls`` from the entries of ``values`` that are its fields and not None (the others keep their defaults)."""
    names = field_names(cls)
    return cls(**{key: value for key, value in values.items() if key in names and value is not None})


def split(values: dict[str, Any], *classes: type) -> list:
    """One settings object of each of ``classes`` from flat keyword arguments; TypeError names
    a key that none of them has (a typo must not become a default)."""
    known = {name for cls in classes for name in field_names(cls)}
    if unknown := sorted(set(values) - known):
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(sorted(known))}")
    return [pick(cls, values) for cls in classes]
