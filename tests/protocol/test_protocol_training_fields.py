"""The fine-tuning fields are additive: absent, they leave the wire form (and signatures) as before."""
from __future__ import annotations

import msgpack
import pytest
import torch

from petals_protocol.errors import MalformedMessage
from petals_protocol.messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    InferenceStep,
    InfoResponse,
    OpenSession,
    decode_message,
    encode_message,
)
from petals_protocol.signing import _inputs_digest, backward_binding, forward_binding
from petals_protocol.tensors import from_torch

FP = "f" * 64
HIDDEN = from_torch(torch.ones(2, 3, 8))
PROMPTS = from_torch(torch.zeros(2, 1, 2, 8))


def wire_keys(msg) -> set[str]:
    return set(msgpack.unpackb(encode_message(msg), raw=False))


def test_absent_fields_are_elided_and_present_ones_round_trip():
    plain = ForwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2, hidden=HIDDEN)
    assert not {"prompts", "active_adapter"} & wire_keys(plain)
    tuned = ForwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2, hidden=HIDDEN,
                           prompts=PROMPTS, active_adapter="style-a")
    assert decode_message(encode_message(tuned)) == tuned
    for msg in (
        BackwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2, hidden=HIDDEN,
                        grad_output=HIDDEN, prompts=PROMPTS),
        BackwardResponse(request_id=b"r" * 16, grad_input=HIDDEN, signature=b"s" * 64, grad_prompts=PROMPTS),
        InferenceStep(session_id=b"s" * 16, step=0, position=0, hidden=HIDDEN, prompts=PROMPTS),
        OpenSession(session_id=b"s" * 16, model_fingerprint=FP, start_block=0, end_block=2, max_length=8,
                    batch_size=2, active_adapter="style-a"),
    ):
        assert decode_message(encode_message(msg)) == msg
    info = InfoResponse(peer_id=b"p", version="1", model_name="m", model_fingerprint=FP, num_blocks=4, start_block=0,
                        end_block=2, dtype="float32", state="online", max_length=8, max_batch_size=2,
                        max_sessions=1, active_sessions=0, cache_tokens_free=0, throughput=1.0, public_name="",
                        adapters=("style-a", "style-b"))
    assert decode_message(encode_message(info)).adapters == ("style-a", "style-b")


def test_prompts_must_be_four_dimensional_floats_for_the_requested_blocks():
    with pytest.raises(MalformedMessage, match="prompts hold 3 blocks"):
        ForwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2, hidden=HIDDEN,
                       prompts=from_torch(torch.zeros(3, 1, 2, 8)))
    with pytest.raises(MalformedMessage, match="float tensor"):
        InferenceStep(session_id=b"s" * 16, step=0, position=0, hidden=HIDDEN,
                      prompts=from_torch(torch.zeros(2, 2, 8, dtype=torch.int64)))


def test_bindings_without_the_new_fields_are_unchanged_and_with_them_cover_them():
    plain = ForwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2, hidden=HIDDEN)
    assert forward_binding(plain, HIDDEN).input_digest == _inputs_digest(HIDDEN)
    with_prompts = ForwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2,
                                  hidden=HIDDEN, prompts=PROMPTS)
    with_adapter = ForwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2,
                                  hidden=HIDDEN, active_adapter="a")
    digests = {forward_binding(m, HIDDEN).input_digest for m in (plain, with_prompts, with_adapter)}
    assert len(digests) == 3
    back = BackwardRequest(request_id=b"r" * 16, model_fingerprint=FP, start_block=0, end_block=2, hidden=HIDDEN,
                           grad_output=HIDDEN, prompts=PROMPTS)
    assert backward_binding(back, HIDDEN).output_digest == HIDDEN.digest()
    assert backward_binding(back, HIDDEN, PROMPTS).output_digest != HIDDEN.digest()
