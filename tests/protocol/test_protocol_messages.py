"""Messages: round trips of every type, the wire layout, and the type/range rules on decode."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from protocol_samples import FINGERPRINT, REQUEST_ID, SESSION_ID, SIGNATURE, hidden, sample_messages

from petals_protocol import (
    MESSAGE_TYPES,
    BadTensor,
    ErrorCode,
    ErrorReply,
    FrameDecoder,
    InferenceStep,
    MalformedMessage,
    OpenSession,
    PetalsError,
    ProtocolError,
    RemoteError,
    decode_message,
    encode_frame,
    encode_message,
    error_reply,
)


def test_every_message_type_is_sampled() -> None:
    assert {type(m) for m in sample_messages()} == set(MESSAGE_TYPES)
    assert len({cls.TAG for cls in MESSAGE_TYPES}) == len(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    payload = encode_message(msg)  # type: ignore[arg-type]
    assert decode_message(payload) == msg
    # and through a frame stream
    decoder = FrameDecoder()
    decoder.feed(encode_frame(payload) * 2)
    assert decode_message(decoder.next_frame()) == msg  # type: ignore[arg-type]
    assert decode_message(decoder.next_frame()) == msg  # type: ignore[arg-type]


def test_wire_layout_is_a_tagged_map_with_explicit_optionals() -> None:
    msg = InferenceStep(SESSION_ID, step=1, position=2, hidden=hidden())
    wire = msgpack.unpackb(encode_message(msg))
    assert wire == {
        "t": "step",
        "session_id": SESSION_ID,
        "step": 1,
        "position": 2,
        "hidden": hidden().to_wire(),
        "hypo_ids": None,
    }


def mutate(msg: object, **changes: object) -> bytes:
    """Encode `msg` with some wire fields replaced (bypassing local validation)."""
    wire = msgpack.unpackb(encode_message(msg))  # type: ignore[arg-type]
    wire.update(changes)
    return msgpack.packb(wire, use_bin_type=True)


OPEN = OpenSession(SESSION_ID, FINGERPRINT, 2, 5, max_length=256, batch_size=1)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"session_id": SESSION_ID[:15]}, "16 bytes"),
        ({"session_id": SESSION_ID + b"\x00"}, "16 bytes"),
        ({"session_id": SESSION_ID.hex()}, "bytes"),
        ({"start_block": True}, "int"),
        ({"start_block": -1}, "range|\\[0"),
        ({"start_block": 2**63}, "range|\\[0"),
        ({"start_block": 2.0}, "int"),
        ({"end_block": 2}, "span"),
        ({"end_block": 1}, "span"),
        ({"max_length": 0}, "\\[1"),
        ({"batch_size": None}, "int"),
        ({"model_fingerprint": "a/b"}, "fingerprint"),
        ({"model_fingerprint": ""}, "fingerprint"),
        ({"model_fingerprint": b"abc"}, "fingerprint"),
        ({"t": "nope"}, "unknown message tag"),
        ({"t": 1}, "unknown message tag"),
        ({"extra": 1}, "unexpected fields"),
    ],
)
def test_decode_rejects_bad_fields(changes: dict[str, object], match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_message(mutate(OPEN, **changes))


def test_decode_rejects_missing_field() -> None:
    wire = msgpack.unpackb(encode_message(OPEN))
    del wire["batch_size"]
    with pytest.raises(MalformedMessage, match="missing fields \\['batch_size'\\]"):
        decode_message(msgpack.packb(wire))


def test_optional_fields_must_be_present_on_the_wire() -> None:
    wire = msgpack.unpackb(encode_message(InferenceStep(SESSION_ID, 0, 0, hidden())))
    del wire["hypo_ids"]
    with pytest.raises(MalformedMessage, match="hypo_ids"):
        decode_message(msgpack.packb(wire))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\x01\x02", msgpack.packb({"t": "close"}) + b"\x00", b"\xa3abc"],
)
def test_decode_rejects_non_messages(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_message(payload)


def test_decode_rejects_ext_types_and_deep_nesting() -> None:
    ext = msgpack.packb({"t": "close", "session_id": msgpack.ExtType(5, b"x" * 16)})
    with pytest.raises(MalformedMessage):
        decode_message(ext)
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(MalformedMessage):
        decode_message(deep)


def test_bad_tensor_surfaces_as_bad_tensor() -> None:
    step = InferenceStep(SESSION_ID, 0, 0, hidden())
    bad = {"dtype": "float32", "shape": [1, 3, 4], "data": b"\x00" * 47}
    with pytest.raises(BadTensor):
        decode_message(mutate(step, hidden=bad))
    with pytest.raises(MalformedMessage, match="1-D int tensor"):
        decode_message(mutate(step, hypo_ids=hidden().to_wire()))


def test_floats_accept_ints_but_not_nan_or_negative() -> None:
    info = next(m for m in sample_messages() if type(m).__name__ == "InfoResponse")
    assert decode_message(mutate(info, throughput=3)).throughput == 3.0  # type: ignore[union-attr]
    for bad in (float("nan"), float("inf"), -1.0, True, "3"):
        with pytest.raises(MalformedMessage, match="throughput"):
            decode_message(mutate(info, throughput=bad))
    with pytest.raises(MalformedMessage, match="state"):
        decode_message(mutate(info, state="sleeping"))
    with pytest.raises(MalformedMessage, match="span"):
        decode_message(mutate(info, end_block=9))


def test_local_construction_is_validated() -> None:
    with pytest.raises(MalformedMessage):
        OpenSession(SESSION_ID[:3], FINGERPRINT, 0, 1, 1, 1)
    with pytest.raises(MalformedMessage):
        ErrorReply("busy", "x")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        OPEN.max_length = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        encode_message(object())  # type: ignore[arg-type]


def test_error_codes_round_trip_and_unknown_code_is_refused() -> None:
    for code in ErrorCode:
        reply = ErrorReply(code, "m", None, REQUEST_ID)
        assert decode_message(encode_message(reply)) == reply
    with pytest.raises(MalformedMessage, match="ErrorCode"):
        decode_message(mutate(ErrorReply(ErrorCode.BUSY, "m"), code="teapot"))


def test_error_reply_helper_and_remote_error() -> None:
    reply = error_reply(BadTensor("shape mismatch"), session_id=SESSION_ID)
    assert (reply.code, reply.message, reply.session_id, reply.request_id) == (
        ErrorCode.BAD_TENSOR,
        "shape mismatch",
        SESSION_ID,
        None,
    )
    internal = error_reply(KeyError("boom" * 2000), request_id=REQUEST_ID)
    assert internal.code is ErrorCode.INTERNAL and internal.message.startswith("KeyError")
    assert len(internal.message) == 4096
    passed_on = error_reply(RemoteError(ErrorCode.BUSY, "full", "12D3KooW"))
    assert passed_on.code is ErrorCode.BUSY and passed_on.message == "full"
    # A code and a message (the daemon's own refusals), a typed error that carries a code, and a
    # bug whose details the daemon hides: every reply a daemon sends is built here.
    said = error_reply(ErrorCode.TIMEOUT, "session idle for 300 s; closed", session_id=SESSION_ID)
    assert (said.code, said.message, said.session_id) == (ErrorCode.TIMEOUT, "session idle for 300 s; closed", SESSION_ID)

    class Waited(PetalsError):
        code = ErrorCode.TIMEOUT

    assert error_reply(Waited("no turn within 60 s")) == ErrorReply(ErrorCode.TIMEOUT, "no turn within 60 s")
    hidden = error_reply(ValueError("secret path /x"), "internal error in the daemon")
    assert (hidden.code, hidden.message) == (ErrorCode.INTERNAL, "internal error in the daemon")
    assert len(error_reply(ErrorCode.BAD_REQUEST, "x" * 5000).message) == 4096

    exc = reply.to_exception(peer="12D3KooWabc")
    assert isinstance(exc, RemoteError) and not isinstance(exc, ProtocolError)
    assert (exc.code, exc.message, exc.peer) == (ErrorCode.BAD_TENSOR, "shape mismatch", "12D3KooWabc")
    assert "bad_tensor from 12D3KooWabc: shape mismatch" in str(exc)


def test_signature_length_is_checked() -> None:
    result = next(m for m in sample_messages() if type(m).__name__ == "StepResult")
    with pytest.raises(MalformedMessage, match="64 bytes"):
        decode_message(mutate(result, signature=SIGNATURE[:63]))


# ------------------------------------------------------------------------ InferenceStep.push

def _pushed_step() -> InferenceStep:
    from protocol_samples import push_targets

    return InferenceStep(SESSION_ID, step=2, position=5, hidden=hidden(), push=push_targets())


def test_push_is_left_out_of_the_wire_when_absent_and_may_be_missing() -> None:
    plain = InferenceStep(SESSION_ID, step=1, position=2, hidden=hidden())
    wire = msgpack.unpackb(encode_message(plain))
    assert "push" not in wire  # peers that predate push decode it as before
    assert decode_message(msgpack.packb({**wire, "push": None})) == plain  # explicit nil is fine too
    with pytest.raises(MalformedMessage, match="missing fields \\['hypo_ids'\\]"):
        decode_message(msgpack.packb({k: v for k, v in wire.items() if k != "hypo_ids"}))


def test_push_wire_layout_is_a_list_of_maps() -> None:
    step = _pushed_step()
    wire = msgpack.unpackb(encode_message(step))
    assert [sorted(entry) for entry in wire["push"]] == [
        ["addr", "end_block", "peer_id", "session_id", "start_block", "step"]
    ] * 2
    assert wire["push"][0]["session_id"] == step.push[0].session_id  # type: ignore[index]
    assert decode_message(encode_message(step)) == step


def _push_entry(msg: InferenceStep, index: int, changes: dict[str, object]) -> list[dict[str, object]]:
    entries = msgpack.unpackb(encode_message(msg))["push"]
    entries[index].update(changes)
    return entries


@pytest.mark.parametrize(
    "index, changes, match",
    [
        (0, {"session_id": SESSION_ID[:15]}, "16 bytes"),
        (0, {"peer_id": b""}, "peer_id"),
        (0, {"addr": "ip4/127.0.0.1"}, "multiaddr"),
        (0, {"addr": "/" + "a" * 300}, "at most 256"),
        (0, {"end_block": 5}, "span"),
        (1, {"start_block": 6}, "contiguous"),
        (1, {"step": -1}, "range|\\[0"),
        (0, {"extra": 1}, "unexpected fields"),
    ],
)
def test_push_entries_are_validated(index: int, changes: dict[str, object], match: str) -> None:
    step = _pushed_step()
    with pytest.raises(MalformedMessage, match=match):
        decode_message(mutate(step, push=_push_entry(step, index, changes)))


@pytest.mark.parametrize("bad", [[], "x", 7, [1, 2], {"addr": "/x"}, [None]])
def test_push_must_be_a_non_empty_list_of_maps_or_nil(bad: object) -> None:
    with pytest.raises(MalformedMessage, match="push"):
        decode_message(mutate(_pushed_step(), push=bad))


def test_push_is_bounded_in_length() -> None:
    step = _pushed_step()
    first = msgpack.unpackb(encode_message(step))["push"][0]
    chain = [dict(first, start_block=i, end_block=i + 1) for i in range(40)]
    with pytest.raises(MalformedMessage, match="1..32"):
        decode_message(mutate(step, push=chain))
    assert len(decode_message(mutate(step, push=chain[:32])).push) == 32  # type: ignore[union-attr, arg-type]


def test_push_built_locally_is_checked_too() -> None:
    targets = _pushed_step().push
    assert targets is not None
    with pytest.raises(MalformedMessage, match="contiguous"):
        InferenceStep(SESSION_ID, 0, 0, hidden(), push=(targets[1], targets[0]))
    with pytest.raises(MalformedMessage, match="tuple"):
        InferenceStep(SESSION_ID, 0, 0, hidden(), push=list(targets))  # type: ignore[arg-type]
