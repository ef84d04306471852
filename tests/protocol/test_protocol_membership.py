"""Membership certificates and revocation lists, in memory (petals_protocol.membership)."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petals_protocol.errors import BadRecord
from petals_protocol.membership import (
    Membership,
    NotAMember,
    RevocationList,
    certificate_from_text,
    certificate_issuer,
    certificate_to_text,
    decode_certificate,
    decode_revocations,
    issue_certificate,
    revocations_key,
    select_revocations,
    shown_certificate,
    sign_revocations,
)
from petals_protocol.signing import peer_id_from_private_key

NOW = 1_800_000_000.0


def _key() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, peer_id_from_private_key(key)


def test_certificate_round_trip_and_every_way_it_fails() -> None:
    owner_key, owner = _key()
    _, member = _key()
    _, other = _key()
    blob = issue_certificate(owner_key, member, issued_at=NOW, lifetime=3600)
    assert certificate_from_text(certificate_to_text(blob)) == blob
    cert = decode_certificate(blob, owner=owner, now=NOW + 10)
    assert (cert.member, cert.expires_at) == (member, NOW + 3600)
    membership = Membership(owner=owner)
    assert membership.check(member, blob, NOW) == cert
    assert membership.check(owner, None, NOW) is None  # the owner needs none
    with pytest.raises(NotAMember, match="expired"):
        membership.check(member, blob, NOW + 3600)
    with pytest.raises(NotAMember, match="shows the certificate of"):
        membership.check(other, blob, NOW)  # a stolen certificate is useless without the key
    with pytest.raises(NotAMember, match="no membership certificate"):
        membership.check(other, None, NOW)
    with pytest.raises(NotAMember, match="is for swarm"):
        Membership(owner=other).check(member, blob, NOW)
    forged_key, _ = _key()
    forged = bytearray(issue_certificate(forged_key, member, issued_at=NOW, lifetime=3600))
    with pytest.raises(NotAMember):
        membership.check(member, bytes(forged), NOW)
    tampered = bytearray(blob)
    tampered[40] ^= 1
    with pytest.raises(NotAMember):
        membership.check(member, bytes(tampered), NOW)
    for junk in (b"", b"\x00" * 10, b"\x92\xc4\x01a\xc4\x01b", b"x" * 5000):
        with pytest.raises(NotAMember):
            membership.check(member, junk, NOW)
    with pytest.raises(NotAMember, match="not a membership certificate"):
        certificate_from_text("hello world")


def test_a_shown_certificate_holds_only_for_its_peer_and_its_named_issuer() -> None:
    """Outside a members-only swarm (allowed_peers by issuer): the blob names its issuer, whose
    signature must verify; the member must be the peer showing it."""
    import msgpack

    from petals_protocol.messages import InfoResponse, decode_message, encode_message

    issuer_key, issuer = _key()
    _, member = _key()
    _, other = _key()
    blob = issue_certificate(issuer_key, member, issued_at=NOW, lifetime=3600)
    assert certificate_issuer(blob) == issuer
    assert shown_certificate(blob, member, NOW).owner == issuer
    with pytest.raises(NotAMember, match="shows the certificate of"):
        shown_certificate(blob, other, NOW)
    with pytest.raises(NotAMember, match="expired"):
        shown_certificate(blob, member, NOW + 3600)
    body, signature = msgpack.unpackb(blob)
    fields = msgpack.unpackb(body)
    fields[1] = other  # claims another issuer, keeps the first one's signature
    claimed = msgpack.packb([msgpack.packb(fields, use_bin_type=True), signature], use_bin_type=True)
    assert certificate_issuer(claimed) == other
    with pytest.raises(NotAMember, match="signature does not verify"):
        shown_certificate(claimed, member, NOW)
    for junk in (b"", b"x" * 5000, msgpack.packb([b"a", b"b"])):
        with pytest.raises(NotAMember):
            shown_certificate(junk, member, NOW)
    # Daemons show it in their info reply (elided when they have none).
    info = dict(peer_id=member, version="1", model_name="m", model_fingerprint="a" * 64, num_blocks=2,
                start_block=0, end_block=2, dtype="float32", state="online", max_length=8, max_batch_size=1,
                max_sessions=1, active_sessions=0, cache_tokens_free=8, throughput=1.0, public_name="")
    assert decode_message(encode_message(InfoResponse(**info, certificate=blob))).certificate == blob
    assert decode_message(encode_message(InfoResponse(**info))).certificate is None


def test_revocation_voids_older_certificates_only_and_newest_list_wins() -> None:
    owner_key, owner = _key()
    _, member = _key()
    old = issue_certificate(owner_key, member, issued_at=NOW, lifetime=3600)
    new = issue_certificate(owner_key, member, issued_at=NOW + 100, lifetime=3600)
    membership = Membership(owner=owner)
    first = sign_revocations(owner_key, RevocationList(owner=owner, seq=1, revoked={member: NOW + 50}))
    empty = sign_revocations(owner_key, RevocationList(owner=owner, seq=2))
    assert membership.learn(first)
    with pytest.raises(NotAMember, match="was removed"):
        membership.check(member, old, NOW + 60)
    assert membership.check(member, new, NOW + 160) is not None  # re-admitted by a later certificate
    assert not membership.still_valid(decode_certificate(old, owner=owner, now=NOW), NOW + 60)
    assert not membership.learn(first)  # not newer
    assert membership.learn(empty)  # the owner took the revocation back
    assert membership.check(member, old, NOW + 60) is not None
    assert not membership.learn(first)  # an older list never wins again
    key = revocations_key(owner)
    assert select_revocations([first, b"junk", empty], key=key) == 2
    assert decode_revocations(empty, key=key).seq == 2
    other_key, other = _key()
    with pytest.raises(BadRecord):  # signed by someone else than the key's owner
        decode_revocations(sign_revocations(other_key, RevocationList(owner=other, seq=5)), key=key)
    with pytest.raises(ValueError):
        sign_revocations(other_key, RevocationList(owner=owner, seq=5))
    with pytest.raises(BadRecord):
        decode_revocations(empty, key="/petals-members/not-a-peer-id")
