"""Members-only swarms: owner keys, membership certificates and the revocation list (sans-IO).

A pre-shared swarm key (pnet) keeps outsiders out, but it cannot be taken back from one member.
Here a swarm has an *owner*: an Ed25519 key whose peer id names the swarm. The owner signs a
`MembershipCertificate` for each member's peer id, with an expiry. A peer of a members-only swarm
admits a connection only when the other side (its peer id authenticated by the Noise handshake)
is the owner itself or shows a valid certificate for exactly that peer id
(`petals_protocol.p2p.admission` runs the exchange right after the handshake).

To remove a member before its certificate expires, the owner signs a `RevocationList`: each entry
voids every certificate of one peer issued at or before the entry's time (a later certificate
re-admits the peer). The list lives in the DHT under `revocations_key(owner)`; members read it
every record period and store it again, so it outlives the DHT's own value lifetime, and a list
with a higher `seq` replaces an older one. Nobody but the owner can make a list that verifies.

Bounds: a certificate blob is at most `MAX_CERTIFICATE_SIZE` bytes, a list at most
`MAX_REVOCATIONS` entries (`MAX_LIST_SIZE` bytes), so that neither the handshake nor a DHT node
buffers more for them.
"""
from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import BadRecord, BadSignature, MalformedMessage, PetalsError
from .messages import MAX_CERTIFICATE_SIZE  # a certificate is ~200 bytes; daemons show theirs in info replies
from .signing import (
    peer_id_from_private_key,
    peer_id_from_text,
    peer_id_to_text,
    public_key_from_peer_id,
    sign_bytes,
    verify_bytes,
)

__all__ = [
    "CERTIFICATE_HEADER",
    "MAX_CERTIFICATE_SIZE",
    "MAX_LIST_SIZE",
    "MAX_REVOCATIONS",
    "REVOCATIONS_NAMESPACE",
    "Membership",
    "MembershipCertificate",
    "NotAMember",
    "RevocationList",
    "decode_certificate",
    "decode_revocations",
    "certificate_from_text",
    "certificate_issuer",
    "certificate_to_text",
    "issue_certificate",
    "parse_owner",
    "revocations_key",
    "select_revocations",
    "shown_certificate",
    "sign_revocations",
]

MAX_REVOCATIONS = 1000
MAX_LIST_SIZE = 256 + MAX_REVOCATIONS * 64  # one entry: a 38-byte peer id, a float, msgpack framing
REVOCATIONS_NAMESPACE = "petals-members"
#: The first word of a certificate file (`petals member add` writes it, daemons and clients read it).
CERTIFICATE_HEADER = "petals-member-certificate/1"
_CERT_DOMAIN = b"petals/member-certificate/1\n"
_LIST_DOMAIN = b"petals/revocations/1\n"


class NotAMember(PetalsError):
    """A peer is not admitted to a members-only swarm; `reason` says why, in words to act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_owner(text: str) -> bytes:
    """A swarm owner's peer id (text) as bytes; MalformedMessage unless it embeds an Ed25519 key."""
    raw = peer_id_from_text(text)
    try:
        public_key_from_peer_id(raw)
    except BadSignature as exc:
        raise MalformedMessage(f"swarm owner {text!r} is not an Ed25519 peer id (see `petals keygen`)") from exc
    return raw


# ----------------------------------------------------------------------------- certificates


@dataclass(frozen=True, slots=True)
class MembershipCertificate:
    """The owner's word that `member` belongs to the swarm from `issued_at` until `expires_at`."""

    owner: bytes
    member: bytes
    issued_at: float
    expires_at: float

    def describe(self) -> str:
        return (f"member {peer_id_to_text(self.member)} of swarm {peer_id_to_text(self.owner)} until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.expires_at))}")


def issue_certificate(owner_key: Ed25519PrivateKey, member: bytes, *, issued_at: float, lifetime: float) -> bytes:
    """The signed certificate blob for `member` (a peer id), valid for `lifetime` seconds."""
    if lifetime <= 0:
        raise ValueError("a certificate's lifetime must be positive")
    public_key_from_peer_id(member)  # BadSignature: a member must have an Ed25519 peer id
    body = msgpack.packb([1, peer_id_from_private_key(owner_key), member, float(issued_at),
                          float(issued_at + lifetime)], use_bin_type=True)
    return msgpack.packb([body, sign_bytes(owner_key, _CERT_DOMAIN, body)], use_bin_type=True)


def decode_certificate(blob: bytes, *, owner: bytes, now: float) -> MembershipCertificate:
    """Check a certificate blob against the swarm's `owner` and the clock; NotAMember if it fails.
    Says nothing about *who* presents it: the caller compares `member` with the authenticated peer."""
    fields = _open_signed(blob, MAX_CERTIFICATE_SIZE, _CERT_DOMAIN, owner, "membership certificate", NotAMember,
                          lambda f: len(f) == 5 and type(f[2]) is bytes and all(type(x) is float for x in f[3:]))
    _, cert_owner, member, issued_at, expires_at = fields
    if expires_at <= now:
        raise NotAMember(f"the membership certificate expired "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires_at))}")
    return MembershipCertificate(owner=cert_owner, member=member, issued_at=issued_at, expires_at=expires_at)


def certificate_issuer(blob: bytes) -> bytes:
    """The owner a certificate blob names (not yet verified: `shown_certificate` does that)."""
    fields = _unpack(_signed_body(blob, MAX_CERTIFICATE_SIZE, "membership certificate", NotAMember), NotAMember,
                     "membership certificate")
    if not (isinstance(fields, list) and len(fields) == 5 and type(fields[1]) is bytes):
        raise NotAMember("the membership certificate is malformed")
    return fields[1]


def shown_certificate(blob: bytes, peer: bytes, now: float) -> MembershipCertificate:
    """A certificate `peer` shows outside a members-only swarm (to clients choosing daemons by
    issuer): valid, signed by the issuer it names, and for exactly `peer`; NotAMember otherwise.
    Revocation is the caller's check (the issuer's list: `RevocationList.voids`)."""
    cert = decode_certificate(blob, owner=certificate_issuer(blob), now=now)
    if cert.member != peer:
        raise NotAMember(f"peer {_text(peer)} shows the certificate of {_text(cert.member)}")
    return cert


def certificate_to_text(blob: bytes) -> str:
    """One line for a file: the header, a space, the blob in base64."""
    return f"{CERTIFICATE_HEADER} {base64.b64encode(blob).decode('ascii')}\n"


def certificate_from_text(text: str) -> bytes:
    """Inverse of `certificate_to_text`; NotAMember for anything else."""
    parts = text.split()
    if len(parts) != 2 or parts[0] != CERTIFICATE_HEADER:
        raise NotAMember(f"not a membership certificate (expected a line '{CERTIFICATE_HEADER} BASE64')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error as exc:
        raise NotAMember("the membership certificate is not valid base64") from exc
    if len(blob) > MAX_CERTIFICATE_SIZE:
        raise NotAMember("the membership certificate is too large")
    return blob


# --------------------------------------------------------------------------- revocation list


@dataclass(frozen=True, slots=True)
class RevocationList:
    """`revoked`: peer id -> time; that peer's certificates issued at or before it are void."""

    owner: bytes
    seq: int
    revoked: dict[bytes, float] = field(default_factory=dict)

    def voids(self, certificate: MembershipCertificate) -> bool:
        revoked_at = self.revoked.get(certificate.member)
        return revoked_at is not None and certificate.issued_at <= revoked_at


def revocations_key(owner: bytes) -> str:
    """The DHT key of a swarm's revocation list."""
    return f"/{REVOCATIONS_NAMESPACE}/{peer_id_to_text(owner)}"


def _owner_of_key(key: str | bytes) -> bytes:
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    parts = text.split("/")
    if len(parts) != 3 or parts[0] != "" or parts[1] != REVOCATIONS_NAMESPACE:
        raise BadRecord(f"not a revocation list key: {text[:120]!r}")
    try:
        return parse_owner(parts[2])
    except MalformedMessage as exc:
        raise BadRecord(str(exc)) from exc


def sign_revocations(owner_key: Ed25519PrivateKey, revocations: RevocationList) -> bytes:
    if peer_id_from_private_key(owner_key) != revocations.owner:
        raise ValueError("only the swarm owner's key signs its revocation list")
    if len(revocations.revoked) > MAX_REVOCATIONS:
        raise ValueError(f"a revocation list holds at most {MAX_REVOCATIONS} peers")
    entries = [[peer, float(at)] for peer, at in sorted(revocations.revoked.items())]
    body = msgpack.packb([1, revocations.owner, int(revocations.seq), entries], use_bin_type=True)
    return msgpack.packb([body, sign_bytes(owner_key, _LIST_DOMAIN, body)], use_bin_type=True)


def decode_revocations(blob: bytes, *, owner: bytes | None = None, key: str | bytes | None = None) -> RevocationList:
    """Check a revocation list signed by `owner` (or by the owner its DHT `key` names); BadRecord."""
    expected = owner if owner is not None else _owner_of_key(key or "")
    fields = _open_signed(blob, MAX_LIST_SIZE, _LIST_DOMAIN, expected, "revocation list", BadRecord,
                          lambda f: len(f) == 4 and type(f[2]) is int and f[2] >= 0 and isinstance(f[3], list)
                          and len(f[3]) <= MAX_REVOCATIONS)
    _, list_owner, seq, entries = fields
    revoked: dict[bytes, float] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is bytes and type(entry[1]) is float):
            raise BadRecord("a revocation list entry is not [peer id, time]")
        revoked[entry[0]] = entry[1]
    return RevocationList(owner=list_owner, seq=seq, revoked=revoked)


def select_revocations(blobs: list[bytes], *, key: str | bytes) -> int:
    """Index of the newest valid list among `blobs` (highest seq); BadRecord if none is valid."""
    best, best_seq = -1, -1
    for i, blob in enumerate(blobs):
        try:
            seq = decode_revocations(blob, key=key).seq
        except BadRecord:
            continue
        if seq > best_seq:
            best, best_seq = i, seq
    if best < 0:
        raise BadRecord("no valid revocation list among the candidates")
    return best


# --------------------------------------------------------------------------------- the policy


@dataclass
class Membership:
    """One peer's view of a members-only swarm: whom to admit, given the newest revocation list.

    `certificate`: this peer's own certificate blob (None for the owner, who needs none).
    """

    owner: bytes
    certificate: bytes | None = None
    revocations: RevocationList | None = None
    revocations_blob: bytes | None = None

    def check_own(self, peer: bytes, now: float) -> MembershipCertificate | None:
        """Our own standing (None: we are the owner); NotAMember with what to do about it."""
        if peer == self.owner:
            return None
        if self.certificate is None:
            raise NotAMember(f"this peer ({_text(peer)}) needs a membership certificate for swarm "
                             f"{_text(self.owner)}: ask its owner to run `petals member add {_text(peer)}`")
        cert = decode_certificate(self.certificate, owner=self.owner, now=now)
        if cert.member != peer:
            raise NotAMember(f"the certificate is for peer {_text(cert.member)}, but this peer is {_text(peer)} "
                             "(wrong identity key?)")
        return cert

    def check(self, peer: bytes, certificate: bytes | None, now: float) -> MembershipCertificate | None:
        """Admit `peer` (authenticated) presenting `certificate`: its certificate, None for the
        owner; NotAMember otherwise."""
        if peer == self.owner:
            return None
        if certificate is None:
            raise NotAMember(f"peer {_text(peer)} has no membership certificate for swarm {_text(self.owner)}")
        cert = decode_certificate(certificate, owner=self.owner, now=now)
        if cert.member != peer:
            raise NotAMember(f"peer {_text(peer)} shows the certificate of {_text(cert.member)}")
        if self.revocations is not None and self.revocations.voids(cert):
            raise NotAMember(f"peer {_text(peer)} was removed from swarm {_text(self.owner)} (revocation list "
                             f"seq {self.revocations.seq})")
        return cert

    def still_valid(self, cert: MembershipCertificate | None, now: float) -> bool:
        """Whether an admitted peer's certificate still holds (expiry, the current list)."""
        if cert is None:
            return True  # the owner
        return cert.expires_at > now and not (self.revocations is not None and self.revocations.voids(cert))

    def learn(self, blob: bytes) -> bool:
        """Adopt a revocation list if it is valid and newer than ours; whether it was adopted."""
        try:
            revocations = decode_revocations(blob, owner=self.owner)
        except BadRecord:
            return False
        if self.revocations is not None and revocations.seq <= self.revocations.seq:
            return False
        self.revocations, self.revocations_blob = revocations, blob
        return True


def _text(peer: bytes) -> str:
    return peer_id_to_text(peer)


def _open_signed(blob: bytes, limit: int, domain: bytes, owner: bytes, what: str, error: type[Exception],
                 shape: Callable[[list[Any]], bool]) -> list[Any]:
    """The fields of a signed body [1, owner, ...] after checking its size, `shape`, that `owner`
    is the one named and signed it; `error` (with what is wrong) otherwise."""
    body = _signed_body(blob, limit, what, error)
    fields = _unpack(body, error, what)
    if not (isinstance(fields, list) and len(fields) >= 2 and fields[0] == 1 and type(fields[1]) is bytes
            and shape(fields)):
        raise error(f"the {what} is malformed")
    if fields[1] != owner:
        raise error(f"the {what} is for swarm {_text(fields[1])}, not {_text(owner)}")
    try:
        verify_bytes(owner, domain, body, _envelope(blob)[1])
    except BadSignature as exc:
        raise error(f"the {what}'s signature does not verify for owner {_text(owner)}") from exc
    return fields


def _envelope(blob: bytes) -> tuple[bytes, bytes]:
    fields = msgpack.unpackb(blob, raw=False)  # callers ran _signed_body first: cannot fail here
    return fields[0], fields[1]


def _signed_body(blob: bytes, limit: int, what: str, error: type[Exception]) -> bytes:
    if type(blob) is not bytes or len(blob) > limit:
        raise error(f"the {what} is not bytes of at most {limit}")
    fields = _unpack(blob, error, what)
    if not (isinstance(fields, list) and len(fields) == 2 and type(fields[0]) is bytes and type(fields[1]) is bytes):
        raise error(f"the {what} is not a signed body")
    return fields[0]


def _unpack(data: bytes, error: type[Exception], what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_LIST_SIZE,
                               max_str_len=64, max_array_len=MAX_REVOCATIONS + 4, max_map_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise error(f"the {what} is not valid msgpack") from exc
