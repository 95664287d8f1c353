"""Frame encoding and decoding: pure functions, no I/O.

A frame on the wire::

    N  (4 bytes, big-endian)   length of everything after these 4 bytes
    H  (4 bytes, big-endian)   length of the header
    header (H bytes)           a msgpack map with a str "type" and any other fields
    payload (N - 4 - H bytes)  raw little-endian tensor bytes

With tensors attached, ``header["tensors"]`` lists ``[name, dtype_name, shape,
offset, nbytes]`` per tensor, ``offset`` counted from the start of the payload.
The encoder places every tensor at a multiple of ``ALIGN`` bytes from the start
of the frame body (it pads the header through a ``"_pad"`` bin field and leaves
gaps between tensors), so decoded tensors are aligned in memory as long as the
body buffer is. Decoders must follow the offsets, not assume tensors are packed.
"""

import math
import struct
import sys
from collections.abc import Mapping

import msgpack
import torch

assert sys.byteorder == "little", "the wire format carries tensors as little-endian bytes"

DEFAULT_MAX_FRAME_BYTES = 1 << 30
ALIGN = 16  # what malloc guarantees for a bytearray on 64-bit platforms

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_RESERVED = ("tensors", "_pad")

_U32 = struct.Struct(">I")
_MAX_LENGTH = 2**32 - 1
_PREFIX = struct.Struct(">II")


class ProtocolError(Exception):
    """A peer sent something that breaks the protocol; the connection is unusable."""


def encode_frame(
    msg: Mapping, tensors: Mapping[str, torch.Tensor] | None = None
) -> list[memoryview | bytes]:
    """Encode one frame, returned as buffers to write in order.

    The first buffer holds the length prefix and the header; each tensor follows as a
    memoryview over its own memory (copied only when it is not a contiguous CPU
    tensor). The views keep the tensors alive, but the caller must not modify the
    tensors until the buffers have been written.
    """
    if not isinstance(msg.get("type"), str):
        raise ValueError(f"message needs a str 'type', got {msg.get('type')!r}")
    if reserved := [key for key in _RESERVED if key in msg]:
        raise ValueError(f"message fields {reserved} are reserved for the codec")
    if not tensors:
        header = msgpack.packb(dict(msg))
        return [_PREFIX.pack(4 + len(header), len(header)) + header]

    views: list[memoryview | bytes] = []
    descriptors = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be str, got {name!r}")
        dtype_name = _DTYPE_NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise ValueError(f"tensor {name!r}: unsupported dtype {tensor.dtype}")
        gap = -offset % ALIGN
        if gap:
            views.append(bytes(gap))
            offset += gap
        data = tensor.detach().cpu().contiguous()
        view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
        views.append(view)
        descriptors.append([name, dtype_name, list(data.shape), offset, view.nbytes])
        offset += view.nbytes

    # Pad the header so the payload starts ALIGN-aligned: a bin field of k bytes
    # (k < 256) encodes exactly k bytes longer than an empty one.
    fields = {**msg, "tensors": descriptors, "_pad": b""}
    unpadded = len(msgpack.packb(fields))
    fields["_pad"] = bytes(-(4 + unpadded) % ALIGN)
    header = msgpack.packb(fields)
    length = 4 + len(header) + offset
    if length > _MAX_LENGTH:
        raise ValueError(f"frame of {length} bytes does not fit the 32-bit length prefix")
    return [_PREFIX.pack(length, len(header)) + header, *views]


def decode_frame(
    buf: memoryview | bytes | bytearray, *, max_tensor_bytes: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Decode a frame body (everything after the 4-byte length prefix).

    Returns ``(header, tensors)``; the header no longer has the codec's own fields.
    Tensors are views over ``buf`` (no copy), so they are writable and stay valid
    only while nobody reuses the buffer. Pass a bytearray (or a writable memoryview):
    a read-only buffer such as ``bytes`` is copied once, because torch cannot safely
    wrap read-only memory. Everything is validated before any tensor is created; any
    violation raises ProtocolError.
    """
    view = memoryview(buf).cast("B")
    if view.readonly:
        view = memoryview(bytearray(view))
    if len(view) < 4:
        raise ProtocolError(f"frame body of {len(view)} bytes is too short for a header length")
    (header_len,) = _U32.unpack_from(view)
    if header_len > len(view) - 4:
        raise ProtocolError(f"header length {header_len} exceeds the frame body ({len(view) - 4} bytes)")
    header = _unpack_header(view[4 : 4 + header_len])
    payload_start = 4 + header_len
    specs = _check_tensor_specs(header.pop("tensors", []), len(view) - payload_start, max_tensor_bytes)
    header.pop("_pad", None)
    tensors = {}
    for name, dtype, shape, offset, nbytes in specs:
        if nbytes == 0:  # torch.frombuffer refuses empty ranges
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=payload_start + offset)
            tensors[name] = flat.reshape(shape)
    return header, tensors


def _unpack_header(data: memoryview) -> dict:
    # Every msgpack container or string takes at least one byte per element, so
    # bounding the declared lengths by the header length stops a tiny header from
    # making msgpack preallocate a huge list or dict.
    n = len(data)
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_bin_len=n,
            max_str_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=n,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header is a {type(header).__name__}, not a map")
    if not isinstance(header.get("type"), str):
        raise ProtocolError(f"header has no str 'type' (got {header.get('type')!r})")
    return header


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _check_tensor_specs(
    specs: object, payload_len: int, max_tensor_bytes: int
) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """Validate the header's tensor descriptors against the payload; return them typed."""
    if not isinstance(specs, list):
        raise ProtocolError(f"'tensors' is a {type(specs).__name__}, not a list")
    checked = []
    names = set()
    for i, spec in enumerate(specs):
        if not (isinstance(spec, list) and len(spec) == 5):
            raise ProtocolError(f"tensor #{i}: descriptor is not [name, dtype, shape, offset, nbytes]")
        name, dtype_name, shape, offset, nbytes = spec
        if not isinstance(name, str) or name in names:
            raise ProtocolError(f"tensor #{i}: name {name!r} is not a str or is repeated")
        names.add(name)
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype_name!r}")
        if not (isinstance(shape, list) and all(map(_is_count, shape))):
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        if not (_is_count(offset) and _is_count(nbytes)):
            raise ProtocolError(f"tensor {name!r}: offset {offset!r} / nbytes {nbytes!r} not non-negative ints")
        if nbytes > max_tensor_bytes:
            raise ProtocolError(f"tensor {name!r}: {nbytes} bytes exceeds the limit of {max_tensor_bytes}")
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise ProtocolError(f"tensor {name!r}: shape {shape} of {dtype_name} does not take {nbytes} bytes")
        if math.prod(d or 1 for d in shape) * dtype.itemsize > max_tensor_bytes:  # absurd empty shapes
            raise ProtocolError(f"tensor {name!r}: shape {shape} is too large even though it is empty")
        if offset + nbytes > payload_len:
            raise ProtocolError(
                f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie beyond the payload ({payload_len} bytes)"
            )
        checked.append((name, dtype, shape, offset, nbytes))
    return checked
