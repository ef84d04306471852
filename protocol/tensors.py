"""Tensors on the wire: `{dtype, shape, data}` with raw little-endian bytes, never pickle.

A `TensorPayload` is validated when it is built, so one that exists is always consistent:
whitelisted dtype, rank <= MAX_RANK, non-negative dims, and `prod(shape) * itemsize == len(data)`.
`from_wire` additionally bounds the element count (MAX_ELEMENTS by default) because the shape
comes from a peer and is later handed to torch.

torch is imported lazily inside `from_torch`/`to_torch` so that the protocol core stays importable
(and fast to import) without it.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from .errors import BadTensor

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "DTYPES", "MAX_RANK", "MAX_ELEMENTS", "TensorPayload", "from_torch", "to_torch",
    "CODECS", "ACTIVATION_DTYPES", "codec_dtype", "as_activation_dtype", "encode_as", "recode",
]

# dtype name -> bytes per element. Everything else (float64, complex, quantized...) is refused.
DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}
MAX_RANK = 8
# 2**28 elements (1 GiB of fp32) is far above what a 64 MiB frame can carry; it exists so that a
# shape like (2**40, 0) or a huge dim cannot reach torch. Receivers may pass a tighter bound.
MAX_ELEMENTS = 2**28
_WIRE_KEYS = frozenset({"dtype", "shape", "data"})
_DIGEST_DOMAIN = b"petals/tensor/1\n"
# Data from this size on is joined after its msgpack header rather than packed (`packed()`).
_JOIN_DATA_FROM = 1 << 16


def _type_name(value: object) -> str:
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class TensorPayload:
    """An n-d array as raw little-endian bytes (bfloat16 as its 16-bit patterns)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    # Worked out once per payload, on first use (`data` is immutable): a pushing daemon's output
    # goes into two messages (to the next daemon and to the client) and its digest into the
    # signature; a client checks one hop's output digest, then the same payload as the next hop's
    # input. Not part of equality, hashing or the constructor.
    _packed: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self.dtype, self.shape, self.data, max_elements=None)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-able form: {"dtype": str, "shape": [int, ...], "data": bytes}."""
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}

    def packed(self) -> bytes:
        """The msgpack encoding of `to_wire()`, made once: `encode_message` splices these bytes
        into every message that carries this payload instead of packing the data again."""
        if self._packed is None:
            wire = self.to_wire()
            data = wire["data"]
            if len(data) < _JOIN_DATA_FROM or next(reversed(wire)) != "data":
                packed = msgpack.packb(wire, use_bin_type=True)
            else:  # msgpack's packer grows its buffer by copying as a large `data` goes in: pack the
                # map with empty data (its last entry; an empty bin is 0xc4 0x00), then join the
                # real bin header and the data after it (one copy, the same bytes)
                wire["data"] = b""
                head = msgpack.packb(wire, use_bin_type=True)
                packed = b"".join((head[:-2], _bin_header(len(data)), data))
            object.__setattr__(self, "_packed", packed)
        assert self._packed is not None
        return self._packed

    @classmethod
    def from_wire(cls, obj: object, *, max_elements: int = MAX_ELEMENTS) -> TensorPayload:
        """Build from a decoded wire dict; raise BadTensor on anything that is not exactly right."""
        if not isinstance(obj, dict):
            raise BadTensor(f"tensor must be a map, got {_type_name(obj)}")
        keys = set(obj)
        if keys != _WIRE_KEYS:
            missing = sorted(map(str, _WIRE_KEYS - keys))
            extra = sorted(map(repr, keys - _WIRE_KEYS))
            raise BadTensor(f"tensor map keys wrong (missing {missing}, extra {extra})")
        shape = obj["shape"]
        if not isinstance(shape, (list, tuple)):
            raise BadTensor(f"tensor shape must be an array, got {_type_name(shape)}")
        shape = tuple(shape)
        _validate(obj["dtype"], shape, obj["data"], max_elements=max_elements)
        return cls(obj["dtype"], shape, obj["data"])

    def digest(self) -> bytes:
        """SHA-256 over a canonical encoding of dtype, shape and data (what signatures bind to);
        computed once per payload (the bytes are those of this payload, whoever built it)."""
        if self._digest is None:
            h = hashlib.sha256(_DIGEST_DOMAIN)
            # msgpack of [dtype, shape] is self-delimiting, so header and data cannot be confused.
            h.update(msgpack.packb([self.dtype, list(self.shape)], use_bin_type=True))
            h.update(self.data)
            object.__setattr__(self, "_digest", h.digest())
        assert self._digest is not None
        return self._digest


def _bin_header(n: int) -> bytes:
    """The msgpack bin header for `n` bytes (bin8, bin16 or bin32)."""
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _validate(dtype: object, shape: object, data: object, *, max_elements: int | None) -> None:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadTensor(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, tuple):
        raise BadTensor(f"shape must be a tuple, got {_type_name(shape)}")
    if len(shape) > MAX_RANK:
        raise BadTensor(f"rank {len(shape)} exceeds {MAX_RANK}")
    # Locally built payloads only need dims torch can hold; wire ones get the element limit.
    dim_bound = 2**63 - 1 if max_elements is None else max_elements
    for dim in shape:
        # bool is an int subclass; a shape of (True, 2) is a bug or an attack, not (1, 2).
        if type(dim) is not int:
            raise BadTensor(f"shape entries must be ints, got {_type_name(dim)}")
        if dim < 0:
            raise BadTensor(f"negative dimension {dim} in shape {shape}")
        if dim > dim_bound:
            raise BadTensor(f"dimension {dim} exceeds the limit {dim_bound}")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise BadTensor(f"shape {shape} has {numel} elements (max {max_elements})")
    if not isinstance(data, bytes):
        raise BadTensor(f"tensor data must be bytes, got {_type_name(data)}")
    expected = numel * DTYPES[dtype]
    if len(data) != expected:
        raise BadTensor(f"{dtype}{list(shape)} needs {expected} bytes, got {len(data)}")
    # torch gives undefined results for bool bytes other than 0/1; refuse them up front (C-speed scan).
    if dtype == "bool" and data.translate(None, b"\x00\x01"):
        raise BadTensor("bool tensor contains bytes other than 0 and 1")


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "bool": torch.bool,
    }


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise RuntimeError("tensor wire format is little-endian; big-endian hosts are not supported")


def from_torch(tensor: torch.Tensor) -> TensorPayload:
    """Copy a tensor (any device, any strides) into a payload; refuses dtypes off the whitelist."""
    _require_little_endian()
    names = {v: k for k, v in _torch_dtypes().items()}
    name = names.get(tensor.dtype)
    if name is None:
        raise BadTensor(f"torch dtype {tensor.dtype} is not one of {sorted(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # Reinterpret as bytes (bfloat16 keeps its exact bit pattern; numpy has no bfloat16).
    import torch

    data = flat.view(torch.uint8).numpy().tobytes()
    return TensorPayload(name, tuple(int(d) for d in tensor.shape), data)


def to_torch(payload: TensorPayload, device: str | torch.device = "cpu") -> torch.Tensor:
    """A fresh, writable, contiguous tensor with the payload's dtype and shape on `device`."""
    _require_little_endian()
    import torch

    dtype = _torch_dtypes()[payload.dtype]
    if not payload.data:  # torch.frombuffer refuses empty buffers
        return torch.empty(payload.shape, dtype=dtype, device=device)
    # bytearray: frombuffer over immutable bytes would give a read-only tensor (and a warning).
    flat = torch.frombuffer(bytearray(payload.data), dtype=dtype)
    return flat.reshape(payload.shape).to(device)


# ------------------------------------------------------------------------ activation codecs
# On a slow link a prefill's hidden states cost more in transfer than in compute. A sender may
# compress them by sending them in a narrower float dtype; the receiver computes in its own dtype
# and answers in the dtype the request came in, so the whole chain stays in the codec and every
# signature binds the bytes actually sent. "none" (the default everywhere) keeps them exact.

#: Activation codec name -> the dtype hidden states travel in (None: the sender's own dtype).
CODECS: dict[str, str | None] = {"none": None, "fp16": "float16", "bf16": "bfloat16"}
#: Dtypes a daemon accepts hidden states in, whatever it computes in (float32 and the codecs').
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
_FLOAT16_MAX = 65504.0


def codec_dtype(codec: str) -> str | None:
    """The wire dtype of an activation codec (None for "none"); ValueError naming the choices."""
    if codec not in CODECS:
        raise ValueError(f"compression {codec!r} is not one of {', '.join(CODECS)}")
    return CODECS[codec]


def as_activation_dtype(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """`tensor` in float dtype `dtype` (rounded when narrower). float16 saturates at its largest
    finite value instead of turning an outlier activation into inf."""
    if dtype not in ACTIVATION_DTYPES:
        raise BadTensor(f"activations cannot travel as {dtype!r} (one of {', '.join(ACTIVATION_DTYPES)})")
    target = _torch_dtypes()[dtype]
    if tensor.dtype == target:
        return tensor
    if dtype == "float16":
        tensor = tensor.clamp(-_FLOAT16_MAX, _FLOAT16_MAX)
    return tensor.to(target)


def encode_as(tensor: torch.Tensor, dtype: str) -> TensorPayload:
    """`tensor` as a payload of float dtype `dtype` (see `as_activation_dtype`)."""
    return from_torch(as_activation_dtype(tensor, dtype))


def recode(payload: TensorPayload, dtype: str) -> TensorPayload:
    """The payload's values in float dtype `dtype` (the payload itself when it already is)."""
    return payload if payload.dtype == dtype else encode_as(to_torch(payload), dtype)
