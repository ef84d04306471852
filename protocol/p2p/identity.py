"""The daemon's persistent libp2p identity: one Ed25519 key in a file only its owner can read.

File format: the standard libp2p protobuf private key (`PrivateKey{Type=Ed25519, Data=seed}`), the
bytes `libp2p.identity_utils.save_identity` writes. On load we also accept the 64-byte
`seed || public key` form that go-libp2p writes, after checking that its halves agree.

Permissions policy (like OpenSSH with private keys): a key file that its group or others may
read is *refused*, not silently fixed. A key that others could read may already be copied; the
operator must learn that, rotate the key if needed and `chmod 600` the file. We never loosen or
tighten permissions of a file we did not create.

Creation is atomic and race-free: the key is written to a temporary 0600 file in the same
directory, fsynced, then hard-linked to the final name (which fails if the name exists). So a
crash never leaves a half-written key, and two daemons started at once with the same path end
up sharing one identity instead of one overwriting the other's.

Exclusive use: two running daemons with one peer id look like one peer to the swarm (routes to
the second one fail), so a daemon *claims* its key file for as long as it runs (`claim_identity`:
an flock on `KEY.lock`, released by the kernel when the process ends, even on SIGKILL). A second
daemon given the same file is refused with the holder's pid; one started without a key file takes
the first free one of `identity.key`, `identity-2.key`, ... (`claim_free_identity`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as CryptoEd25519PrivateKey
from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey, PublicKey
from libp2p.peer.id import ID

from ..errors import PetalsError

__all__ = [
    "IdentityError",
    "IdentityInUse",
    "IdentityClaim",
    "claim_identity",
    "claim_free_identity",
    "load_or_create_identity",
    "ephemeral_identity",
    "ed25519_private_key",
    "peer_id",
    "peer_id_bytes",
]

logger = logging.getLogger(__name__)

_SEED_SIZE = 32
_KEY_FILE_MODE = 0o600
_KEY_DIR_MODE = 0o700
_MAX_KEY_FILE_SIZE = 4096  # an Ed25519 key file is 36 (or 68) bytes; refuse to slurp anything big


class IdentityError(PetalsError):
    """The identity file cannot be used: unreadable, corrupt, not Ed25519, or readable by others."""

    def __init__(self, path: Path | None, reason: str) -> None:
        where = f"identity file {path}: " if path is not None else ""
        super().__init__(f"{where}{reason}")
        self.path = path
        self.reason = reason


class IdentityInUse(IdentityError):
    """The key file is claimed by another running daemon (`holder_pid`, when it could be read)."""

    def __init__(self, path: Path, holder_pid: int | None) -> None:
        who = f"daemon pid {holder_pid}" if holder_pid else "another running daemon"
        super().__init__(path, f"in use by {who}; give this daemon its own --identity FILE "
                               "(or leave --identity unset to take a free one)")
        self.holder_pid = holder_pid


@dataclass
class IdentityClaim:
    """A key pair and the lock that keeps other daemons off its file while we run."""

    key_pair: KeyPair
    path: Path
    _lock_fd: int

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the file drops the flock
            self._lock_fd = -1


#: How many default key files a host may hold (identity.key, identity-2.key, ...).
MAX_DEFAULT_IDENTITIES = 64


def claim_identity(path: Path) -> IdentityClaim:
    """Load (or create) the key at `path` and hold it for this process's lifetime.

    Raises IdentityInUse if another live process holds it, IdentityError for any other problem.
    """
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    if not path.parent.exists():
        try:
            path.parent.mkdir(mode=_KEY_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise IdentityError(path, f"cannot create directory {path.parent}: {exc.strerror or exc}") from exc
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _KEY_FILE_MODE)
    except OSError as exc:
        raise IdentityError(path, f"cannot open its lock file {lock_path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise IdentityInUse(path, holder) from None
    except OSError as exc:
        os.close(fd)
        raise IdentityError(path, f"cannot lock {lock_path}: {exc.strerror or exc}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return IdentityClaim(load_or_create_identity(path), path, fd)
    except BaseException:
        os.close(fd)
        raise


def claim_free_identity(directory: Path) -> IdentityClaim:
    """The first key file in `directory` that no running daemon holds (created if missing)."""
    directory = Path(directory)
    for n in range(1, MAX_DEFAULT_IDENTITIES + 1):
        name = "identity.key" if n == 1 else f"identity-{n}.key"
        try:
            return claim_identity(directory / name)
        except IdentityInUse:
            continue
    raise IdentityError(directory / "identity.key",
                        f"all {MAX_DEFAULT_IDENTITIES} default key files in {directory} are in use; "
                        "give --identity FILE")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def ephemeral_identity() -> KeyPair:
    """A fresh Ed25519 key pair that lives only in memory (clients, tests, `petals demo`)."""
    return create_new_key_pair()


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the Ed25519 key at `path`, creating it (0600; parent dir 0700 if we create it) if missing.

    Raises IdentityError if the file exists but cannot be read, is corrupt, holds a non-Ed25519
    key, or is readable by its group or others (see the module docstring for why we refuse).
    """
    path = Path(path)
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    key_pair = create_new_key_pair()
    if _create_exclusively(path, key_pair.private_key.serialize()):
        logger.info("created a new identity %s in %s", peer_id(key_pair), path)
        return key_pair
    # Someone created it between our load and our link: use theirs.
    try:
        return _load(path)
    except FileNotFoundError as exc:
        raise IdentityError(path, "vanished while being created") from exc


def _load(path: Path) -> KeyPair:
    """Read and validate a key file; FileNotFoundError (only) when there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityError(path, f"cannot open: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(path, "not a regular file")
        if info.st_mode & 0o077:
            raise IdentityError(
                path,
                f"permissions {stat.S_IMODE(info.st_mode):04o} let others read the private key; "
                f"run `chmod 600 {path}` (and consider a new key if it may have been copied)",
            )
        if info.st_size > _MAX_KEY_FILE_SIZE:
            raise IdentityError(path, f"{info.st_size} bytes is too large for a key file")
        try:
            data = os.read(fd, _MAX_KEY_FILE_SIZE + 1)
        except OSError as exc:
            raise IdentityError(path, f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return KeyPair(*_decode_private_key(path, data))


def _decode_private_key(path: Path, data: bytes) -> tuple[PrivateKey, PublicKey]:
    try:
        proto = PrivateKey.deserialize_from_protobuf(data)
    except Exception as exc:  # protobuf raises DecodeError and assorted others on garbage
        raise IdentityError(path, f"corrupt: not a libp2p private key ({exc.__class__.__name__})") from exc
    if proto.key_type != KeyType.Ed25519.value:
        raise IdentityError(path, f"unsupported key type {proto.key_type} (only Ed25519 is used)")
    raw = bytes(proto.data)
    if len(raw) == 2 * _SEED_SIZE:  # go-libp2p form: seed || public key
        seed, public = raw[:_SEED_SIZE], raw[_SEED_SIZE:]
    elif len(raw) == _SEED_SIZE:
        seed, public = raw, None
    else:
        raise IdentityError(path, f"corrupt: Ed25519 key data is {len(raw)} bytes, expected 32 or 64")
    private_key = Ed25519PrivateKey.from_bytes(seed)
    public_key = private_key.get_public_key()
    if public is not None and public_key.to_bytes() != public:
        raise IdentityError(path, "corrupt: the stored public key does not match the private key")
    return private_key, public_key


def _create_exclusively(path: Path, data: bytes) -> bool:
    """Atomically create `path` holding `data` (0600). False if the path already existed."""
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(mode=_KEY_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise IdentityError(path, f"cannot create directory {parent}: {exc.strerror or exc}") from exc
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise IdentityError(path, f"cannot write in {parent}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _KEY_FILE_MODE)  # mkstemp already uses 0600; be explicit
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise IdentityError(path, f"cannot create: {exc.strerror or exc}") from exc
        _fsync_dir(parent)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable (best effort: some filesystems refuse O_RDONLY dirs)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        logger.debug("cannot open %s to fsync it: %s", directory, exc)
        return
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        logger.debug("cannot fsync %s: %s", directory, exc)
    finally:
        os.close(dir_fd)


def ed25519_private_key(key_pair: KeyPair) -> CryptoEd25519PrivateKey:
    """The same private key as a `cryptography` object, for petals_protocol.signing and records."""
    private_key = key_pair.private_key
    if not isinstance(private_key, Ed25519PrivateKey):
        raise IdentityError(None, f"expected an Ed25519 key, got {private_key.get_type().name}")
    return CryptoEd25519PrivateKey.from_private_bytes(private_key.to_bytes()[:_SEED_SIZE])


def peer_id(key: KeyPair | PublicKey) -> ID:
    """The libp2p peer id of a key pair or public key (for Ed25519 it embeds the public key)."""
    public_key = key.public_key if isinstance(key, KeyPair) else key
    return ID.from_pubkey(public_key)


def peer_id_bytes(key: KeyPair | PublicKey) -> bytes:
    """Binary peer id: for Ed25519, b"\\x00\\x24\\x08\\x01\\x12\\x20" + the 32-byte public key."""
    return peer_id(key).to_bytes()
