"""Peer ids and response signatures: libp2p compatibility, forgery and tampering all fail."""

from __future__ import annotations

import dataclasses

import pytest
from protocol_samples import FINGERPRINT, OTHER_SEED, REQUEST_ID, SEED, SESSION_ID, hidden, hypo_ids

from petals_protocol import (
    BackwardRequest,
    BadSignature,
    ForwardRequest,
    InferenceStep,
    MalformedMessage,
    ResponseBinding,
    backward_binding,
    forward_binding,
    inference_binding,
    peer_id_from_private_key,
    peer_id_from_public_key,
    peer_id_from_text,
    peer_id_to_text,
    private_key_from_seed,
    public_key_from_peer_id,
    sign_response,
    verify_response,
)

KEY = private_key_from_seed(SEED)
PEER = peer_id_from_private_key(KEY)
BINDING = ResponseBinding(
    kind="inference",
    id=SESSION_ID,
    step=3,
    position=17,
    start_block=2,
    end_block=6,
    model_fingerprint=FINGERPRINT,
    input_digest=b"\x11" * 32,
    output_digest=b"\x22" * 32,
)


def test_peer_id_matches_py_libp2p() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    pair = create_new_key_pair(SEED)
    libp2p_id = ID.from_pubkey(pair.public_key)
    assert PEER == libp2p_id.to_bytes()
    assert peer_id_to_text(PEER) == libp2p_id.to_base58()
    assert peer_id_to_text(PEER).startswith("12D3KooW")
    assert public_key_from_peer_id(PEER) == pair.public_key.to_bytes()
    assert peer_id_from_public_key(pair.public_key.to_bytes()) == PEER


def test_peer_id_text_round_trip_and_rejects() -> None:
    assert peer_id_from_text(peer_id_to_text(PEER)) == PEER
    for bad in ["", "0OIl", "x" * 1000, "2" * 200]:
        with pytest.raises(MalformedMessage):
            peer_id_from_text(bad)


@pytest.mark.parametrize(
    "peer_id",
    [
        b"",
        PEER[:-1],
        PEER + b"\x00",
        b"\x00\x25" + PEER[2:] + b"\x00",  # identity multihash of 37 bytes
        b"\x12\x20" + bytes(32),  # sha256 multihash (RSA/secp256k1-style ids): no key inside
        b"\x00\x24\x08\x02\x12\x20" + bytes(32),  # key type 2 = secp256k1
    ],
)
def test_public_key_from_non_ed25519_peer_id(peer_id: bytes) -> None:
    with pytest.raises(BadSignature):
        public_key_from_peer_id(peer_id)


def test_sign_and_verify() -> None:
    signature = sign_response(KEY, BINDING)
    assert len(signature) == 64
    verify_response(PEER, BINDING, signature)
    assert BINDING.canonical_bytes().startswith(b"petals/response/1\n")


def test_flipped_signature_bits_fail() -> None:
    signature = sign_response(KEY, BINDING)
    for bit in range(0, 512, 7):
        forged = bytearray(signature)
        forged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BadSignature):
            verify_response(PEER, BINDING, bytes(forged))
    for bad in (b"", signature[:63], signature + b"\x00", bytes(64)):
        with pytest.raises(BadSignature):
            verify_response(PEER, BINDING, bad)


def changed(value: object) -> object:
    if isinstance(value, bytes):
        return bytes([value[0] ^ 1]) + value[1:]
    if isinstance(value, int):
        return value + 1
    return {"inference": "forward"}.get(value, value + "x")  # type: ignore[operator]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ResponseBinding)])
def test_tampering_with_any_bound_field_fails(name: str) -> None:
    signature = sign_response(KEY, BINDING)
    tampered = dataclasses.replace(BINDING, **{name: changed(getattr(BINDING, name))})
    assert tampered != BINDING
    with pytest.raises(BadSignature):
        verify_response(PEER, tampered, signature)


def test_wrong_peer_fails() -> None:
    signature = sign_response(KEY, BINDING)
    other = peer_id_from_private_key(private_key_from_seed(OTHER_SEED))
    with pytest.raises(BadSignature):
        verify_response(other, BINDING, signature)
    with pytest.raises(BadSignature):
        verify_response(b"\x12\x20" + bytes(32), BINDING, signature)


def test_binding_rejects_invalid_values() -> None:
    for name, value in [("kind", "other"), ("id", b"short"), ("step", -1), ("position", True), ("input_digest", b"")]:
        with pytest.raises(ValueError):
            dataclasses.replace(BINDING, **{name: value})


def test_binding_helpers_bind_request_and_output() -> None:
    step = InferenceStep(SESSION_ID, 4, 9, hidden(), hypo_ids())
    output = hidden(dim=5)
    binding = inference_binding(step, start_block=1, end_block=3, model_fingerprint=FINGERPRINT, output=output)
    assert (binding.kind, binding.id, binding.step, binding.position) == ("inference", SESSION_ID, 4, 9)
    assert binding.output_digest == output.digest()
    # the input digest covers hypo_ids: dropping them changes the binding
    without = dataclasses.replace(step, hypo_ids=None)
    no_hypo = inference_binding(without, start_block=1, end_block=3, model_fingerprint=FINGERPRINT, output=output)
    assert no_hypo.input_digest != binding.input_digest

    fwd = ForwardRequest(REQUEST_ID, FINGERPRINT, 0, 4, hidden())
    fb = forward_binding(fwd, output)
    assert (fb.kind, fb.id, fb.step, fb.position, fb.start_block, fb.end_block) == ("forward", REQUEST_ID, 0, 0, 0, 4)

    bwd = BackwardRequest(REQUEST_ID, FINGERPRINT, 0, 4, hidden(), hidden(dim=4, seq=3, batch=1, dtype="float16"))
    bb = backward_binding(bwd, output)
    assert bb.kind == "backward" and bb.input_digest != fb.input_digest
    signature = sign_response(KEY, bb)
    verify_response(PEER, bb, signature)
    with pytest.raises(BadSignature):  # a backward signature is no forward signature
        verify_response(PEER, dataclasses.replace(bb, kind="forward"), signature)
