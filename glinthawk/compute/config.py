"""Model configuration: the subset of a Hugging Face ``config.json`` that glinthawk runs.

Everything a checkpoint asks for that we do not implement is refused here, with the
field named, so a model never runs silently wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Architectures that RMS-normalise each head of q and k (weights [head_dim]) before RoPE.
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)
# The dtypes weights can run in, by name (torch-free, for the command line and cluster files).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ModelConfigError(ValueError):
    """A checkpoint's config.json asks for something glinthawk cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, where config.json says

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelConfigError(f"{path}: missing; a checkpoint directory needs a Hugging Face config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{path}: expected a JSON object")
        return _parse(raw, str(path))


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    def need(key: str, kind: type = int) -> Any:
        if key not in raw:
            raise ModelConfigError(f"{source}: required field '{key}' is missing")
        value = raw[key]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ModelConfigError(f"{source}: '{key}' must be a positive integer, got {value!r}")
        if kind is float and (not isinstance(value, (int, float)) or value <= 0):
            raise ModelConfigError(f"{source}: '{key}' must be a positive number, got {value!r}")
        return value

    architecture = _architecture(raw, source)
    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = raw.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise ModelConfigError(
            f"{source}: num_key_value_heads={kv_heads!r} must be a positive divisor of num_attention_heads={heads}"
        )
    head_dim = raw.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ModelConfigError(f"{source}: head_dim={head_dim!r} must be a positive even integer")
    if raw.get("head_dim") is None and hidden % heads:
        raise ModelConfigError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")

    max_positions = need("max_position_embeddings")
    max_positions = min(max_positions, _sliding_window_limit(raw, architecture, source) or max_positions)

    # Qwen2 always carries q/k/v biases; Llama, Mistral and Qwen3 only when attention_bias says so.
    attention_bias = architecture == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False))
    return ModelConfig(
        architecture=architecture,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_positions,
        rope=_parse_rope(raw, source),
        attention_bias=attention_bias,
        qk_norm=architecture in QK_NORM_ARCHITECTURES,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        eos_token_ids=_token_ids(raw.get("eos_token_id")),
        torch_dtype=next((v for v in (raw.get("torch_dtype"), raw.get("dtype")) if isinstance(v, str)), None),
    )


def _architecture(raw: dict[str, Any], source: str) -> str:
    """The one architecture ``raw`` names, checked with the other fields only some architectures take."""
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise ModelConfigError(
            f"{source}: 'architectures' must name exactly one of {', '.join(SUPPORTED_ARCHITECTURES)}, "
            f"got {architectures!r}"
        )
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"{source}: architecture '{architecture}' is not supported; "
            f"glinthawk runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    activation = raw.get("hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ModelConfigError(f"{source}: hidden_act '{activation}' is not supported (only silu)")
    if raw.get("pretraining_tp", 1) != 1:
        raise ModelConfigError(f"{source}: pretraining_tp={raw['pretraining_tp']} is not supported (only 1)")
    return architecture


def _token_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int))
    return ()


def _sliding_window_limit(raw: dict[str, Any], architecture: str, source: str) -> int | None:
    """Context limit that keeps a sliding-window model exact.

    Attention inside the window is plain causal attention, so capping every sequence at
    the window size gives the model's true outputs without a windowed kernel.
    """
    window = raw.get("sliding_window")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window", False):
        return None
    if window is None:
        return None
    if not isinstance(window, int) or window <= 0:
        raise ModelConfigError(f"{source}: sliding_window={window!r} must be a positive integer or null")
    return window


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes "rope_parameters" (theta inside); older checkpoints write
    # "rope_theta" and "rope_scaling".
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{source}: rope_scaling / rope_parameters must be an object or null, got {params!r}")
    params = dict(params)
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{source}: rope type '{rope_type}' is not supported; glinthawk runs {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ModelConfigError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and (not math.isfinite(factor) or factor <= 0):
        raise ModelConfigError(f"{source}: rope factor must be a positive number, got {factor!r}")
    original = params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
    )
