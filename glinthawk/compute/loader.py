"""Load a Hugging Face checkpoint directory into glinthawk's weight layout.

Tensors are read one at a time from memory-mapped safetensors files and cast straight to
the target dtype/device, so peak memory is the model plus one tensor, never two models.
The q/k/v and gate/up projections are fused into one matrix each (one matmul instead of
three or two on Tier 1's hot path).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from glinthawk.compute.config import DTYPE_NAMES, ModelConfig, ModelConfigError
from glinthawk.compute.matmul import pack
from glinthawk.compute.rope import inverse_frequencies

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file, truncated or holds a tensor of the wrong shape."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]
    q_norm: torch.Tensor | None = None  # [head_dim], where config.qk_norm (Qwen3)
    k_norm: torch.Tensor | None = None  # [head_dim]


@dataclass
class Model:
    """A model's weights, or one stage's: the layers of ``layer_range``, with the embedding
    only where that range starts the model and the final norm and LM head only where it ends it."""

    config: ModelConfig
    embed_tokens: torch.Tensor | None  # [vocab, hidden]
    layers: list[LayerWeights]  # those of layer_range
    norm: torch.Tensor | None  # [hidden]
    lm_head: torch.Tensor | None  # [vocab, hidden]; embed_tokens itself when tied, unless packed (matmul.pack)
    inv_freq: torch.Tensor  # [head_dim // 2], float32
    dtype: torch.dtype
    device: torch.device
    layer_range: range  # the whole model's layer indices this one holds

    def layer(self, index: int) -> LayerWeights:
        """Layer ``index`` of the whole model (it must lie in this stage's ``layer_range``)."""
        return self.layers[index - self.layer_range.start]

    @property
    def is_first(self) -> bool:
        return self.layer_range.start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_range.stop == self.config.num_layers

    def weight_bytes(self) -> int:
        """Bytes the weights hold in memory (a tensor in two roles counted once)."""
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in self._tensors()}.values())

    def parameter_count(self) -> int:
        """The checkpoint's parameters: a tied LM head is the embedding, even where it is held twice."""
        tied = self.config.tie_word_embeddings and self.embed_tokens is not None
        head = self.lm_head.numel() if self.lm_head is not None and not tied else 0
        return sum(t.numel() for t in self._tensors() if t is not self.lm_head) + head

    def _tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.embed_tokens, self.norm, self.lm_head) if t is not None)
        for layer in self.layers:
            yield from (t for t in vars(layer).values() if t is not None)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """``name`` as a torch dtype; ``auto`` (see ``auto_dtype``) for the device and checkpoint."""
    if name == "auto":
        name = auto_dtype(device, checkpoint_dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not supported; choose auto or one of {', '.join(DTYPES)}")
    if name == "float16" and device.type != "cuda":
        raise ValueError("dtype float16 is only supported on CUDA; use bfloat16 or float32 on CPU")
    return DTYPES[name]


def auto_dtype(device: torch.device, checkpoint_dtype: str | None = None) -> str:
    """The fast dtype for ``device``: on CUDA the checkpoint's own 16-bit dtype, else bfloat16
    (float16 on GPUs without it); on a CPU bfloat16 where it multiplies bf16 natively (AVX-512
    BF16 or AMX: about twice float32's matmul rate), float32 elsewhere (bf16 would be slower)."""
    if device.type == "cuda":
        if checkpoint_dtype == "float16" or not torch.cuda.is_bf16_supported():
            return "float16"
        return "bfloat16"
    return "bfloat16" if fast_bfloat16_cpu() else "float32"


def fast_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), as torch's kernels use."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()[1]))


@functools.cache
def cpu_info() -> tuple[str | None, tuple[str, ...]]:
    """(model name, feature flags) from /proc/cpuinfo; (None, ()) where there is none."""
    cpu_model, flags = None, ()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model is None:
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = tuple(line.split(":", 1)[1].split())
    except OSError:
        pass
    return cpu_model, flags


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, CPU otherwise."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


class _TensorSource:
    """Finds each named tensor in a single or sharded safetensors checkpoint."""

    def __init__(self, directory: Path, stack: ExitStack):
        self.directory = directory
        self._stack = stack
        self._handles: dict[str, object] = {}
        self.locations = self._index()

    def _index(self) -> dict[str, str]:
        index_path = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc!r})") from None
            return {name: str(file) for name, file in weight_map.items()}
        if single.exists():
            return {name: single.name for name in self._open(single.name).keys()}
        raise CheckpointError(
            f"{self.directory}: no weights found; expected model.safetensors or "
            "model.safetensors.index.json with model-*.safetensors shards"
        )

    def _open(self, file_name: str):
        if file_name not in self._handles:
            path = self.directory / file_name
            if not path.exists():
                raise CheckpointError(f"{path}: weight file is missing (named by the checkpoint index)")
            try:
                self._handles[file_name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read safetensors file, truncated or corrupt? ({exc})") from None
        return self._handles[file_name]

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """The tensor on ``device`` in ``dtype`` (None: the checkpoint's own; on the CPU then a view of the mmap)."""
        if name not in self.locations:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        file_name = self.locations[name]
        handle = self._open(file_name)
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.directory / file_name}: cannot read tensor '{name}' ({exc})") from None
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.directory / file_name}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"config.json implies {shape}"
            )
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def fused(self, parts: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The named tensors concatenated along dim 0 in ``dtype``: cast and joined in one pass (a
        float32 model from a bf16 checkpoint writes each fused matrix once, not twice)."""
        tensors = [self.get(name, shape, None, device) for name, shape in parts]
        out = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=dtype, device=device)
        for tensor, part in zip(tensors, out.split([t.shape[0] for t in tensors])):
            part.copy_(tensor)  # copy_ casts at memory speed; torch.cat(out=) of another dtype is 2x slower
        return out


def load_model(directory: str | Path, dtype: str = "float32", device: str | None = None,
               layers: range | None = None) -> Model:
    """Load config.json + safetensors weights from ``directory`` (``dtype`` may be ``auto``);
    with ``layers``, only that stage's share of them (see ``Model``)."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"{directory}: model directory {what}")
    config = ModelConfig.from_file(directory / "config.json")
    layers = range(config.num_layers) if layers is None else layers
    if not (0 <= layers.start < layers.stop <= config.num_layers and layers.step == 1):
        raise CheckpointError(f"{directory}: layers {layers.start}:{layers.stop} are not a range of the model's "
                              f"{config.num_layers} layers; give A:B with 0 <= A < B <= {config.num_layers}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, config.torch_dtype)
    needed, free = weight_bytes(config, layers, torch_dtype.itemsize), free_memory(torch_device)
    if free is not None and needed > free:
        raise CheckpointError(
            f"{directory}: layers {layers.start}:{layers.stop} need {needed / 2**30:.2f} GiB for their weights in "
            f"{str(torch_dtype).removeprefix('torch.')} but {torch_device} has {free / 2**30:.2f} GiB free; cut the "
            "model into more pipeline stages (--layers A:B on each, or glinthawk run --stages N) or pick a smaller "
            "--dtype")
    with ExitStack() as stack:
        source = _TensorSource(directory, stack)
        return _assemble(config, source, torch_dtype, torch_device, layers)


def weight_bytes(config: ModelConfig, layers: range, itemsize: int) -> int:
    """What the weights of ``layers`` (with the embedding or head where they start or end the
    model) take in memory, at ``itemsize`` bytes a number."""
    hidden, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config.intermediate_size + 2 * hidden
    numbers = len(layers) * per_layer
    if layers.start == 0:
        numbers += config.vocab_size * hidden
    if layers.stop == config.num_layers:
        numbers += config.vocab_size * hidden + hidden
    return numbers * itemsize


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (a CPU's MemAvailable), or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _assemble(config: ModelConfig, source: _TensorSource, dtype: torch.dtype, device: torch.device,
              layer_range: range) -> Model:
    hidden = config.hidden_size

    def get(name: str, *shape: int) -> torch.Tensor:
        return source.get(name, tuple(shape), dtype, device)

    def fused(*parts: tuple[str, tuple[int, ...]]) -> torch.Tensor:
        return source.fused(list(parts), dtype, device)

    layers = [_layer(config, source, get, fused, i) for i in layer_range]
    first, last = layer_range.start == 0, layer_range.stop == config.num_layers
    embed = get("model.embed_tokens.weight", config.vocab_size, hidden) if first else None
    lm_head = norm = None
    if last:
        norm = get("model.norm.weight", hidden)
        if config.tie_word_embeddings or "lm_head.weight" not in source:
            if not config.tie_word_embeddings:
                raise CheckpointError(
                    f"{source.directory}: tensor 'lm_head.weight' is missing and tie_word_embeddings is false"
                )
            lm_head = embed if embed is not None else get("model.embed_tokens.weight", config.vocab_size, hidden)
        else:
            lm_head = get("lm_head.weight", config.vocab_size, hidden)
        lm_head = pack(lm_head)  # when tied, a packed copy: the embedding stays plain for its lookups
    return Model(config=config, embed_tokens=embed, layers=layers, norm=norm, lm_head=lm_head,
                 inv_freq=inverse_frequencies(config.rope, config.head_dim).to(device), dtype=dtype,
                 device=torch.device(device), layer_range=layer_range)


def _layer(config: ModelConfig, source: _TensorSource, get, fused, index: int) -> LayerWeights:
    hidden, inter, dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_heads * dim, config.num_kv_heads * dim
    p = f"model.layers.{index}."
    qkv = fused((p + "self_attn.q_proj.weight", (q_rows, hidden)), (p + "self_attn.k_proj.weight", (kv_rows, hidden)),
                (p + "self_attn.v_proj.weight", (kv_rows, hidden)))
    qkv_bias = None
    if config.attention_bias:
        qkv_bias = fused((p + "self_attn.q_proj.bias", (q_rows,)), (p + "self_attn.k_proj.bias", (kv_rows,)),
                         (p + "self_attn.v_proj.bias", (kv_rows,)))
    if config.mlp_bias or p + "self_attn.o_proj.bias" in source:
        raise ModelConfigError(f"{source.directory}: mlp_bias / o_proj bias is not supported")
    q_norm = k_norm = None
    if config.qk_norm:
        q_norm, k_norm = get(p + "self_attn.q_norm.weight", dim), get(p + "self_attn.k_norm.weight", dim)
    return LayerWeights(
        input_norm=get(p + "input_layernorm.weight", hidden),
        qkv=pack(qkv),
        qkv_bias=qkv_bias,
        o_proj=pack(get(p + "self_attn.o_proj.weight", hidden, q_rows)),
        post_norm=get(p + "post_attention_layernorm.weight", hidden),
        gate_up=pack(fused((p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)))),
        down=pack(get(p + "mlp.down_proj.weight", hidden, inter)),
        q_norm=q_norm,
        k_norm=k_norm,
    )
