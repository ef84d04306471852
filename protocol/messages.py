"""Typed messages and their msgpack wire form (one message per frame).

Wire form: a msgpack map with "t" = the message's short tag, then every field by name (optional
fields are always present, as nil when absent; except fields added later, which are left out when
absent so that older peers keep decoding: `InferenceStep.push`). Ids are 16 raw bytes, tensors are their
`TensorPayload.to_wire()` maps, ints are non-negative int64, floats finite, strings bounded.

One generic, table-driven codec serves every message: each dataclass field carries a spec (in
its dataclass `metadata`) that type-checks the value and converts it to/from its wire form.
Messages validate themselves in `__post_init__`, so an instance that exists is valid, whether it
was built locally or decoded; decoding raises only MalformedMessage or BadTensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, ClassVar

import msgpack

from .errors import ErrorCode, MalformedMessage, ProtocolError, RemoteError
from .ids import MAX_FINGERPRINT_LENGTH, is_valid_fingerprint
from .tensors import DTYPES, MAX_ELEMENTS, TensorPayload

__all__ = [
    "ID_SIZE",
    "SIGNATURE_SIZE",
    "MAX_PEER_ID_SIZE",
    "MAX_NAME_LENGTH",
    "MAX_ERROR_MESSAGE_LENGTH",
    "MAX_UINT",
    "SERVER_STATES",
    "InfoRequest",
    "InfoResponse",
    "OpenSession",
    "SessionOpened",
    "InferenceStep",
    "PushTarget",
    "MAX_PUSH_HOPS",
    "MAX_PUSH_ADDR_LENGTH",
    "MAX_ADAPTERS",
    "StepResult",
    "CloseSession",
    "ForwardRequest",
    "ForwardResponse",
    "BackwardRequest",
    "BackwardResponse",
    "ErrorReply",
    "Message",
    "MESSAGE_TYPES",
    "encode_message",
    "decode_message",
    "error_reply",
    "unpack_strict",
]

ID_SIZE = 16  # session_id / request_id: 16 random bytes chosen by the client
SIGNATURE_SIZE = 64  # Ed25519
MAX_CERTIFICATE_SIZE = 1024  # a membership certificate's bound (petals_protocol.membership)
MAX_PEER_ID_SIZE = 128  # an Ed25519 identity peer id is 38 bytes; leave room for other key types
MAX_NAME_LENGTH = 256  # model names, public names, versions
MAX_ERROR_MESSAGE_LENGTH = 4096
MAX_UINT = 2**63 - 1  # ints travel as int64 so that torch and other implementations can hold them
# What a daemon is doing: joining (loading / announcing), online, draining (finishing sessions,
# taking no new ones), offline (announced on the way out).
SERVER_STATES = ("joining", "online", "draining", "offline")
# Containers in a message are tiny (a shape has <= 8 dims, a message ~16 fields); capping them far
# below the frame size keeps a 64 MiB frame of nils from expanding into a 512 MiB list.
_MAX_CONTAINER_LEN = 256
# Daemon-to-daemon forwarding (InferenceStep.push): a chain is at most this many further hops, and
# each names one dialable multiaddr of at most this many characters (same bound as DHT records).
MAX_PUSH_HOPS = 32
MAX_PUSH_ADDR_LENGTH = 256
# LoRA adapters one daemon announces (InfoResponse.adapters, ServerRecord.adapters).
MAX_ADAPTERS = 32


def _type_name(value: object) -> str:
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Field specs: check a Python value, convert to and from its wire form.
# `check` returns a description of the problem, or None when the value is fine.


class _Spec:
    def check(self, value: Any) -> str | None:
        raise NotImplementedError

    def to_wire(self, value: Any) -> Any:
        return value

    def from_wire(self, raw: Any) -> Any:
        return raw


@dataclass(frozen=True)
class _Bytes(_Spec):
    min_len: int
    max_len: int

    def check(self, value: Any) -> str | None:
        if type(value) is not bytes:
            return f"must be bytes, got {_type_name(value)}"
        if not self.min_len <= len(value) <= self.max_len:
            want = str(self.min_len) if self.min_len == self.max_len else f"{self.min_len}..{self.max_len}"
            return f"must be {want} bytes long, got {len(value)}"
        return None


@dataclass(frozen=True)
class _UInt(_Spec):
    minimum: int = 0

    def check(self, value: Any) -> str | None:
        if type(value) is not int:  # bool is an int subclass and is refused on purpose
            return f"must be an int, got {_type_name(value)}"
        if not self.minimum <= value <= MAX_UINT:
            return f"must be in [{self.minimum}, 2**63 - 1], got {value}"
        return None


@dataclass(frozen=True)
class _Float(_Spec):
    def check(self, value: Any) -> str | None:
        if type(value) is not float:
            return f"must be a float, got {_type_name(value)}"
        if not math.isfinite(value) or value < 0:
            return f"must be finite and >= 0, got {value}"
        return None

    def from_wire(self, raw: Any) -> Any:
        # Other implementations may send 3 for 3.0; accept ints (not bools) as floats.
        return float(raw) if type(raw) is int and abs(raw) <= 2**53 else raw


@dataclass(frozen=True)
class _Text(_Spec):
    max_len: int
    choices: tuple[str, ...] | None = None

    def check(self, value: Any) -> str | None:
        if type(value) is not str:
            return f"must be a str, got {_type_name(value)}"
        if len(value) > self.max_len:
            return f"must be at most {self.max_len} characters, got {len(value)}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        return None


class _Fingerprint(_Spec):
    def check(self, value: Any) -> str | None:
        if not is_valid_fingerprint(value):
            return f"must be a fingerprint (1..{MAX_FINGERPRINT_LENGTH} chars of [A-Za-z0-9._:+=-])"
        return None


class _Tensor(_Spec):
    def check(self, value: Any) -> str | None:
        return None if isinstance(value, TensorPayload) else f"must be a TensorPayload, got {_type_name(value)}"

    def to_wire(self, value: TensorPayload) -> Any:
        return value.to_wire()

    def from_wire(self, raw: Any) -> Any:
        return TensorPayload.from_wire(raw, max_elements=MAX_ELEMENTS)


class _Code(_Spec):
    _VALUES: ClassVar[dict[str, ErrorCode]] = {c.value: c for c in ErrorCode}

    def check(self, value: Any) -> str | None:
        return None if isinstance(value, ErrorCode) else f"must be an ErrorCode, got {value!r}"

    def to_wire(self, value: ErrorCode) -> Any:
        return value.value

    def from_wire(self, raw: Any) -> Any:
        # An unknown code is refused (the /1 protocol ids pin the code set), not mapped to INTERNAL.
        return self._VALUES.get(raw, raw) if isinstance(raw, str) else raw


@dataclass(frozen=True)
class _Optional(_Spec):
    inner: _Spec
    # A field added to a /1 message after peers shipped: left out of the wire when None, and its
    # absence accepted, so peers that predate it still decode our messages and we theirs.
    elidable: bool = False

    def check(self, value: Any) -> str | None:
        return None if value is None else self.inner.check(value)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def from_wire(self, raw: Any) -> Any:
        return None if raw is None else self.inner.from_wire(raw)


class _PushList(_Spec):
    """A non-empty tuple of `PushTarget`s whose spans follow each other (each starts where the
    previous ends); on the wire, a list of maps. Absent is None, never an empty list."""

    def check(self, value: Any) -> str | None:
        if type(value) is not tuple or not 1 <= len(value) <= MAX_PUSH_HOPS:
            return f"must be a tuple of 1..{MAX_PUSH_HOPS} PushTargets, got {_type_name(value)}"
        if not all(type(t) is PushTarget for t in value):
            return "entries must be PushTargets"
        for before, after in zip(value, value[1:]):
            if after.start_block != before.end_block:
                return f"hops must be contiguous, got [{before.start_block}, {before.end_block}) then " \
                       f"[{after.start_block}, {after.end_block})"
        return None

    def to_wire(self, value: tuple[PushTarget, ...]) -> Any:
        return [_fields_to_wire(t) for t in value]

    def from_wire(self, raw: Any) -> Any:
        # Structure problems raise here (the constructor cannot see a list of non-maps).
        if not isinstance(raw, (list, tuple)):
            raise MalformedMessage(f"push must be a list of maps, got {_type_name(raw)}")
        targets = []
        for item in raw:
            if not isinstance(item, dict):
                raise MalformedMessage(f"push entries must be maps, got {_type_name(item)}")
            targets.append(PushTarget(**_fields_from_wire(PushTarget, item, MalformedMessage)))
        return tuple(targets)


class _Names(_Spec):
    """A tuple of short names (adapter names a daemon serves), bounded in count and length."""

    def check(self, value: Any) -> str | None:
        if type(value) is not tuple or len(value) > MAX_ADAPTERS:
            return f"must be a tuple of at most {MAX_ADAPTERS} names, got {_type_name(value)}"
        if not all(type(n) is str and 0 < len(n) <= MAX_NAME_LENGTH for n in value):
            return f"entries must be non-empty strings of at most {MAX_NAME_LENGTH} characters"
        return None

    def from_wire(self, raw: Any) -> Any:
        return tuple(raw) if isinstance(raw, list) else raw


_ID = _Bytes(ID_SIZE, ID_SIZE)
_SIGNATURE = _Bytes(SIGNATURE_SIZE, SIGNATURE_SIZE)
_NAME = _Text(MAX_NAME_LENGTH)


def _f(spec: _Spec, **kwargs: Any) -> Any:
    """A dataclass field that carries its wire spec."""
    return field(metadata={"spec": spec}, **kwargs)


def _opt(spec: _Spec, *, elidable: bool = False) -> Any:
    return field(default=None, metadata={"spec": _Optional(spec, elidable)})


def _elidable(spec: _Spec) -> bool:
    return isinstance(spec, _Optional) and spec.elidable


@cache
def _specs_of(cls: type) -> tuple[tuple[str, _Spec], ...]:
    """(field name, spec) for each field of a dataclass built with `_f`/`_opt`, in order."""
    return tuple((f.name, f.metadata["spec"]) for f in fields(cls))


def _check_fields(obj: Any, error: type[ProtocolError]) -> None:
    """Raise `error` naming the first field whose value its spec refuses (shared with records.py)."""
    for name, spec in _specs_of(type(obj)):
        problem = spec.check(getattr(obj, name))
        if problem is not None:
            raise error(f"{type(obj).__name__}.{name} {problem}")  # type: ignore[call-arg]


def _fields_to_wire(obj: Any) -> dict[str, Any]:
    return {name: spec.to_wire(value) for name, spec in _specs_of(type(obj))
            if (value := getattr(obj, name)) is not None or not _elidable(spec)}


def _fields_from_wire(cls: type, obj: dict[Any, Any], error: type[ProtocolError], ignore: str = "") -> dict[str, Any]:
    """Constructor kwargs from a decoded map that must hold exactly cls's fields (plus `ignore`)."""
    specs = _specs_of(cls)
    expected = {name for name, _ in specs} | ({ignore} if ignore else set())
    required = expected - {name for name, spec in specs if _elidable(spec)}
    if not required <= obj.keys() <= expected:
        missing = sorted(required - obj.keys())
        extra = sorted(repr(k) for k in obj.keys() - expected)
        raise error(f"{cls.__name__}: missing fields {missing}, unexpected fields {extra}")  # type: ignore[call-arg]
    return {name: spec.from_wire(obj[name]) if name in obj else None for name, spec in specs}


# ---------------------------------------------------------------------------------------------
# Messages


class _Message:
    """Base: validates every field against its spec, then the message's cross-field rules."""

    __slots__ = ()
    TAG: ClassVar[str]

    def __post_init__(self) -> None:
        _check_fields(self, MalformedMessage)
        self._check()

    def _check(self) -> None:
        """Cross-field rules; overridden where a message has any."""

    def _require(self, ok: bool, what: str) -> None:
        if not ok:
            raise MalformedMessage(f"{type(self).__name__}: {what}")


def _check_span(msg: _Message, start_block: int, end_block: int) -> None:
    msg._require(start_block < end_block, f"empty or reversed span [{start_block}, {end_block})")


#: dtypes prompts may have (the same floating types as hidden states).
PROMPT_DTYPES = ("float32", "float16", "bfloat16")


def check_prompts(msg: _Message, prompts: TensorPayload | None, num_blocks: int | None = None) -> None:
    """Deep prompts are a float tensor [blocks, 1 or batch, K, hidden]: one prompt per block of the
    request, for its first K positions. Values (finite) and agreement with the hidden states are
    checked by the daemon, which knows its dtype and hidden size."""
    if prompts is None:
        return
    msg._require(prompts.dtype in PROMPT_DTYPES and len(prompts.shape) == 4 and min(prompts.shape) >= 1,
                 f"prompts must be a float tensor [blocks, batch, prefix, hidden], got "
                 f"{prompts.dtype}{list(prompts.shape)}")
    if num_blocks is not None:
        msg._require(prompts.shape[0] == num_blocks,
                     f"prompts hold {prompts.shape[0]} blocks, the request {num_blocks}")


@dataclass(frozen=True, slots=True)
class InfoRequest(_Message):
    """Ask a daemon what it serves (answered by InfoResponse on /petals/info/1)."""

    TAG: ClassVar[str] = "info_req"


@dataclass(frozen=True, slots=True)
class InfoResponse(_Message):
    """What a daemon serves, its limits and its load. `throughput`: tokens/s through its span."""

    TAG: ClassVar[str] = "info"
    peer_id: bytes = _f(_Bytes(1, MAX_PEER_ID_SIZE))
    version: str = _f(_NAME)
    model_name: str = _f(_NAME)
    model_fingerprint: str = _f(_Fingerprint())
    num_blocks: int = _f(_UInt())
    start_block: int = _f(_UInt())
    end_block: int = _f(_UInt())
    dtype: str = _f(_Text(16, tuple(DTYPES)))
    state: str = _f(_Text(16, SERVER_STATES))
    max_length: int = _f(_UInt())
    max_batch_size: int = _f(_UInt())
    max_sessions: int = _f(_UInt())
    active_sessions: int = _f(_UInt())
    cache_tokens_free: int = _f(_UInt())
    throughput: float = _f(_Float())
    public_name: str = _f(_NAME)
    # Resource limits a client plans with (elided when unset, e.g. by older daemons).
    max_sessions_per_peer: int | None = _opt(_UInt(), elidable=True)
    # LoRA adapters a client may select (`active_adapter`); elided when the daemon has none.
    adapters: tuple[str, ...] | None = _opt(_Names(), elidable=True)
    # The daemon's membership certificate (petals_protocol.membership), shown so that clients may
    # choose daemons by certificate issuer (`allowed_peers`); elided when it has none.
    certificate: bytes | None = _opt(_Bytes(1, MAX_CERTIFICATE_SIZE), elidable=True)

    def _check(self) -> None:
        # An empty span is allowed while joining (blocks not chosen yet).
        self._require(
            self.start_block <= self.end_block <= self.num_blocks,
            f"span [{self.start_block}, {self.end_block}) not within {self.num_blocks} blocks",
        )


@dataclass(frozen=True, slots=True)
class OpenSession(_Message):
    """Start an inference session over [start_block, end_block) (a sub-span of the daemon's is fine)."""

    TAG: ClassVar[str] = "open"
    session_id: bytes = _f(_ID)
    model_fingerprint: str = _f(_Fingerprint())
    start_block: int = _f(_UInt())
    end_block: int = _f(_UInt())
    max_length: int = _f(_UInt(minimum=1))
    batch_size: int = _f(_UInt(minimum=1))
    # Fine-tuning fields (elided when absent, for peers that predate them): the LoRA adapter the
    # session's steps run with (one of the daemon's announced `adapters`).
    active_adapter: str | None = _opt(_NAME, elidable=True)

    def _check(self) -> None:
        _check_span(self, self.start_block, self.end_block)


@dataclass(frozen=True, slots=True)
class SessionOpened(_Message):
    TAG: ClassVar[str] = "opened"
    session_id: bytes = _f(_ID)
    max_length: int = _f(_UInt(minimum=1))


@dataclass(frozen=True, slots=True)
class PushTarget(_Message):
    """The next hop a daemon forwards a step's output to (an entry of `InferenceStep.push`).

    Not a message of its own (no tag): a nested record. `peer_id` is the next daemon's peer id
    (bytes), `addr` a multiaddr it can be dialled at (ending in /p2p/<that peer id>; the daemon
    checks they agree), `session_id` the session the client opened there, [start_block, end_block)
    that session's blocks, `step` the step number the client expects that hop to answer.
    """

    peer_id: bytes = _f(_Bytes(1, MAX_PEER_ID_SIZE))
    addr: str = _f(_Text(MAX_PUSH_ADDR_LENGTH))
    session_id: bytes = _f(_ID)
    start_block: int = _f(_UInt())
    end_block: int = _f(_UInt())
    step: int = _f(_UInt())

    def _check(self) -> None:
        _check_span(self, self.start_block, self.end_block)
        self._require(self.addr.startswith("/"), f"addr must be a multiaddr, got {self.addr[:40]!r}")


@dataclass(frozen=True, slots=True)
class InferenceStep(_Message):
    """One step: `position` = tokens already in the cache it builds on (smaller rolls back).

    `hypo_ids` (1-D integer tensor, optional) reorders the batch's cache rows first (beam search).

    `push` (optional): daemon-to-daemon forwarding. The daemon answers the client as usual, and
    also sends `InferenceStep(push[0].session_id, push[0].step, position, <its output>, hypo_ids,
    push[1:])` to the daemon `push[0]` names, whose answer goes to the client on the client's own
    stream with that daemon. `push[0].start_block` must equal the end of this session's blocks.
    """

    TAG: ClassVar[str] = "step"
    session_id: bytes = _f(_ID)
    step: int = _f(_UInt())
    position: int = _f(_UInt())
    hidden: TensorPayload = _f(_Tensor())
    hypo_ids: TensorPayload | None = _opt(_Tensor())
    push: tuple[PushTarget, ...] | None = _opt(_PushList(), elidable=True)
    # Deep prompt tuning: [blocks of the session, 1 or batch, K, hidden], added to the hidden
    # states of sequence positions [0, K) at the input of each block (see `check_prompts`).
    prompts: TensorPayload | None = _opt(_Tensor(), elidable=True)

    def _check(self) -> None:
        check_prompts(self, self.prompts)
        self._require(self.prompts is None or self.push is None, "a step with prompts cannot be pushed")
        if self.hypo_ids is not None:
            self._require(
                self.hypo_ids.dtype in ("int64", "int32") and len(self.hypo_ids.shape) == 1,
                f"hypo_ids must be a 1-D int tensor, got {self.hypo_ids.dtype}{list(self.hypo_ids.shape)}",
            )


@dataclass(frozen=True, slots=True)
class StepResult(_Message):
    TAG: ClassVar[str] = "result"
    session_id: bytes = _f(_ID)
    step: int = _f(_UInt())
    position: int = _f(_UInt())
    hidden: TensorPayload = _f(_Tensor())
    signature: bytes = _f(_SIGNATURE)


#: Pushed steps whose hidden states are at least this many bytes are confirmed with `PushLanded`.
PUSH_LANDED_FROM = 64 * 1024


@dataclass(frozen=True, slots=True)
class PushLanded(_Message):
    """A daemon's word on a push stream that a pushed step of at least `PUSH_LANDED_FROM` bytes of
    hidden states (a prefill) has arrived whole (`session_id`, `step`: the step as pushed, i.e. the
    receiving daemon's session). The pushing daemon answers its client with the same bytes only
    then: sent together, the answer and the push share the pusher's uplink and the push, which is
    the chain's critical path, crosses at part of the rate (pushed decode steps are small and not
    confirmed)."""

    TAG: ClassVar[str] = "landed"
    session_id: bytes = _f(_ID)
    step: int = _f(_UInt())


def confirms_landing(step: InferenceStep) -> bool:
    """Whether a pushed step is confirmed with `PushLanded`: the rule both daemons of a push apply
    (the pusher waits for what the receiver sends)."""
    return len(step.hidden.data) >= PUSH_LANDED_FROM


@dataclass(frozen=True, slots=True)
class CloseSession(_Message):
    TAG: ClassVar[str] = "close"
    session_id: bytes = _f(_ID)


@dataclass(frozen=True, slots=True)
class ForwardRequest(_Message):
    TAG: ClassVar[str] = "fwd"
    request_id: bytes = _f(_ID)
    model_fingerprint: str = _f(_Fingerprint())
    start_block: int = _f(_UInt())
    end_block: int = _f(_UInt())
    hidden: TensorPayload = _f(_Tensor())
    # Fine-tuning (elided when absent): deep prompts as in InferenceStep, and a LoRA adapter.
    prompts: TensorPayload | None = _opt(_Tensor(), elidable=True)
    active_adapter: str | None = _opt(_NAME, elidable=True)

    def _check(self) -> None:
        _check_span(self, self.start_block, self.end_block)
        check_prompts(self, self.prompts, self.end_block - self.start_block)


@dataclass(frozen=True, slots=True)
class ForwardResponse(_Message):
    TAG: ClassVar[str] = "fwd_res"
    request_id: bytes = _f(_ID)
    hidden: TensorPayload = _f(_Tensor())
    signature: bytes = _f(_SIGNATURE)


@dataclass(frozen=True, slots=True)
class BackwardRequest(_Message):
    TAG: ClassVar[str] = "bwd"
    request_id: bytes = _f(_ID)
    model_fingerprint: str = _f(_Fingerprint())
    start_block: int = _f(_UInt())
    end_block: int = _f(_UInt())
    hidden: TensorPayload = _f(_Tensor())
    grad_output: TensorPayload = _f(_Tensor())
    prompts: TensorPayload | None = _opt(_Tensor(), elidable=True)
    active_adapter: str | None = _opt(_NAME, elidable=True)

    def _check(self) -> None:
        _check_span(self, self.start_block, self.end_block)
        check_prompts(self, self.prompts, self.end_block - self.start_block)


@dataclass(frozen=True, slots=True)
class BackwardResponse(_Message):
    TAG: ClassVar[str] = "bwd_res"
    request_id: bytes = _f(_ID)
    grad_input: TensorPayload = _f(_Tensor())
    signature: bytes = _f(_SIGNATURE)
    # The gradient w.r.t. the request's `prompts` (same shape), present exactly when they were.
    grad_prompts: TensorPayload | None = _opt(_Tensor(), elidable=True)


@dataclass(frozen=True, slots=True)
class ErrorReply(_Message):
    """A request failed on the daemon's side; names the session or request it concerns, if any."""

    TAG: ClassVar[str] = "error"
    code: ErrorCode = _f(_Code())
    message: str = _f(_Text(MAX_ERROR_MESSAGE_LENGTH))
    session_id: bytes | None = _opt(_ID)
    request_id: bytes | None = _opt(_ID)

    def to_exception(self, peer: str | None = None) -> RemoteError:
        """The exception to raise on the receiving side (`peer`: the sender's peer id text)."""
        return RemoteError(self.code, self.message, peer)


Message = (
    InfoRequest
    | InfoResponse
    | OpenSession
    | SessionOpened
    | InferenceStep
    | StepResult
    | PushLanded
    | CloseSession
    | ForwardRequest
    | ForwardResponse
    | BackwardRequest
    | BackwardResponse
    | ErrorReply
)
MESSAGE_TYPES: tuple[type[_Message], ...] = Message.__args__  # type: ignore[attr-defined]

_TAG_KEY = "t"
_BY_TAG: dict[str, type[_Message]] = {cls.TAG: cls for cls in MESSAGE_TYPES}


def encode_message(msg: Message) -> bytes:
    """The msgpack payload of one frame (pass it to `encode_frame`).

    A tensor's data is not packed again here: its payload's `packed()` bytes are joined after the
    message's other entries (a map's entries may come in any order; the tag stays first), so an
    output sent in two messages (a pushing daemon's, to the next daemon and to the client) is
    serialized once, and a large one is never copied through msgpack's growing buffer."""
    if type(msg) not in MESSAGE_TYPES:
        raise TypeError(f"not a message: {_type_name(msg)}")
    plain: dict[str, Any] = {_TAG_KEY: msg.TAG}
    tensors: list[tuple[str, TensorPayload]] = []
    for name, spec in _specs_of(type(msg)):
        value = getattr(msg, name)
        if type(value) is TensorPayload:
            tensors.append((name, value))
        elif value is not None or not _elidable(spec):
            plain[name] = spec.to_wire(value)
    head = msgpack.packb(plain, use_bin_type=True)
    if not tensors:
        return head
    parts = [_map_header(len(plain) + len(tensors)), head[len(_map_header(len(plain))):]]
    for name, value in tensors:
        parts += (_packed_key(name), value.packed())
    return b"".join(parts)


@cache
def _packed_key(name: str) -> bytes:
    return msgpack.packb(name, use_bin_type=True)


def _map_header(n: int) -> bytes:
    """The msgpack map header for `n` entries (fixmap, map16 or map32)."""
    if n <= 15:
        return bytes((0x80 | n,))
    if n <= 0xFFFF:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


#: Bytes of a payload's start that always hold its tag (map header, "t", a tag of <= 31 chars).
TAG_PREFIX_SIZE = 40


def peek_tag(prefix: bytes) -> str | None:
    """The message tag a payload starts with, from its first bytes alone (`encode_message` writes
    the tag first): lets a receiver refuse a large frame of the wrong type before buffering its
    body. None if the prefix does not start like a message."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(prefix) + 1)
    unpacker.feed(prefix)
    try:
        unpacker.read_map_header()
        key = unpacker.unpack()
        tag = unpacker.unpack()
    except Exception:  # noqa: BLE001 - msgpack raises many types on garbage (or OutOfData when cut)
        return None
    return tag if key == _TAG_KEY and isinstance(tag, str) else None


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack extension type {code} is not allowed")


def unpack_strict(payload: bytes, *, max_container_len: int = _MAX_CONTAINER_LEN) -> Any:
    """msgpack-decode one object with the limits every decoder here uses; only MalformedMessage escapes.

    Refuses ext types, non-str/bytes map keys, trailing bytes and containers longer than
    `max_container_len`; strings and binaries are bounded by the payload itself.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"payload must be bytes, got {_type_name(payload)}")
    n = len(payload)
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=False,
            ext_hook=_reject_ext,
            timestamp=0,
            max_bin_len=n,
            max_str_len=n,
            max_ext_len=0,
            max_array_len=max_container_len,
            max_map_len=max_container_len,
        )
    except MalformedMessage:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError, OutOfData-like limits, bad UTF-8.
        raise MalformedMessage(f"not a valid msgpack object ({type(exc).__name__}: {exc})") from exc


def decode_message(payload: bytes) -> Message:
    """Parse one frame's payload; raises MalformedMessage or BadTensor, nothing else."""
    obj = unpack_strict(payload)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"message must be a map, got {_type_name(obj)}")
    tag = obj.get(_TAG_KEY)
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown message tag {tag!r}")
    return cls(**_fields_from_wire(cls, obj, MalformedMessage, ignore=_TAG_KEY))  # type: ignore[return-value]


def error_reply(
    problem: BaseException | ErrorCode, message: str | None = None, *,
    session_id: bytes | None = None, request_id: bytes | None = None,
) -> ErrorReply:
    """The ErrorReply that reports `problem` to the peer (the one place replies are built).

    An ErrorCode with `message`: exactly that. ProtocolError and RemoteError keep their code and
    message; another exception that carries an ErrorCode `code` (a typed refusal: a timeout, a
    limit) keeps that code and its text; anything else is INTERNAL with the exception's type and
    text, so the caller learns it was not its fault. `message` replaces the text (a daemon hides a
    bug's details from peers). Messages are cut at MAX_ERROR_MESSAGE_LENGTH.
    """
    if isinstance(problem, ErrorCode):
        code, text = problem, message or problem.value
    elif isinstance(problem, (ProtocolError, RemoteError)):
        code, text = problem.code, message or problem.message
    elif isinstance(getattr(problem, "code", None), ErrorCode):
        code, text = problem.code, message or str(problem)  # type: ignore[attr-defined]
    else:
        code, text = ErrorCode.INTERNAL, message or f"{type(problem).__name__}: {problem}"
    return ErrorReply(code, text[:MAX_ERROR_MESSAGE_LENGTH], session_id, request_id)
