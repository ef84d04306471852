"""The persistent Ed25519 identity file and the bridge to `cryptography` keys."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey as CryptoEd25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair

from petals_protocol.p2p.identity import (
    IdentityError,
    ed25519_private_key,
    ephemeral_identity,
    load_or_create_identity,
    peer_id,
    peer_id_bytes,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_then_reload_gives_the_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "nested" / "identity.key"
    first = load_or_create_identity(path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700  # directories we create are private too
    second = load_or_create_identity(path)
    assert peer_id(first) == peer_id(second)
    assert first.private_key.to_bytes() == second.private_key.to_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp files left


def test_existing_parent_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    load_or_create_identity(tmp_path / "identity.key")
    assert _mode(tmp_path) == 0o755


def test_file_readable_by_others_is_refused_not_fixed(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    for mode in (0o644, 0o640, 0o604):
        path.chmod(mode)
        with pytest.raises(IdentityError, match=r"permissions 06[0-4][0-4].*chmod 600") as caught:
            load_or_create_identity(path)
        assert caught.value.path == path
        assert _mode(path) == mode  # we never change permissions of a file we did not create
    path.chmod(0o400)  # read-only for the owner is fine
    load_or_create_identity(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage that is not a protobuf \xff\xfe", b"\x08\x01\x12\x05short", b"x" * 5000],
    ids=["empty", "garbage", "short-ed25519", "too-large"],
)
def test_corrupt_file_is_a_clear_error_and_is_not_overwritten(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as caught:
        load_or_create_identity(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(create_secp256k1_key_pair().private_key.serialize())
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="only Ed25519"):
        load_or_create_identity(path)


def test_path_under_a_regular_file_is_a_clear_error(tmp_path: Path) -> None:
    # An unopenable path (EACCES cannot be provoked as root, which CI runs as) reaches the same branch.
    (tmp_path / "not-a-dir").write_bytes(b"")
    with pytest.raises(IdentityError, match="cannot open"):
        load_or_create_identity(tmp_path / "not-a-dir" / "identity.key")


def test_directory_in_place_of_the_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "identity.key").mkdir(mode=0o700)
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path / "identity.key")


def test_go_libp2p_64_byte_form_is_accepted_and_checked(tmp_path: Path) -> None:
    key_pair = ephemeral_identity()
    seed, public = key_pair.private_key.to_bytes(), key_pair.public_key.to_bytes()
    # protobuf PrivateKey{Type=Ed25519 (1), Data=seed||public}: field 1 varint, field 2 bytes(64)
    path = tmp_path / "go.key"
    path.write_bytes(b"\x08\x01\x12\x40" + seed + public)
    path.chmod(0o600)
    assert peer_id(load_or_create_identity(path)) == peer_id(key_pair)
    path.write_bytes(b"\x08\x01\x12\x40" + seed + bytes(32))
    with pytest.raises(IdentityError, match="does not match"):
        load_or_create_identity(path)


def test_concurrent_creation_yields_one_identity(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    results: list[KeyPair] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_identity(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({peer_id(key_pair) for key_pair in results}) == 1


def test_peer_id_bytes_embed_the_public_key() -> None:
    key_pair = ephemeral_identity()
    public = key_pair.public_key.to_bytes()
    assert peer_id_bytes(key_pair) == b"\x00\x24\x08\x01\x12\x20" + public
    assert peer_id_bytes(key_pair.public_key) == peer_id_bytes(key_pair)
    assert peer_id(key_pair).to_base58().startswith("12D3KooW")


def test_cryptography_key_is_the_same_key_both_ways() -> None:
    key_pair = ephemeral_identity()
    crypto_key = ed25519_private_key(key_pair)
    raw_public = crypto_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw_public == key_pair.public_key.to_bytes()

    message = b"petals/response/1 binding"
    assert key_pair.public_key.verify(message, crypto_key.sign(message))
    CryptoEd25519PublicKey.from_public_bytes(raw_public).verify(key_pair.private_key.sign(message), message)
    assert not key_pair.public_key.verify(message + b"!", crypto_key.sign(message))


def test_cryptography_bridge_refuses_other_key_types() -> None:
    with pytest.raises(IdentityError, match="Ed25519"):
        ed25519_private_key(create_secp256k1_key_pair())
