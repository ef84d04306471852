"""Property-based fuzzing of every decoder: hostile bytes may only ever raise typed ProtocolErrors.

Inputs are random bytes and mutated valid encodings (bit flips, truncations, insertions, and
structural edits of the decoded map: dropped, added, swapped and retyped fields, changed tags).
Any exception other than the documented ProtocolError subclass fails the test, as does a decoded
message that does not re-encode to itself.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_samples import SEED, sample_messages, sample_record

from petals_protocol import (
    BadRecord,
    BadTensor,
    FrameDecoder,
    FrameTooLarge,
    MalformedMessage,
    TensorPayload,
    decode_message,
    decode_record,
    encode_message,
    encode_record,
    private_key_from_seed,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0
MESSAGES = sample_messages()
MESSAGE_BLOBS = [encode_message(m) for m in MESSAGES]
RECORD_BLOB = encode_record(private_key_from_seed(SEED), sample_record(NOW))

# Any msgpack-encodable value, including the types our fields use and the ones they must refuse.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.binary(max_size=48)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def check_message_decode(payload: bytes) -> None:
    try:
        msg = decode_message(payload)
    except (MalformedMessage, BadTensor):
        return
    assert decode_message(encode_message(msg)) == msg


def check_record_decode(blob: bytes) -> None:
    try:
        decode_record(blob, now=NOW)
    except BadRecord:
        pass


@st.composite
def byte_mutations(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "overwrite" and data:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def structural_mutations(draw: st.DrawFn, obj: dict[str, Any]) -> dict[str, Any]:
    obj = dict(obj)
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(obj, key=repr)
        kind = draw(st.sampled_from(["drop", "add", "swap", "retype", "tag", "tensor"]))
        if kind == "drop" and keys:
            del obj[draw(st.sampled_from(keys))]
        elif kind == "add":
            obj[draw(st.text(max_size=12))] = draw(values)
        elif kind == "swap" and len(keys) >= 2:
            a, b = draw(st.sampled_from(keys)), draw(st.sampled_from(keys))
            obj[a], obj[b] = obj[b], obj[a]
        elif kind == "retype" and keys:
            obj[draw(st.sampled_from(keys))] = draw(values)
        elif kind == "tag":
            obj["t"] = draw(st.sampled_from(["info", "open", "step", "error", "bogus", ""]) | values)
        elif kind == "tensor":
            tensors = [k for k in keys if isinstance(obj[k], dict)]
            if tensors:
                name = draw(st.sampled_from(tensors))
                obj[name] = draw(tensor_mutations(obj[name]))
    return obj


@st.composite
def tensor_mutations(draw: st.DrawFn, wire: dict[str, Any]) -> dict[str, Any]:
    wire = dict(wire)
    field = draw(st.sampled_from(["dtype", "shape", "data", "extra", "drop"]))
    if field == "dtype":
        names = ["float32", "float16", "bfloat16", "int64", "int32", "bool", "float64"]
        wire["dtype"] = draw(st.sampled_from(names) | values)
    elif field == "shape":
        wire["shape"] = draw(st.lists(st.integers(-3, 2**40) | st.booleans() | values, max_size=10) | values)
    elif field == "data":
        wire["data"] = draw(st.binary(max_size=128) | values)
    elif field == "extra":
        wire[draw(st.text(max_size=6))] = draw(values)
    elif wire:
        del wire[draw(st.sampled_from(sorted(wire, key=repr)))]
    return wire


# --- messages -------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_decode_message_random_bytes(payload: bytes) -> None:
    check_message_decode(payload)


@FUZZ
@given(st.sampled_from(MESSAGE_BLOBS).flatmap(byte_mutations))
def test_decode_message_byte_mutations(payload: bytes) -> None:
    check_message_decode(payload)


@FUZZ
@given(st.sampled_from(MESSAGE_BLOBS).map(msgpack.unpackb).flatmap(structural_mutations))
def test_decode_message_structural_mutations(obj: dict[str, Any]) -> None:
    check_message_decode(msgpack.packb(obj, use_bin_type=True))


@FUZZ
@given(values)
def test_decode_message_any_msgpack_value(value: Any) -> None:
    check_message_decode(msgpack.packb(value, use_bin_type=True))


# --- tensors --------------------------------------------------------------------------------


TENSOR_WIRES = [TensorPayload("float32", (2, 3), bytes(24)).to_wire(), TensorPayload("bool", (0, 5), b"").to_wire()]


@FUZZ
@given(st.sampled_from(TENSOR_WIRES).flatmap(tensor_mutations) | values)
def test_tensor_from_wire(obj: Any) -> None:
    try:
        payload = TensorPayload.from_wire(obj)
    except BadTensor:
        return
    assert TensorPayload.from_wire(payload.to_wire()) == payload


# --- records --------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=1024) | byte_mutations(RECORD_BLOB))
def test_decode_record_bytes(blob: bytes) -> None:
    check_record_decode(blob)


@FUZZ
@given(structural_mutations(msgpack.unpackb(msgpack.unpackb(RECORD_BLOB)["record"])), st.booleans())
def test_decode_record_structural_mutations(body: dict[str, Any], keep_signature: bool) -> None:
    outer = msgpack.unpackb(RECORD_BLOB)
    raw = msgpack.packb(body, use_bin_type=True)
    # re-signing gets the mutation past the signature check, so the field rules are exercised too
    sig = outer["sig"] if keep_signature else private_key_from_seed(SEED).sign(b"petals/record/1\n" + raw)
    check_record_decode(msgpack.packb({"record": raw, "sig": sig}, use_bin_type=True))


@FUZZ
@given(structural_mutations(msgpack.unpackb(RECORD_BLOB)))
def test_decode_record_outer_mutations(outer: dict[str, Any]) -> None:
    check_record_decode(msgpack.packb(outer, use_bin_type=True))


# --- framing --------------------------------------------------------------------------------


def reference_frames(stream: bytes, limit: int) -> tuple[list[bytes], type[Exception] | None]:
    """The obvious non-incremental parse of a whole stream, to compare the decoder against."""
    frames, at = [], 0
    while len(stream) - at >= 4:
        (length,) = struct.unpack_from(">I", stream, at)
        if length > limit:
            return frames, FrameTooLarge
        if len(stream) - at - 4 < length:
            break
        frames.append(stream[at + 4 : at + 4 + length])
        at += 4 + length
    return frames, (MalformedMessage if at < len(stream) else None)


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            payload = draw(st.binary(max_size=40))
            parts.append(struct.pack(">I", len(payload)) + payload)
        else:
            parts.append(draw(st.binary(max_size=12)))
    return b"".join(parts)


@FUZZ
@given(frame_streams(), st.lists(st.integers(1, 16), max_size=30), st.integers(0, 48))
def test_frame_decoder_matches_reference(stream: bytes, chunk_sizes: list[int], limit: int) -> None:
    expected, expected_error = reference_frames(stream, limit)
    decoder = FrameDecoder(max_frame_size=limit)
    got: list[bytes] = []
    error: type[Exception] | None = None
    at = 0
    try:
        for size in [*chunk_sizes, len(stream)]:
            decoder.feed(stream[at : at + size])
            at += size
            while (frame := decoder.next_frame()) is not None:
                got.append(frame)
        decoder.eof()
    except (FrameTooLarge, MalformedMessage) as exc:
        error = type(exc)
    assert got == expected[: len(got)]
    if error is None:
        assert got == expected and expected_error is None
    else:
        assert error is expected_error
