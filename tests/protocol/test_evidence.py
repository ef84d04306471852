"""Evidence reports (petals_protocol.evidence): what proves a daemon wrong, and every forgery refused."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petals_client.spotcheck import outputs_agree
from petals_protocol.errors import BadRecord
from petals_protocol.evidence import (
    MAX_EVIDENCE_TTL,
    MAX_RECHECK_INPUT_SIZE,
    EvidenceReport,
    ForwardInputs,
    SignedOutput,
    decode_report,
    encode_report,
    evidence_key,
    payloads_agree,
    parse_evidence_key,
    select_report,
)
from petals_protocol.messages import ForwardRequest
from petals_protocol.signing import forward_binding, peer_id_from_private_key, sign_response
from petals_protocol.tensors import from_torch

FINGERPRINT = "ab" * 32
NOW = 1_800_000_000.0
HISTORY = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
RIGHT = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))


def answer(key: Ed25519PrivateKey, output: torch.Tensor) -> tuple[SignedOutput, bytes]:
    """A daemon's signed forward answer over HISTORY, and the request digest it binds."""
    request = ForwardRequest(request_id=os.urandom(16), model_fingerprint=FINGERPRINT, start_block=0, end_block=3,
                             hidden=from_torch(HISTORY))
    payload = from_torch(output)
    binding = forward_binding(request, payload)
    signed = SignedOutput(peer_id_from_private_key(key), request.request_id, payload, sign_response(key, binding))
    return signed, binding.input_digest


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {name: Ed25519PrivateKey.generate() for name in ("liar", "w1", "w2", "reporter")}


def report(keys, liar_output: torch.Tensor = RIGHT * 1.01, **changes) -> EvidenceReport:
    accused, digest = answer(keys["liar"], liar_output)
    witnesses = (answer(keys["w1"], RIGHT)[0], answer(keys["w2"], RIGHT)[0])
    base = EvidenceReport(FINGERPRINT, 0, 3, digest, accused, witnesses, peer_id_from_private_key(keys["reporter"]),
                          NOW + 600)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("agree", [payloads_agree, outputs_agree], ids=["payloads", "tensors"])
def test_tolerance_by_dtype(agree):
    """The same rule on encoded outputs (what every DHT node checks) and on tensors (the client)."""
    def wrap(t: torch.Tensor):
        return from_torch(t) if agree is payloads_agree else t

    x = torch.randn(2, 3, 16)
    assert agree(wrap(x), wrap(x.clone()))
    assert agree(wrap(x + 1e-7), wrap(x))  # fp32 rounding of a different matmul shape
    assert not agree(wrap(x * 1.001), wrap(x))  # a 0.1% change is far outside fp32's bound
    for dtype, step in ((torch.bfloat16, 2**-7), (torch.float16, 2**-10)):
        half = x.to(dtype)
        assert agree(wrap(half + half.abs().max() * step), wrap(half))  # a few ulps of the scale
        assert not agree(wrap(half * 1.2), wrap(half))
    assert not agree(wrap(x[:, :2]), wrap(x))  # shapes differ
    assert not agree(wrap(x.half()), wrap(x))  # dtypes differ
    nan = x.clone()
    nan[0, 0, 0] = float("nan")
    assert not agree(wrap(nan), wrap(x))


def test_a_genuine_report_round_trips_and_verifies(keys):
    genuine = report(keys)
    decoded = decode_report(encode_report(keys["reporter"], genuine), now=NOW, expected_fingerprint=FINGERPRINT,
                            expected_accused=genuine.accused.peer_id)
    assert decoded == genuine
    key = evidence_key(FINGERPRINT, genuine.accused_text)
    assert len(key.encode()) <= 128  # libp2p refuses longer GET_VALUE keys
    assert parse_evidence_key(key) == (FINGERPRINT, genuine.accused.peer_id)


def test_included_inputs_are_the_bound_ones_and_bounded(keys):
    """A report may carry the forward's inputs for re-checking: they must be exactly the inputs
    the answers bind (their digest), and small enough; without them the report still verifies."""
    inputs = ForwardInputs(from_torch(HISTORY))
    recheckable = report(keys, inputs=inputs)
    assert decode_report(encode_report(keys["reporter"], recheckable), now=NOW) == recheckable
    assert recheckable.inputs.digest(FINGERPRINT, 0, 3) == recheckable.input_digest
    other = report(keys, inputs=ForwardInputs(from_torch(HISTORY + 1)))
    with pytest.raises(BadRecord, match="not the ones the answers bind"):
        decode_report(encode_report(keys["reporter"], other), now=NOW)
    adapted = report(keys, inputs=ForwardInputs(from_torch(HISTORY), adapter="style-a"))  # the adapter is bound too
    with pytest.raises(BadRecord, match="not the ones the answers bind"):
        adapted.verify(now=NOW)
    huge = report(keys, inputs=ForwardInputs(from_torch(torch.zeros(1, MAX_RECHECK_INPUT_SIZE // 4, 1))))
    with pytest.raises(BadRecord, match="exceed"):
        huge.verify(now=NOW)


@pytest.mark.parametrize("forgery", ["altered output", "accused agrees", "witnesses disagree", "same daemon twice",
                                     "other request", "expired", "lives too long", "reporter signature"])
def test_forgeries_are_refused(keys, forgery):
    genuine = report(keys)
    signer = keys["reporter"]
    if forgery == "altered output":  # the liar's answer changed after it was signed: its signature fails
        forged = dataclasses.replace(genuine, accused=dataclasses.replace(
            genuine.accused, output=from_torch(RIGHT * 1.02)))
    elif forgery == "accused agrees":  # an honest daemon's genuine answer: nothing wrong with it
        forged = report(keys, liar_output=RIGHT)
    elif forgery == "witnesses disagree":
        forged = dataclasses.replace(genuine, witnesses=(genuine.witnesses[0], answer(keys["w2"], RIGHT * 0.9)[0]))
    elif forgery == "same daemon twice":
        forged = dataclasses.replace(genuine, witnesses=(genuine.witnesses[0], answer(keys["w1"], RIGHT)[0]))
    elif forgery == "other request":  # signatures bind another input digest than the report claims
        forged = dataclasses.replace(genuine, input_digest=bytes(32))
    elif forgery == "expired":
        forged = dataclasses.replace(genuine, expires_at=NOW - 1)
    elif forgery == "lives too long":
        forged = dataclasses.replace(genuine, expires_at=NOW + MAX_EVIDENCE_TTL + 60)
    else:  # signed by someone who is not the named reporter
        forged, signer = dataclasses.replace(genuine, reporter=peer_id_from_private_key(keys["w1"])), keys["w1"]
        blob = encode_report(signer, forged)
        tampered = blob.replace(forged.reporter, peer_id_from_private_key(keys["reporter"]))
        with pytest.raises(BadRecord):
            decode_report(tampered, now=NOW)
        return
    with pytest.raises(BadRecord):
        decode_report(encode_report(signer, forged), now=NOW)


def test_a_report_on_another_daemon_or_model_is_refused_under_this_key(keys):
    blob = encode_report(keys["reporter"], report(keys))
    with pytest.raises(BadRecord):
        decode_report(blob, now=NOW, expected_accused=peer_id_from_private_key(keys["w1"]))
    with pytest.raises(BadRecord):
        decode_report(blob, now=NOW, expected_fingerprint="cd" * 32)
    with pytest.raises(BadRecord):
        decode_report(b"\x00" + blob, now=NOW)


def test_select_keeps_the_report_that_expires_last(keys):
    early = encode_report(keys["reporter"], report(keys, expires_at=NOW + 100))
    late = encode_report(keys["reporter"], report(keys, expires_at=NOW + 900))
    forged = b"junk"
    assert select_report([early, forged, late], now=NOW) == 2
    with pytest.raises(BadRecord):
        select_report([forged], now=NOW)
