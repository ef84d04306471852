"""Serialize once: a payload's msgpack form and digest are made once and reused; a message is the
same msgpack map as packing it whole (peers that pack it whole, or decode it, see no change)."""
from __future__ import annotations

import os

import msgpack
import pytest

import petals_protocol.tensors as tensors
from petals_protocol.messages import (
    BackwardResponse,
    ForwardRequest,
    InferenceStep,
    TAG_PREFIX_SIZE,
    PushTarget,
    StepResult,
    _fields_to_wire,
    _map_header,
    decode_message,
    encode_message,
    peek_tag,
)
from petals_protocol.tensors import TensorPayload

FINGERPRINT = "sha256:" + "ab" * 32


def payload(n: int = 8, fill: int = 1) -> TensorPayload:
    return TensorPayload("float32", (1, 1, n), bytes([fill]) * (4 * n))


def whole_map(msg: object) -> bytes:
    """The reference encoding: the whole map packed in one call (what encode_message did before)."""
    return msgpack.packb({"t": msg.TAG, **_fields_to_wire(msg)}, use_bin_type=True)  # type: ignore[attr-defined]


def messages() -> list[object]:
    sid = os.urandom(16)
    target = PushTarget(peer_id=b"\x00\x24" + b"p" * 36, addr="/ip4/127.0.0.1/tcp/1/p2p/x", session_id=sid,
                        start_block=2, end_block=4, step=3)
    hypo = TensorPayload("int64", (2,), bytes(16))
    prompts = TensorPayload("float32", (2, 1, 3, 8), bytes(4 * 48))
    return [
        InferenceStep(session_id=sid, step=0, position=0, hidden=payload(), hypo_ids=None),
        InferenceStep(session_id=sid, step=1, position=5, hidden=payload(), hypo_ids=hypo, push=(target,)),
        InferenceStep(session_id=sid, step=1, position=0, hidden=payload(), hypo_ids=None, prompts=prompts),
        StepResult(session_id=sid, step=7, position=9, hidden=payload(4096), signature=b"s" * 64),
        ForwardRequest(request_id=sid, model_fingerprint=FINGERPRINT, start_block=0, end_block=2,
                       hidden=payload(), prompts=prompts, active_adapter="lora"),
        BackwardResponse(request_id=sid, grad_input=payload(), signature=b"s" * 64),
        BackwardResponse(request_id=sid, grad_input=payload(), signature=b"s" * 64, grad_prompts=prompts),
    ]


@pytest.mark.parametrize("msg", messages(), ids=lambda m: type(m).__name__)
def test_spliced_encoding_is_the_whole_map(msg: object) -> None:
    """The same map as packing it whole (tensors last: a map's order carries nothing), tag first."""
    encoded = encode_message(msg)  # type: ignore[arg-type]
    assert msgpack.unpackb(encoded) == msgpack.unpackb(whole_map(msg))
    assert peek_tag(encoded[:TAG_PREFIX_SIZE]) == msg.TAG  # type: ignore[attr-defined]
    assert decode_message(encoded) == msg
    assert decode_message(whole_map(msg)) == msg  # what peers that pack the whole map send


@pytest.mark.parametrize("n", [0, 1, 15, 16, 0xFFFF, 0x10000])
def test_map_header_is_msgpacks(n: int) -> None:
    items = {i: None for i in range(n)}
    body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in items.items())
    assert msgpack.packb(items) == _map_header(n) + body


def test_an_output_sent_twice_is_packed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pushing daemon's output goes to the next daemon and to the client: its data is put into
    msgpack once, and both frames carry those bytes."""
    packs = []
    original = TensorPayload.to_wire
    monkeypatch.setattr(TensorPayload, "to_wire", lambda self: packs.append(self) or original(self))
    output = payload(1024)
    sid = os.urandom(16)
    onward = encode_message(InferenceStep(session_id=sid, step=1, position=3, hidden=output, hypo_ids=None))
    answer = encode_message(StepResult(session_id=sid, step=1, position=3, hidden=output, signature=b"s" * 64))
    assert packs == [output]
    assert output.packed() in onward and output.packed() in answer


def test_a_digest_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client checks one hop's output digest and then the same payload as the next hop's input."""
    passes = []
    real = tensors.hashlib.sha256

    class Counting:
        @staticmethod
        def sha256(*args: object) -> object:
            passes.append(args)
            return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tensors, "hashlib", Counting)
    output = payload(64, fill=3)
    first = output.digest()
    assert output.digest() == first and len(passes) == 1
    fresh = payload(64, fill=3)  # another payload with the same bytes hashes them itself, to the same digest
    assert fresh.digest() == first and len(passes) == 2
    assert payload(64, fill=4).digest() != first


def test_memos_are_not_part_of_a_payload() -> None:
    used = payload(16)
    used.packed()
    used.digest()
    assert used == payload(16) and hash(used) == hash(payload(16))
    assert "packed" not in repr(used) and "digest" not in repr(used)


@pytest.mark.parametrize("nbytes", [0, 4, 252, 256, 65532, 65536, 1 << 20])
def test_packed_is_msgpack_of_the_wire_map(nbytes: int) -> None:
    """`packed()` joins the data after a header instead of packing it: the same bytes, every bin size."""
    p = TensorPayload("float32", (nbytes // 4,), os.urandom(nbytes))
    assert p.packed() == msgpack.packb(p.to_wire(), use_bin_type=True)
