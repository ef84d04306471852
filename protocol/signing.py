"""Ed25519 peer ids and response signatures.

A libp2p Ed25519 peer id *is* the public key (an identity multihash of the protobuf PublicKey),
so a signature can be checked against the peer id alone, with no key exchange:

    peer id = 0x00 0x24              identity multihash, 36-byte digest
              0x08 0x01              PublicKey.Type = Ed25519
              0x12 0x20 <32 bytes>   PublicKey.Data

Every response that carries activations is signed over a `ResponseBinding`: the request it
answers (session or request id, step, position), the span, the model fingerprint and the digests
of input and output. A daemon cannot replay an answer for another step, span or model, and a
relay in the middle cannot alter activations, without the client noticing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import base58
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import BadSignature, MalformedMessage
from .ids import is_valid_fingerprint
from .messages import ID_SIZE, MAX_PEER_ID_SIZE, SIGNATURE_SIZE, BackwardRequest, ForwardRequest, InferenceStep
from .tensors import TensorPayload

__all__ = [
    "PUBLIC_KEY_SIZE",
    "RESPONSE_KINDS",
    "ResponseBinding",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "peer_id_from_private_key",
    "peer_id_to_text",
    "peer_id_from_text",
    "private_key_from_seed",
    "sign_response",
    "verify_response",
    "sign_bytes",
    "verify_bytes",
    "inference_binding",
    "forward_binding",
    "backward_binding",
]

PUBLIC_KEY_SIZE = 32
_ED25519_PEER_ID_PREFIX = b"\x00\x24" + b"\x08\x01\x12\x20"
_RESPONSE_DOMAIN = b"petals/response/1\n"
_INPUTS_DOMAIN = b"petals/inputs/1\n"
RESPONSE_KINDS = ("inference", "forward", "backward")
_DIGEST_SIZE = 32  # sha256


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """The libp2p peer id (bytes) of a raw 32-byte Ed25519 public key."""
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")
    return _ED25519_PEER_ID_PREFIX + public_key


def public_key_from_peer_id(peer_id: bytes) -> bytes:
    """The raw Ed25519 key embedded in a peer id; BadSignature if it embeds none."""
    if (
        type(peer_id) is not bytes
        or len(peer_id) != len(_ED25519_PEER_ID_PREFIX) + PUBLIC_KEY_SIZE
        or not peer_id.startswith(_ED25519_PEER_ID_PREFIX)
    ):
        raise BadSignature("peer id is not an Ed25519 identity peer id (no embedded key to verify with)")
    return peer_id[len(_ED25519_PEER_ID_PREFIX) :]


def peer_id_from_private_key(private_key: Ed25519PrivateKey) -> bytes:
    return peer_id_from_public_key(private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def private_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """The Ed25519 key for a 32-byte seed (libp2p stores Ed25519 keys as seed || public key)."""
    if type(seed) is not bytes or len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def peer_id_to_text(peer_id: bytes) -> str:
    """base58btc, the form libp2p prints ("12D3KooW..." for Ed25519)."""
    return base58.b58encode(peer_id).decode("ascii")


def peer_id_from_text(text: str) -> bytes:
    """Inverse of `peer_id_to_text` (a bijection); MalformedMessage unless base58btc of a sane size."""
    if type(text) is not str or not 0 < len(text) <= 2 * MAX_PEER_ID_SIZE:
        raise MalformedMessage("peer id text must be a non-empty str of bounded length")
    try:
        raw = base58.b58decode(text)
    except ValueError as exc:  # invalid base58 characters
        raise MalformedMessage(f"peer id {text!r} is not base58btc") from exc
    if not 0 < len(raw) <= MAX_PEER_ID_SIZE:
        raise MalformedMessage(f"peer id {text!r} decodes to {len(raw)} bytes (max {MAX_PEER_ID_SIZE})")
    return raw


def sign_bytes(private_key: Ed25519PrivateKey, domain: bytes, message: bytes) -> bytes:
    """Sign `domain + message`; the domain keeps a signature for one purpose useless for another."""
    return private_key.sign(domain + message)


def verify_bytes(peer_id: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    """Check a `sign_bytes` signature against the key in `peer_id`; BadSignature if it fails."""
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise BadSignature(f"signature must be {SIGNATURE_SIZE} bytes")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
        public_key.verify(signature, domain + message)
    except (InvalidSignature, ValueError) as exc:  # ValueError: bytes that are not a curve point
        raise BadSignature(f"signature does not verify for peer {peer_id_to_text(peer_id)}") from exc


@dataclass(frozen=True, slots=True)
class ResponseBinding:
    """What a response signature commits to. `step` is 0 and `position` 0 for stateless calls."""

    kind: str  # "inference" | "forward" | "backward"
    id: bytes  # session_id (inference) or request_id
    step: int
    position: int
    start_block: int
    end_block: int
    model_fingerprint: str
    input_digest: bytes
    output_digest: bytes

    def __post_init__(self) -> None:
        # Built locally from already-validated messages; a failure here is a bug in the caller.
        if self.kind not in RESPONSE_KINDS:
            raise ValueError(f"kind must be one of {RESPONSE_KINDS}, got {self.kind!r}")
        if type(self.id) is not bytes or len(self.id) != ID_SIZE:
            raise ValueError(f"id must be {ID_SIZE} bytes")
        for name in ("step", "position", "start_block", "end_block"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not is_valid_fingerprint(self.model_fingerprint):
            raise ValueError(f"invalid model fingerprint {self.model_fingerprint!r}")
        for name in ("input_digest", "output_digest"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) != _DIGEST_SIZE:
                raise ValueError(f"{name} must be a {_DIGEST_SIZE}-byte digest")

    def canonical_bytes(self) -> bytes:
        """Domain prefix + msgpack of the fields in a fixed order (what gets signed)."""
        fields = [
            self.kind,
            self.id,
            self.step,
            self.position,
            self.start_block,
            self.end_block,
            self.model_fingerprint,
            self.input_digest,
            self.output_digest,
        ]
        return _RESPONSE_DOMAIN + msgpack.packb(fields, use_bin_type=True)


def sign_response(private_key: Ed25519PrivateKey, binding: ResponseBinding) -> bytes:
    return private_key.sign(binding.canonical_bytes())


def verify_response(peer_id: bytes, binding: ResponseBinding, signature: bytes) -> None:
    """Raise BadSignature unless `signature` is `peer_id`'s signature over `binding`."""
    verify_bytes(peer_id, b"", binding.canonical_bytes(), signature)


def _inputs_digest(*tensors: TensorPayload | None) -> bytes:
    """One digest over several inputs (None = absent); fixed-size parts make it unambiguous."""
    h = hashlib.sha256(_INPUTS_DOMAIN)
    for tensor in tensors:
        h.update(b"\x00" if tensor is None else b"\x01" + tensor.digest())
    return h.digest()


def inference_binding(
    step: InferenceStep, *, start_block: int, end_block: int, model_fingerprint: str, output: TensorPayload
) -> ResponseBinding:
    """The binding for a StepResult answering `step` (span and fingerprint from the OpenSession)."""
    return ResponseBinding(
        "inference",
        step.session_id,
        step.step,
        step.position,
        start_block,
        end_block,
        model_fingerprint,
        _inputs_digest(step.hidden, step.hypo_ids, *_present(step.prompts)),
        output.digest(),
    )


def _present(*tensors: TensorPayload | None) -> tuple[TensorPayload, ...]:
    """Inputs added to a message later (prompts): part of the digest only when present, so that
    the bindings of requests without them are what peers that predate them compute."""
    return tuple(t for t in tensors if t is not None)


def _stateless_binding(
    kind: str, request: ForwardRequest | BackwardRequest, inputs: tuple[TensorPayload, ...], output_digest: bytes
) -> ResponseBinding:
    digest = _inputs_digest(*inputs, *_present(request.prompts))
    if request.active_adapter is not None:  # the adapter computed with is part of what was asked
        digest = hashlib.sha256(_INPUTS_DOMAIN + b"adapter\n" + digest + request.active_adapter.encode()).digest()
    return ResponseBinding(
        kind,
        request.request_id,
        0,
        0,
        request.start_block,
        request.end_block,
        request.model_fingerprint,
        digest,
        output_digest,
    )


def forward_binding(request: ForwardRequest, output: TensorPayload) -> ResponseBinding:
    """The binding for a ForwardResponse carrying `output` (step and position are 0)."""
    return _stateless_binding("forward", request, (request.hidden,), output.digest())


def backward_binding(request: BackwardRequest, grad_input: TensorPayload,
                     grad_prompts: TensorPayload | None = None) -> ResponseBinding:
    """The binding for a BackwardResponse; the input digest covers hidden and grad_output (and
    prompts, adapter), the output digest grad_input (and grad_prompts when present)."""
    output = grad_input.digest() if grad_prompts is None else _inputs_digest(grad_input, grad_prompts)
    return _stateless_binding("backward", request, (request.hidden, request.grad_output), output)
