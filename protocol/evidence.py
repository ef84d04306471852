"""Evidence that a daemon computed wrong activations: what a spot check proves, in a form anyone can check.

A spot check (petals_client.spotcheck) asks several daemons for the same stateless forward over
the same span and input. Each answer is a `/petals/forward/1` response signed over its binding:
request id, span, model fingerprint, input digest and output digest (petals_protocol.signing).
A report holds the input digest (the request digest: every answer binds the same one), the
accused daemon's signed answer and two witnesses' signed answers, tensors included. Anyone can
verify without trusting the reporter:

- every signature verifies against the peer id it names (a peer id embeds its Ed25519 key), over
  a binding rebuilt from the report's own fields, so no answer can be swapped or altered;
- accused and witnesses are three different daemons; the witnesses agree with each other within
  the dtype's tolerance and the accused agrees with neither.

Tolerance (`within_tolerance`): the largest elementwise difference must be within
`rtol * max|reference| + atol`, with (rtol, atol) chosen per dtype in `TOLERANCES`. Honest fp32
daemons on the same kernels answer a forward bit-identically, but a spot check compares a
session's incremental step (KV cache) with a stateless forward over the whole history, and a
matmul over a different number of rows may round differently: the fp32 bound sits a few orders
of magnitude above that rounding and far below any change that moves a token. Half-precision
bounds are a few ulps of their mantissa (bfloat16 keeps 8 bits, float16 11) scaled to the
tensor. A daemon that stays inside the bound can still steer outputs a little; that is the price
of not flagging honest hardware differences.

Re-checking: a report also carries the disputed forward's inputs (`ForwardInputs`: the hidden
history, deep prompts, adapter name) when they encode to at most `MAX_RECHECK_INPUT_SIZE` bytes;
`verify` then checks that they are exactly the inputs every answer binds (their digest is the
input digest). A reader may run them on a daemon it trusts and see for itself whether the
accused answer was wrong: signatures prove who said what, not who was right, and two colluding
witnesses could frame an honest daemon. Larger inputs are left out (the report holds their
digest only) and such a report can be believed on its signatures alone, not re-checked.

The reporter signs the report with an expiry (at most `MAX_EVIDENCE_TTL` ahead): the DHT forgets
it after that, and a daemon that was fixed is not avoided forever by its old mistake. Reports are
stored under "/petals-ev/<fingerprint>/<accused peer id>"; of several valid reports for one
key the one that expires last is kept.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import BadRecord, ProtocolError
from .ids import is_valid_fingerprint
from .messages import ID_SIZE, SIGNATURE_SIZE, ForwardRequest, unpack_strict
from .records import open_envelope, parse_record_key, record_key
from .signing import (
    ResponseBinding,
    forward_binding,
    peer_id_from_private_key,
    peer_id_to_text,
    sign_bytes,
    verify_bytes,
    verify_response,
)
from .tensors import TensorPayload

__all__ = [
    "EVIDENCE_NAMESPACE",
    "MAX_EVIDENCE_SIZE",
    "MAX_EVIDENCE_TTL",
    "TOLERANCES",
    "MAX_RECHECK_INPUT_SIZE",
    "ForwardInputs",
    "SignedOutput",
    "EvidenceReport",
    "within_tolerance",
    "payloads_agree",
    "encode_report",
    "decode_report",
    "select_report",
    "evidence_key",
    "parse_evidence_key",
]

#: Short: libp2p refuses GET_VALUE keys over 128 bytes, and "/petals-ev/<64-hex fingerprint>/<52-char
#: Ed25519 peer id>" is exactly 128.
EVIDENCE_NAMESPACE = "petals-ev"
#: Three outputs and their signatures; the outputs span the whole history of the checked step.
MAX_EVIDENCE_SIZE = 1024 * 1024
#: Inputs included in a report (so that readers may re-check it) encode to at most this many bytes;
#: with three outputs of the same shape the whole report stays within MAX_EVIDENCE_SIZE.
MAX_RECHECK_INPUT_SIZE = 192 * 1024
#: A report is believed for at most a day after it is signed (re-published reports last longer).
MAX_EVIDENCE_TTL = 24 * 3600.0
_REPORT_DOMAIN = b"petals/evidence/1\n"
_DIGEST_SIZE = 32
_OUTPUT_KEYS = frozenset({"peer_id", "request_id", "output", "signature"})
_REPORT_KEYS = frozenset({"model_fingerprint", "start_block", "end_block", "input_digest", "accused",
                          "witnesses", "reporter", "expires_at"})
_INPUT_KEYS = frozenset({"hidden", "prompts", "adapter"})

_FLOAT_CODES = {"float32": "f", "float16": "e"}
#: (rtol, atol) per dtype name; see the module docstring for why.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-5),
    "bfloat16": (2.0**-5, 2.0**-8),
    "float16": (2.0**-8, 2.0**-11),
}


def within_tolerance(max_difference: float, scale: float, dtype: str) -> bool:
    """The one agreement rule: the largest elementwise difference within `rtol * scale + atol`
    (`scale`: the largest magnitude of the reference), with (rtol, atol) of `dtype` (TOLERANCES).
    The client applies it to torch tensors (petals_client.spotcheck), reports to payloads (below)."""
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
    return max_difference <= rtol * scale + atol


def _values(payload: TensorPayload) -> tuple[float, ...]:
    """The elements of a floating-point payload as Python floats (little-endian on the wire)."""
    n = payload.numel
    if payload.dtype == "bfloat16":  # the top half of a float32
        halves = struct.unpack(f"<{n}H", payload.data)
        return struct.unpack(f"<{n}f", struct.pack(f"<{n}I", *(h << 16 for h in halves)))
    code = _FLOAT_CODES.get(payload.dtype)
    if code is None:
        raise BadRecord(f"an output of dtype {payload.dtype} cannot be compared")
    return struct.unpack(f"<{n}{code}", payload.data)


def payloads_agree(output: TensorPayload, reference: TensorPayload) -> bool:
    """`within_tolerance` on two encoded outputs, without torch (every DHT node checks reports)."""
    if output.shape != reference.shape or output.dtype != reference.dtype:
        return False
    a, b = _values(output), _values(reference)
    if not all(map(math.isfinite, a)) or not all(map(math.isfinite, b)):
        return output.data == reference.data
    if not b:
        return True
    difference = max(abs(x - y) for x, y in zip(a, b))
    return within_tolerance(difference, max(map(abs, b)), reference.dtype)


@dataclass(frozen=True, slots=True)
class SignedOutput:
    """One daemon's signed answer to a stateless forward (`/petals/forward/1`)."""

    peer_id: bytes
    request_id: bytes
    output: TensorPayload = field(repr=False)
    signature: bytes = field(repr=False)

    @property
    def peer_id_text(self) -> str:
        return peer_id_to_text(self.peer_id)

    def binding(self, report: EvidenceReport) -> ResponseBinding:
        return ResponseBinding("forward", self.request_id, 0, 0, report.start_block, report.end_block,
                               report.model_fingerprint, report.input_digest, self.output.digest())

    def to_wire(self) -> dict[str, object]:
        return {"peer_id": self.peer_id, "request_id": self.request_id, "output": self.output.to_wire(),
                "signature": self.signature}

    @classmethod
    def from_wire(cls, obj: object) -> SignedOutput:
        if not isinstance(obj, dict) or obj.keys() != _OUTPUT_KEYS:
            raise BadRecord(f"a signed output must be a map with keys {sorted(_OUTPUT_KEYS)}")
        peer_id, request_id, signature = obj["peer_id"], obj["request_id"], obj["signature"]
        if type(peer_id) is not bytes or type(request_id) is not bytes or len(request_id) != ID_SIZE \
                or type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
            raise BadRecord("a signed output needs a peer id, a 16-byte request id and a 64-byte signature")
        return cls(peer_id, request_id, TensorPayload.from_wire(obj["output"]), signature)


@dataclass(frozen=True, slots=True)
class ForwardInputs:
    """What the disputed forward ran on: enough for a reader to run it again and compare."""

    hidden: TensorPayload = field(repr=False)
    prompts: TensorPayload | None = field(default=None, repr=False)
    adapter: str | None = None

    def request(self, fingerprint: str, start: int, end: int) -> ForwardRequest:
        """The forward request these inputs make for blocks [start, end) (a fresh request id)."""
        return ForwardRequest(request_id=os.urandom(ID_SIZE), model_fingerprint=fingerprint, start_block=start,
                              end_block=end, hidden=self.hidden, prompts=self.prompts, active_adapter=self.adapter)

    def digest(self, fingerprint: str, start: int, end: int) -> bytes:
        """The input digest every daemon's answer to these inputs binds (petals_protocol.signing)."""
        request = self.request(fingerprint, start, end)
        return forward_binding(request, request.hidden).input_digest

    def to_wire(self) -> dict[str, object]:
        return {"hidden": self.hidden.to_wire(), "prompts": self.prompts.to_wire() if self.prompts else None,
                "adapter": self.adapter}

    def wire_size(self) -> int:
        return len(msgpack.packb(self.to_wire(), use_bin_type=True))

    @classmethod
    def from_wire(cls, obj: object) -> ForwardInputs:
        if not isinstance(obj, dict) or obj.keys() != _INPUT_KEYS:
            raise BadRecord(f"report inputs must be a map with keys {sorted(_INPUT_KEYS)}")
        adapter = obj["adapter"]
        if adapter is not None and type(adapter) is not str:
            raise BadRecord("the inputs' adapter must be a name")
        prompts = TensorPayload.from_wire(obj["prompts"]) if obj["prompts"] is not None else None
        return cls(TensorPayload.from_wire(obj["hidden"]), prompts, adapter)


@dataclass(frozen=True, slots=True)
class EvidenceReport:
    """`accused` answered the forward over blocks [start, end) differently from two agreeing witnesses."""

    model_fingerprint: str
    start_block: int
    end_block: int
    input_digest: bytes  # the binding's input digest: the same request for all three answers
    accused: SignedOutput
    witnesses: tuple[SignedOutput, SignedOutput]
    reporter: bytes  # peer id of the client that signs and publishes the report
    expires_at: float
    inputs: ForwardInputs | None = None  # for re-checking; None when too large to include

    @property
    def accused_text(self) -> str:
        return self.accused.peer_id_text

    def verify(self, *, now: float) -> None:
        """BadRecord unless this is proof that `accused` answered wrong (see the module docstring)."""
        if not is_valid_fingerprint(self.model_fingerprint):
            raise BadRecord(f"invalid model fingerprint {self.model_fingerprint!r}")
        if not 0 <= self.start_block < self.end_block:
            raise BadRecord(f"invalid span {self.start_block}:{self.end_block}")
        if type(self.input_digest) is not bytes or len(self.input_digest) != _DIGEST_SIZE:
            raise BadRecord("the input digest must be 32 bytes")
        if not math.isfinite(self.expires_at) or self.expires_at <= now:
            raise BadRecord(f"the report on {self.accused_text} expired")
        if self.expires_at > now + MAX_EVIDENCE_TTL:
            raise BadRecord(f"the report on {self.accused_text} claims to live past the {MAX_EVIDENCE_TTL:.0f} s bound")
        if self.inputs is not None:
            if self.inputs.wire_size() > MAX_RECHECK_INPUT_SIZE:
                raise BadRecord(f"the included inputs exceed {MAX_RECHECK_INPUT_SIZE} bytes")
            try:
                digest = self.inputs.digest(self.model_fingerprint, self.start_block, self.end_block)
            except ProtocolError as exc:
                raise BadRecord(f"the included inputs are not a valid request: {exc.message}") from exc
            if digest != self.input_digest:
                raise BadRecord("the included inputs are not the ones the answers bind")
        answers = (self.accused, *self.witnesses)
        if len({a.peer_id for a in answers}) != len(answers):
            raise BadRecord("accused and witnesses must be different daemons")
        for answer in answers:
            try:
                verify_response(answer.peer_id, answer.binding(self), answer.signature)
            except ProtocolError as exc:
                raise BadRecord(f"the answer of {answer.peer_id_text} is not signed by it: {exc.message}") from exc
        first, second = (w.output for w in self.witnesses)
        if not payloads_agree(second, first):
            raise BadRecord("the witnesses disagree with each other: nothing is proven")
        if payloads_agree(self.accused.output, first) or payloads_agree(self.accused.output, second):
            raise BadRecord(f"the answer of {self.accused_text} agrees with a witness: nothing is proven")

    def _body(self) -> bytes:
        body = {
            "model_fingerprint": self.model_fingerprint, "start_block": self.start_block,
            "end_block": self.end_block, "input_digest": self.input_digest, "accused": self.accused.to_wire(),
            "witnesses": [w.to_wire() for w in self.witnesses], "reporter": self.reporter,
            "expires_at": float(self.expires_at),
        }
        if self.inputs is not None:
            body["inputs"] = self.inputs.to_wire()
        return msgpack.packb(body, use_bin_type=True)


def encode_report(private_key: Ed25519PrivateKey, report: EvidenceReport) -> bytes:
    """Sign and serialise a report; the key must be the reporter's. BadRecord if it is too big to store."""
    if peer_id_from_private_key(private_key) != report.reporter:
        raise ValueError("the signing key does not belong to the report's reporter")
    body = report._body()
    blob = msgpack.packb({"report": body, "sig": sign_bytes(private_key, _REPORT_DOMAIN, body)}, use_bin_type=True)
    if len(blob) > MAX_EVIDENCE_SIZE:
        raise BadRecord(f"the report is {len(blob)} bytes (max {MAX_EVIDENCE_SIZE}): the checked history is too long")
    return blob


def decode_report(blob: bytes, *, now: float, expected_fingerprint: str | None = None,
                  expected_accused: bytes | None = None) -> EvidenceReport:
    """Parse and verify a report blob (reporter's signature, then `EvidenceReport.verify`); BadRecord if untrustworthy."""
    if not isinstance(blob, bytes) or len(blob) > MAX_EVIDENCE_SIZE:
        raise BadRecord(f"a report is bytes of at most {MAX_EVIDENCE_SIZE}")
    try:
        body, sig = open_envelope(blob, "report")
        fields = unpack_strict(body)
        if not isinstance(fields, dict) or fields.keys() - {"inputs"} != _REPORT_KEYS:
            raise BadRecord(f"a report must be a map with keys {sorted(_REPORT_KEYS)} (and optionally inputs)")
        witnesses = fields["witnesses"]
        if not isinstance(witnesses, (list, tuple)) or len(witnesses) != 2:
            raise BadRecord("a report names exactly two witnesses")
        start, end, expires_at = fields["start_block"], fields["end_block"], fields["expires_at"]
        if type(start) is not int or type(end) is not int or type(expires_at) is not float \
                or type(fields["reporter"]) is not bytes or type(fields["model_fingerprint"]) is not str:
            raise BadRecord("report fields have the wrong types")
        report = EvidenceReport(fields["model_fingerprint"], start, end, fields["input_digest"],
                                SignedOutput.from_wire(fields["accused"]),
                                (SignedOutput.from_wire(witnesses[0]), SignedOutput.from_wire(witnesses[1])),
                                fields["reporter"], expires_at,
                                ForwardInputs.from_wire(fields["inputs"]) if "inputs" in fields else None)
        verify_bytes(report.reporter, _REPORT_DOMAIN, body, sig)
    except BadRecord:
        raise
    except ProtocolError as exc:  # MalformedMessage (msgpack), BadTensor, BadSignature
        raise BadRecord(f"{exc.code.value}: {exc.message}") from exc
    if expected_fingerprint is not None and report.model_fingerprint != expected_fingerprint:
        raise BadRecord(f"the report is about model {report.model_fingerprint!r}, expected {expected_fingerprint!r}")
    if expected_accused is not None and report.accused.peer_id != expected_accused:
        raise BadRecord(f"the report accuses {report.accused_text}, not {peer_id_to_text(expected_accused)}")
    report.verify(now=now)
    return report


def select_report(blobs: list[bytes], *, now: float, expected_fingerprint: str | None = None,
                  expected_accused: bytes | None = None) -> int:
    """Index of the valid report that expires last (a DHT validator's `select`); BadRecord if none is valid."""
    best, best_expiry = -1, -math.inf
    for index, blob in enumerate(blobs):
        try:
            report = decode_report(blob, now=now, expected_fingerprint=expected_fingerprint,
                                   expected_accused=expected_accused)
        except BadRecord:
            continue
        if report.expires_at > best_expiry:
            best, best_expiry = index, report.expires_at
    if best < 0:
        raise BadRecord(f"none of {len(blobs)} reports is valid")
    return best


def evidence_key(fingerprint: str, accused_text: str) -> str:
    """"/petals-ev/<fingerprint>/<accused peer id>": where reports on a daemon are stored."""
    return record_key(fingerprint, accused_text, EVIDENCE_NAMESPACE)


def parse_evidence_key(key: str | bytes) -> tuple[str, bytes]:
    """(fingerprint, accused peer id bytes) from an evidence key; BadRecord if it is not one."""
    return parse_record_key(key, EVIDENCE_NAMESPACE)
