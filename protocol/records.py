"""Signed DHT records: what a daemon serves, and every rule a receiver checks before believing it.

Blob layout (msgpack): {"record": <bin: msgpack map of the ServerRecord fields>, "sig": <bin 64>}.
The signature covers b"petals/record/1\\n" + the exact record bytes, so verification never depends
on re-encoding, and a record signature can never be mistaken for a response signature. There is
no public key in the blob: the record names its peer id, which embeds the Ed25519 key, so "a
record that names a peer is signed by that peer" is checked by construction.

Freshness lives inside the signed value (py-libp2p keeps values 24 h and has no per-record TTL):
`expires_at` bounds how long a record is believed, `seq` orders a daemon's successive records.
Keys: "/petals/<fingerprint>/<peer id text>" (namespace "petals", whose validator is
`decode_record`) and "/petals-model/<fingerprint>" (the model's provider index). The leading
"/petals" also keeps py-libp2p from hex-decoding keys that happen to look like hex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import BadRecord, ProtocolError
from .ids import is_valid_fingerprint
from .messages import (
    MAX_NAME_LENGTH,
    MAX_PEER_ID_SIZE,
    SERVER_STATES,
    SIGNATURE_SIZE,
    _Bytes,
    _check_fields,
    _f,
    _fields_from_wire,
    _fields_to_wire,
    _Fingerprint,
    _Float,
    _Names,
    _opt,
    _Spec,
    _Text,
    _UInt,
    unpack_strict,
)
from .signing import peer_id_from_private_key, peer_id_from_text, peer_id_to_text, sign_bytes, verify_bytes

__all__ = [
    "MAX_RECORD_SIZE",
    "MAX_TTL",
    "MAX_ADDRS",
    "MAX_ADDR_LENGTH",
    "MAX_NEXT_RTTS",
    "RECORD_NAMESPACE",
    "MODEL_INDEX_NAMESPACE",
    "REACHABILITY",
    "ServerRecord",
    "encode_record",
    "decode_record",
    "select_record",
    "newer",
    "record_key",
    "model_index_key",
    "parse_record_key",
]

MAX_RECORD_SIZE = 8 * 1024  # a record is ~0.5-1.5 KiB; 8 KiB leaves room for 16 long relay addrs
MAX_TTL = 3600.0  # seconds; a record claiming to live longer is refused (announce well below it)
MAX_ADDRS = 16
MAX_ADDR_LENGTH = 256  # "/ip4/.../tcp/N/p2p/<relay>/p2p-circuit/p2p/<peer>" is ~140 characters
RECORD_NAMESPACE = "petals"
MODEL_INDEX_NAMESPACE = "petals-model"
_RECORD_DOMAIN = b"petals/record/1\n"
#: What a daemon learnt about dialing it (petalsd/reachability.py); "public" ones serve as relays.
REACHABILITY = ("public", "private", "unknown")
#: Client peer ids one record may name as its operator's own (`clients`).
MAX_RECORD_CLIENTS = 4
#: Daemons after its span one record may give a measured round trip to (`next_rtts`).
MAX_NEXT_RTTS = 8
#: A round trip longer than this is not a usable leg (and is refused in a record).
MAX_RTT = 60.0


class _Bool(_Spec):
    def check(self, value: Any) -> str | None:
        return None if type(value) is bool else f"must be a bool, got {type(value).__name__}"


class _Tuple(_Spec):
    """A tuple of values, a list on the wire."""

    def to_wire(self, value: tuple[Any, ...]) -> Any:
        return list(value)

    def from_wire(self, raw: Any) -> Any:
        return tuple(raw) if isinstance(raw, (list, tuple)) else raw


class _Addrs(_Tuple):
    """Multiaddr strings (relay circuit addresses included), bounded in count and length."""

    def check(self, value: Any) -> str | None:
        if type(value) is not tuple:
            return f"must be a tuple of str, got {type(value).__name__}"
        if len(value) > MAX_ADDRS:
            return f"has {len(value)} addresses (max {MAX_ADDRS})"
        for addr in value:
            if type(addr) is not str or not 1 < len(addr) <= MAX_ADDR_LENGTH or not addr.startswith("/"):
                return f"entries must be multiaddr strings of at most {MAX_ADDR_LENGTH} characters"
        return None


class _PeerIds(_Tuple):
    """A few binary peer ids."""

    def check(self, value: Any) -> str | None:
        if type(value) is not tuple or len(value) > MAX_RECORD_CLIENTS:
            return f"must be a tuple of at most {MAX_RECORD_CLIENTS} peer ids"
        if any(type(p) is not bytes or not 0 < len(p) <= MAX_PEER_ID_SIZE for p in value):
            return f"entries must be peer ids of at most {MAX_PEER_ID_SIZE} bytes"
        return None


class _NextRtts(_Tuple):
    """(peer id, round-trip seconds) pairs, a few, each peer once; [peer id, seconds] on the wire."""

    def to_wire(self, value: tuple[tuple[bytes, float], ...]) -> Any:
        return [list(pair) for pair in value]

    def from_wire(self, raw: Any) -> Any:
        if not isinstance(raw, (list, tuple)):
            return raw
        return tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in raw)

    def check(self, value: Any) -> str | None:
        if type(value) is not tuple or len(value) > MAX_NEXT_RTTS:
            return f"must be a tuple of at most {MAX_NEXT_RTTS} (peer id, seconds) pairs"
        for pair in value:
            if type(pair) is not tuple or len(pair) != 2:
                return "entries must be (peer id, seconds) pairs"
            peer, rtt = pair
            if type(peer) is not bytes or not 0 < len(peer) <= MAX_PEER_ID_SIZE:
                return f"peer ids must be at most {MAX_PEER_ID_SIZE} bytes"
            if type(rtt) is not float or not 0.0 < rtt <= MAX_RTT:
                return f"round trips must be floats in (0, {MAX_RTT:.0f}] seconds"
        if len({peer for peer, _ in value}) != len(value):
            return "names a peer twice"
        return None


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """What a daemon announces for one model.

    `throughput`: block-steps per second for one-token inference steps, i.e. the span's length
    divided by the time of one decode step through it (what routing divides a hop's length by). `cache_tokens_free`: KV-cache room, in tokens, for
    new sessions. `expires_at`: unix time after which nobody should believe the record.
    `seq`: increases with every record the daemon signs (a restart must not reuse lower values:
    use e.g. the unix time in milliseconds). `using_relay`: `addrs` are `/p2p-circuit` addresses
    through relays; `reachability`: whether others can dial it directly ("public" ones also relay).
    `next_rtts`: round trips the daemon measured to daemons serving the block right after its span
    (petalsd/neighbours.py): with push forwarding, its outputs travel those legs, which the client
    cannot measure (client/routing.py).
    """

    peer_id: bytes = _f(_Bytes(1, MAX_PEER_ID_SIZE))
    model_fingerprint: str = _f(_Fingerprint())
    model_name: str = _f(_Text(MAX_NAME_LENGTH))
    start_block: int = _f(_UInt())
    end_block: int = _f(_UInt())
    num_blocks: int = _f(_UInt())
    state: str = _f(_Text(16, SERVER_STATES))
    throughput: float = _f(_Float())
    cache_tokens_free: int = _f(_UInt())
    addrs: tuple[str, ...] = _f(_Addrs())
    public_name: str = _f(_Text(MAX_NAME_LENGTH))
    version: str = _f(_Text(MAX_NAME_LENGTH))
    expires_at: float = _f(_Float())
    seq: int = _f(_UInt())
    using_relay: bool = _f(_Bool())
    # Added after records shipped: elided when None, so older peers still decode our records.
    reachability: str | None = _opt(_Text(16, REACHABILITY), elidable=True)
    # Peer ids of clients the daemon's operator runs (--own-clients): served first as contributors.
    clients: tuple[bytes, ...] | None = _opt(_PeerIds(), elidable=True)
    # LoRA adapters clients may select (petalsd --adapters); elided when none.
    adapters: tuple[str, ...] | None = _opt(_Names(), elidable=True)
    # Measured round trips to the next span's daemons; elided when none (older records lack it).
    next_rtts: tuple[tuple[bytes, float], ...] | None = _opt(_NextRtts(), elidable=True)

    def __post_init__(self) -> None:
        _check_fields(self, BadRecord)
        if not self.start_block < self.end_block <= self.num_blocks:
            span = f"[{self.start_block}, {self.end_block})"
            raise BadRecord(f"span {span} is empty or not within {self.num_blocks} blocks")

    @property
    def peer_id_text(self) -> str:
        return peer_id_to_text(self.peer_id)


def encode_record(private_key: Ed25519PrivateKey, record: ServerRecord) -> bytes:
    """Sign and serialise a record; the key must be the one the record's peer id embeds."""
    if peer_id_from_private_key(private_key) != record.peer_id:
        raise ValueError("the signing key does not belong to the record's peer id")
    body = msgpack.packb(_fields_to_wire(record), use_bin_type=True)
    blob = msgpack.packb({"record": body, "sig": sign_bytes(private_key, _RECORD_DOMAIN, body)}, use_bin_type=True)
    if len(blob) > MAX_RECORD_SIZE:
        raise BadRecord(f"encoded record is {len(blob)} bytes (max {MAX_RECORD_SIZE}): fewer or shorter addrs")
    return blob


def open_envelope(blob: bytes, body_key: str) -> tuple[bytes, bytes]:
    """The body and signature of a signed blob {body_key: bytes, "sig": 64 bytes} (records and
    evidence reports share this envelope); BadRecord if it is not exactly that."""
    outer = unpack_strict(blob)
    if not isinstance(outer, dict) or outer.keys() != {body_key, "sig"}:
        raise BadRecord(f"{body_key} blob must be a map with exactly '{body_key}' and 'sig'")
    body, sig = outer[body_key], outer["sig"]
    if type(body) is not bytes or type(sig) is not bytes or len(sig) != SIGNATURE_SIZE:
        raise BadRecord(f"{body_key} blob needs '{body_key}' bytes and a {SIGNATURE_SIZE}-byte 'sig'")
    return body, sig


def decode_record(
    blob: bytes,
    *,
    now: float,
    expected_peer_id: bytes | None = None,
    expected_fingerprint: str | None = None,
    max_size: int = MAX_RECORD_SIZE,
    max_ttl: float = MAX_TTL,
) -> ServerRecord:
    """Parse and check a record blob; BadRecord (only) for anything untrustworthy.

    Checks: size, structure, field types and ranges, signature by the peer the record names,
    not expired (`expires_at > now`), not too far ahead (`expires_at <= now + max_ttl`), and the
    peer / fingerprint the caller expects (e.g. from the DHT key it was stored under).
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite unix time, got {now}")
    if not isinstance(blob, bytes):
        raise BadRecord(f"record must be bytes, got {type(blob).__name__}")
    if len(blob) > max_size:
        raise BadRecord(f"record is {len(blob)} bytes (max {max_size})")
    try:
        body, sig = open_envelope(blob, "record")
        fields = unpack_strict(body)
        if not isinstance(fields, dict):
            raise BadRecord("record body must be a map")
        record = ServerRecord(**_fields_from_wire(ServerRecord, fields, BadRecord))
        verify_bytes(record.peer_id, _RECORD_DOMAIN, body, sig)
    except BadRecord:
        raise
    except ProtocolError as exc:  # MalformedMessage from msgpack, BadSignature from the key/signature
        raise BadRecord(f"{exc.code.value}: {exc.message}") from exc
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        raise BadRecord(f"record names peer {record.peer_id_text}, expected {peer_id_to_text(expected_peer_id)}")
    if expected_fingerprint is not None and record.model_fingerprint != expected_fingerprint:
        raise BadRecord(f"record is for model {record.model_fingerprint!r}, expected {expected_fingerprint!r}")
    if record.expires_at <= now:
        raise BadRecord(f"record of {record.peer_id_text} expired {now - record.expires_at:.1f} s ago")
    if record.expires_at > now + max_ttl:
        lifetime = record.expires_at - now
        raise BadRecord(f"record of {record.peer_id_text} claims to live {lifetime:.0f} s (max {max_ttl:.0f})")
    return record


def newer(a: ServerRecord, b: ServerRecord) -> ServerRecord:
    """The record to keep of two from the same peer: higher seq, then later expiry; `a` on a full tie."""
    if a.peer_id != b.peer_id:
        raise ValueError("only records of the same peer can be ordered")
    return b if (b.seq, b.expires_at) > (a.seq, a.expires_at) else a


def select_record(
    blobs: list[bytes],
    *,
    now: float,
    expected_peer_id: bytes | None = None,
    expected_fingerprint: str | None = None,
) -> int:
    """Index of the newest valid blob (a DHT validator's `select` for one key); BadRecord if none is.

    Order as in `newer`: higher seq, then later expiry; the first one wins a tie.
    """
    best_index, best_order = -1, (-1, -math.inf)
    for index, blob in enumerate(blobs):
        try:
            record = decode_record(
                blob, now=now, expected_peer_id=expected_peer_id, expected_fingerprint=expected_fingerprint
            )
        except BadRecord:
            continue  # one forged or stale copy must not hide the good ones
        if (record.seq, record.expires_at) > best_order:
            best_index, best_order = index, (record.seq, record.expires_at)
    if best_index < 0:
        raise BadRecord(f"none of {len(blobs)} records is valid")
    return best_index


def record_key(fingerprint: str, peer_id_text: str, namespace: str = RECORD_NAMESPACE) -> str:
    """"/petals/<fingerprint>/<peer id>": where a daemon stores its record for that model (other
    per-peer values of a model, such as evidence reports, live under their own `namespace`)."""
    if not is_valid_fingerprint(fingerprint):
        raise ValueError(f"invalid model fingerprint {fingerprint!r}")
    peer_id_from_text(peer_id_text)  # refuses what is not a peer id
    return f"/{namespace}/{fingerprint}/{peer_id_text}"


def model_index_key(fingerprint: str) -> str:
    """"/petals-model/<fingerprint>": the key daemons provide so clients can find who serves a model."""
    if not is_valid_fingerprint(fingerprint):
        raise ValueError(f"invalid model fingerprint {fingerprint!r}")
    return f"/{MODEL_INDEX_NAMESPACE}/{fingerprint}"


def parse_record_key(key: str | bytes, namespace: str = RECORD_NAMESPACE) -> tuple[str, bytes]:
    """(fingerprint, peer id bytes) from a record key (of `namespace`); BadRecord if it is not one."""
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord("record key is not UTF-8") from exc
    if not isinstance(key, str):
        raise BadRecord(f"record key must be str, got {type(key).__name__}")
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != namespace or not is_valid_fingerprint(parts[2]):
        raise BadRecord(f"not a record key: {key[:200]!r}")
    try:
        peer_id = peer_id_from_text(parts[3])
    except ProtocolError as exc:
        raise BadRecord(f"record key has an invalid peer id: {exc.message}") from exc
    return parts[2], peer_id
