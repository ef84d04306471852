"""Signed DHT records: round trip and every validation rule (forgery, expiry, keys, limits)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from protocol_samples import FINGERPRINT, OTHER_SEED, SEED, sample_record

from petals_protocol import (
    MAX_ADDRS,
    MAX_RECORD_SIZE,
    MAX_TTL,
    BadRecord,
    decode_record,
    encode_record,
    model_index_key,
    newer,
    parse_record_key,
    peer_id_from_private_key,
    peer_id_to_text,
    private_key_from_seed,
    record_key,
    select_record,
)

NOW = 1_700_000_000.0
KEY = private_key_from_seed(SEED)
OTHER = private_key_from_seed(OTHER_SEED)
RECORD = sample_record(NOW)


def resign(body: dict[str, object], key=KEY) -> bytes:  # type: ignore[no-untyped-def]
    """Sign an arbitrary body the way encode_record does (to test rules past the signature)."""
    raw = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb({"record": raw, "sig": key.sign(b"petals/record/1\n" + raw)}, use_bin_type=True)


def body_of(blob: bytes) -> dict[str, object]:
    return msgpack.unpackb(msgpack.unpackb(blob)["record"])


def test_round_trip() -> None:
    blob = encode_record(KEY, RECORD)
    assert len(blob) < 1024
    got = decode_record(blob, now=NOW, expected_peer_id=RECORD.peer_id, expected_fingerprint=FINGERPRINT)
    assert got == RECORD
    assert got.addrs[1].endswith("/p2p-circuit/p2p/" + got.peer_id_text)


def test_resign_helper_matches_encode_record() -> None:
    assert decode_record(resign(body_of(encode_record(KEY, RECORD))), now=NOW) == RECORD


def test_cannot_encode_with_someone_elses_key() -> None:
    with pytest.raises(ValueError):
        encode_record(OTHER, RECORD)


def test_signed_by_another_peer_is_refused() -> None:
    """A record naming peer A but signed by B (B posing as A) fails."""
    with pytest.raises(BadRecord, match="signature"):
        decode_record(resign(body_of(encode_record(KEY, RECORD)), key=OTHER), now=NOW)


def test_tampered_record_is_refused() -> None:
    blob = encode_record(KEY, RECORD)
    outer = msgpack.unpackb(blob)
    for field, value in [("end_block", 5), ("throughput", 1e9), ("model_fingerprint", "sha256:evil"), ("seq", 99)]:
        body = body_of(blob)
        body[field] = value
        forged = msgpack.packb({"record": msgpack.packb(body), "sig": outer["sig"]})
        with pytest.raises(BadRecord, match="signature"):
            decode_record(forged, now=NOW)
    flipped = bytearray(outer["sig"])
    flipped[10] ^= 4
    with pytest.raises(BadRecord, match="signature"):
        decode_record(msgpack.packb({"record": outer["record"], "sig": bytes(flipped)}), now=NOW)


def test_unsigned_and_malformed_blobs() -> None:
    blob = encode_record(KEY, RECORD)
    outer = msgpack.unpackb(blob)
    for bad in [
        msgpack.packb({"record": outer["record"]}),
        msgpack.packb({"record": outer["record"], "sig": b""}),
        msgpack.packb({"record": outer["record"], "sig": outer["sig"], "pubkey": b"x"}),
        msgpack.packb([outer["record"], outer["sig"]]),
        msgpack.packb({"record": body_of(blob), "sig": outer["sig"]}),
        msgpack.packb({"record": b"\xc1", "sig": outer["sig"]}),
        b"",
        b"\xc1",
        blob[:-1],
    ]:
        with pytest.raises(BadRecord):
            decode_record(bad, now=NOW)
    with pytest.raises(BadRecord):
        decode_record(bytearray(blob), now=NOW)  # type: ignore[arg-type]


def test_size_limit() -> None:
    blob = encode_record(KEY, RECORD)
    with pytest.raises(BadRecord, match="max"):
        decode_record(blob, now=NOW, max_size=len(blob) - 1)
    with pytest.raises(BadRecord, match="bytes"):
        decode_record(blob + b"\x00" * MAX_RECORD_SIZE, now=NOW)


def test_expiry_rules() -> None:
    blob = encode_record(KEY, RECORD)  # expires at NOW + 300
    decode_record(blob, now=NOW + 299.9)
    with pytest.raises(BadRecord, match="expired"):
        decode_record(blob, now=NOW + 300)
    with pytest.raises(BadRecord, match="expired"):
        decode_record(blob, now=NOW + 86400)
    far = encode_record(KEY, sample_record(NOW, ttl=MAX_TTL + 1))
    with pytest.raises(BadRecord, match="claims to live"):
        decode_record(far, now=NOW)
    decode_record(far, now=NOW + 2)  # fine once it is within MAX_TTL
    with pytest.raises(ValueError):
        decode_record(blob, now=float("nan"))


def test_expected_peer_and_fingerprint() -> None:
    blob = encode_record(KEY, RECORD)
    other_peer = peer_id_from_private_key(OTHER)
    with pytest.raises(BadRecord, match="expected"):
        decode_record(blob, now=NOW, expected_peer_id=other_peer)
    with pytest.raises(BadRecord, match="model"):
        decode_record(blob, now=NOW, expected_fingerprint="sha256:other")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("start_block", 4, "span"),
        ("end_block", 9, "span"),
        ("start_block", -1, "start_block"),
        ("state", "dancing", "state"),
        ("addrs", ["/ip4/1.2.3.4/tcp/1"] * (MAX_ADDRS + 1), "addresses"),
        ("addrs", ["/" + "a" * 300], "multiaddr"),
        ("addrs", ["ip4/1.2.3.4"], "multiaddr"),
        ("addrs", "/ip4/1.2.3.4", "tuple"),
        ("using_relay", 1, "bool"),
        ("throughput", -1.0, "throughput"),
        ("seq", True, "seq"),
        ("peer_id", "12D3KooW", "peer_id"),
        ("model_fingerprint", "a/b", "fingerprint"),
        ("public_name", "x" * 300, "public_name"),
    ],
)
def test_invalid_fields_are_refused_even_when_signed(field: str, value: object, match: str) -> None:
    body = body_of(encode_record(KEY, RECORD))
    body[field] = value
    with pytest.raises(BadRecord, match=match):
        decode_record(resign(body), now=NOW)


def test_missing_and_extra_fields() -> None:
    body = body_of(encode_record(KEY, RECORD))
    del body["seq"]
    with pytest.raises(BadRecord, match="missing"):
        decode_record(resign(body), now=NOW)
    body = body_of(encode_record(KEY, RECORD))
    body["pubkey"] = b"x"
    with pytest.raises(BadRecord, match="unexpected"):
        decode_record(resign(body), now=NOW)


def test_record_naming_a_non_ed25519_peer_is_refused() -> None:
    body = body_of(encode_record(KEY, RECORD))
    body["peer_id"] = b"\x12\x20" + bytes(32)  # a sha256 multihash: no key inside to check with
    with pytest.raises(BadRecord, match="Ed25519"):
        decode_record(resign(body), now=NOW)


def test_local_construction_validates() -> None:
    with pytest.raises(BadRecord):
        dataclasses.replace(RECORD, state="asleep")
    with pytest.raises(BadRecord):
        dataclasses.replace(RECORD, addrs=["/ip4/1.2.3.4"])  # a list, not a tuple


def test_largest_allowed_record_fits() -> None:
    long_addrs = tuple("/dns4/" + "a" * 240 + f"{i:02d}" for i in range(MAX_ADDRS))
    big = dataclasses.replace(RECORD, addrs=long_addrs, public_name="p" * 256, model_name="m" * 256)
    blob = encode_record(KEY, big)  # 16 x 250 chars still fits in 8 KiB
    assert decode_record(blob, now=NOW) == big


def test_newer_and_select() -> None:
    old = sample_record(NOW, seq=1, ttl=600)
    new = sample_record(NOW, seq=2, ttl=60)
    later = dataclasses.replace(new, expires_at=new.expires_at + 10)
    assert newer(old, new) is new and newer(new, old) is new
    assert newer(new, later) is later
    assert newer(new, new) is new
    with pytest.raises(ValueError):
        newer(old, sample_record(NOW, seed=OTHER_SEED))

    blobs = [encode_record(KEY, old), b"garbage", encode_record(KEY, later), encode_record(KEY, new)]
    assert select_record(blobs, now=NOW) == 2
    expired = encode_record(KEY, sample_record(NOW - 1000, seq=5))
    assert select_record([expired, *blobs], now=NOW) == 3
    with pytest.raises(BadRecord):
        select_record([expired, b"garbage"], now=NOW)


def test_keys() -> None:
    text = peer_id_to_text(RECORD.peer_id)
    key = record_key(FINGERPRINT, text)
    assert key == f"/petals/{FINGERPRINT}/{text}"
    assert parse_record_key(key) == (FINGERPRINT, RECORD.peer_id)
    assert parse_record_key(key.encode()) == (FINGERPRINT, RECORD.peer_id)
    assert model_index_key(FINGERPRINT) == f"/petals-model/{FINGERPRINT}"
    for bad in [
        "",
        "/petals",
        f"/petals/{FINGERPRINT}",
        f"/other/{FINGERPRINT}/{text}",
        f"/petals/{FINGERPRINT}/{text}/extra",
        f"/petals//{text}",
        f"/petals/{FINGERPRINT}/0OIl",
        b"\xff\xfe",
        42,
    ]:
        with pytest.raises(BadRecord):
            parse_record_key(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        record_key("a/b", text)
    with pytest.raises(ValueError):
        model_index_key("")


def test_reachability_is_optional_on_the_wire() -> None:
    """Records without `reachability` (older daemons) still decode, and a record without it
    encodes without the key, so older peers decode ours; a bad value is refused."""
    assert RECORD.reachability is None
    assert "reachability" not in body_of(encode_record(KEY, RECORD))
    assert decode_record(encode_record(KEY, RECORD), now=NOW).reachability is None
    private = dataclasses.replace(RECORD, reachability="private", using_relay=True)
    blob = encode_record(KEY, private)
    assert body_of(blob)["reachability"] == "private"
    assert decode_record(blob, now=NOW) == private
    bad = body_of(blob) | {"reachability": "sideways"}
    with pytest.raises(BadRecord):
        decode_record(resign(bad), now=NOW)


def test_next_rtts_are_optional_bounded_and_signed() -> None:
    """`next_rtts` (round trips to the next span's daemons): absent in older records, which stay
    valid; when present, signed like every field, bounded in count and range."""
    from petals_protocol.records import MAX_NEXT_RTTS

    assert RECORD.next_rtts is None
    assert "next_rtts" not in body_of(encode_record(KEY, RECORD))
    other = peer_id_from_private_key(OTHER)
    measured = dataclasses.replace(RECORD, next_rtts=((other, 0.0123),))
    blob = encode_record(KEY, measured)
    assert decode_record(blob, now=NOW) == measured
    assert body_of(blob)["next_rtts"] == [[other, 0.0123]]
    with pytest.raises(BadRecord):  # signed: a relay cannot shorten a leg to attract traffic
        decode_record(resign(body_of(blob) | {"next_rtts": [[other, 0.001]]}, key=OTHER), now=NOW)
    for bad in ([[other, 0.0]], [[other, 61.0]], [[other, float("nan")]], [[other, 1]], [[b"", 0.1]],
                [[other, 0.1], [other, 0.2]], [[other]], [[bytes([i]) * 8, 0.1] for i in range(MAX_NEXT_RTTS + 1)]):
        with pytest.raises(BadRecord):
            decode_record(resign(body_of(blob) | {"next_rtts": bad}), now=NOW)
    full = tuple((bytes([i]) * 38, 59.0) for i in range(MAX_NEXT_RTTS))
    long_addrs = tuple("/dns4/" + "a" * 240 + f"{i:02d}" for i in range(MAX_ADDRS))
    big = dataclasses.replace(RECORD, addrs=long_addrs, public_name="p" * 256, model_name="m" * 256, next_rtts=full)
    assert decode_record(encode_record(KEY, big), now=NOW) == big  # still fits the record size limit
