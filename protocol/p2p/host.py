"""A libp2p host configured the way every petals peer needs it, with the py-libp2p workarounds.

What `make_host` fixes compared with `libp2p.new_host()` defaults (see shared notes/py-libp2p.md):
- Security is Noise only. The default host also accepts plaintext and secio peers (bug 5).
- Stream muxer is yamux only (mplex moves bulk at ~10 MB/s).
- `ConnectionConfig(max_connections_per_peer=1)`: with the default every dial waits ~250 ms for
  "happy eyeballs" (bug 1); with it a loopback connect takes ~10-15 ms.
- The swarm's auto-connector is switched off (`min_connections=0` and a once-a-day interval). By
  default it dials up to ~150 peers from the peerstore every 30 s (every daemon a client ever
  looked up in the DHT, say); petals peers choose whom to connect to themselves (routing).
- Optional private network (pnet) key: peers without the same 32-byte key cannot even start the
  Noise handshake. py-libp2p's pnet uses Salsa20 with an 8-byte nonce, so it only interoperates
  with other py-libp2p peers, which is all a petals swarm contains.

`running_host` also fixes that `host.run()` silently ignores addresses it failed to listen on
(e.g. a port in use): it raises ListenError instead of serving on nothing.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

from ..errors import PetalsError

__all__ = [
    "DEFAULT_DIAL_TIMEOUT",
    "SWARM_KEY_HEADER",
    "DialError",
    "ListenError",
    "SwarmKeyError",
    "make_host",
    "load_swarm_key",
    "quiet_libp2p_logs",
    "running_host",
    "listen_multiaddrs",
    "parse_peer_multiaddr",
    "connect",
]

# A loopback connect takes ~15 ms and a WAN one a few RTTs; 10 s leaves room for a slow
# handshake on a loaded machine without hanging a client on a dead address for minutes.
DEFAULT_DIAL_TIMEOUT = 10.0

# The auto-connector runs one cycle at start (empty peerstore: no dials), then once per interval.
_AUTO_CONNECT_OFF_INTERVAL = 24 * 3600.0

SWARM_KEY_HEADER = "/key/swarm/psk/1.0.0/"
_SWARM_KEY_ENCODING = "/base16/"
_SWARM_KEY_SIZE = 32
_MAX_SWARM_KEY_FILE = 1024
# A kad-dht record rejected by a validator is logged as a hex dump (multi-MB lines): cut it.
_MAX_LOG_MESSAGE = 500


class DialError(PetalsError):
    """Could not reach a peer at an address (bad address, refused, handshake failed, timed out)."""

    def __init__(self, peer: str | None, addr: str, reason: str) -> None:
        who = f"peer {peer} at {addr}" if peer else addr
        super().__init__(f"cannot connect to {who}: {reason}")
        self.peer = peer
        self.addr = addr
        self.reason = reason


class ListenError(PetalsError):
    """The host could not listen on a requested address (port in use, address not local...)."""

    def __init__(self, addr: str, reason: str) -> None:
        super().__init__(f"cannot listen on {addr}: {reason}")
        self.addr = addr
        self.reason = reason


class SwarmKeyError(PetalsError):
    """A --swarm-key file that is missing, unreadable or not in the swarm.key format."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"swarm key {path}: {reason}")
        self.path = path
        self.reason = reason


def load_swarm_key(path: Path) -> bytes:
    """Read a go-libp2p style swarm.key: "/key/swarm/psk/1.0.0/", "/base16/", then 64 hex digits.

    Returns the 32-byte pre-shared key for `make_host(psk=...)`.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_SWARM_KEY_FILE + 1)
    except OSError as exc:
        raise SwarmKeyError(path, f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_SWARM_KEY_FILE:
        raise SwarmKeyError(path, "file too large for a swarm key")
    try:
        lines = [line.strip() for line in raw.decode("ascii").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise SwarmKeyError(path, "not a text file") from exc
    if len(lines) != 3 or lines[0] != SWARM_KEY_HEADER:
        raise SwarmKeyError(path, f"expected 3 lines: {SWARM_KEY_HEADER!r}, {_SWARM_KEY_ENCODING!r}, 64 hex digits")
    if lines[1] != _SWARM_KEY_ENCODING:
        raise SwarmKeyError(path, f"unsupported encoding {lines[1]!r} (only {_SWARM_KEY_ENCODING!r})")
    try:
        key = bytes.fromhex(lines[2])
    except ValueError as exc:
        raise SwarmKeyError(path, "key line is not hexadecimal") from exc
    if len(key) != _SWARM_KEY_SIZE:
        raise SwarmKeyError(path, f"key is {len(key)} bytes, expected {_SWARM_KEY_SIZE}")
    return key


def make_host(key_pair: KeyPair, *, psk: bytes | None = None) -> IHost:
    """A Noise-only, yamux-only host with one connection per peer and an optional pnet key.

    The host does not listen until it runs: use `running_host(host, listen_addrs)`.
    """
    if psk is not None and len(psk) != _SWARM_KEY_SIZE:
        raise ValueError(f"psk must be {_SWARM_KEY_SIZE} bytes, got {len(psk)}")
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=create_yamux_muxer_option(),
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=0,
            low_watermark=0,
            auto_connect_interval=_AUTO_CONNECT_OFF_INTERVAL,
        ),
        psk=psk.hex() if psk is not None else None,
    )


class _TruncateLongMessages(logging.Filter):
    """Cut log lines that libp2p fills with hex dumps of whole records down to a readable size."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > _MAX_LOG_MESSAGE:
            record.msg = f"{message[:_MAX_LOG_MESSAGE]}... [{len(message)} chars]"
            record.args = None
        return True


def quiet_libp2p_logs(level: int = logging.WARNING, *, dht_level: int = logging.ERROR) -> None:
    """Route libp2p's logs through the application's handlers at a sane level.

    py-libp2p detaches its "libp2p" logger (propagate=False, no handler) unless LIBP2P_DEBUG is
    set, so its warnings reach stderr through logging's last-resort handler, unformatted. Kademlia
    logs a WARNING for routine events on every RPC (bug 6), hence its own, higher `dht_level`.
    Idempotent: call it once at start-up, after configuring logging.
    """
    root = logging.getLogger("libp2p")
    root.setLevel(level)
    root.propagate = True
    if not any(isinstance(f, _TruncateLongMessages) for f in root.filters):
        root.addFilter(_TruncateLongMessages())
    logging.getLogger("libp2p.kad_dht").setLevel(max(level, dht_level))


@asynccontextmanager
async def running_host(host: IHost, listen_addrs: Sequence[str]) -> AsyncIterator[IHost]:
    """Run `host` listening on every address in `listen_addrs`; stop it when the block exits.

    Raises ListenError if any address could not be bound (libp2p itself only logs that at debug
    level and carries on). Listen on "/ip4/127.0.0.1/tcp/0" for a free port; `listen_multiaddrs`
    then reports the real one.
    """
    multiaddrs = [_parse_listen_addr(addr) for addr in listen_addrs]
    async with host.run(multiaddrs):
        listeners = host.get_network().listeners
        for addr in multiaddrs:
            if str(addr) not in listeners:
                raise ListenError(str(addr), _why_cannot_listen(addr))
        yield host


def _parse_listen_addr(addr: str) -> Multiaddr:
    try:
        return Multiaddr(addr)
    except Exception as exc:  # multiaddr raises several unrelated types for bad input
        raise ListenError(addr, f"not a valid multiaddr ({exc})") from exc


def _why_cannot_listen(addr: Multiaddr) -> str:
    """Best-effort diagnosis for ListenError: try the bind ourselves and report the OS's answer."""
    protocols = {p.name for p in addr.protocols()}
    if "tcp" not in protocols or not ({"ip4", "ip6"} & protocols):
        return "unsupported address (petals listens on /ip4|ip6/.../tcp/PORT)"
    family = socket.AF_INET if "ip4" in protocols else socket.AF_INET6
    host = addr.value_for_protocol("ip4" if family == socket.AF_INET else "ip6")
    port = int(addr.value_for_protocol("tcp"))
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "address already in use"
        return exc.strerror or str(exc)
    return "libp2p refused the address"


def listen_multiaddrs(host: IHost) -> list[str]:
    """Full dialable addresses "/ip4/A/tcp/PORT/p2p/PEER_ID" with the ports actually bound.

    An unspecified listen address (0.0.0.0, ::) is reported as such: announce concrete
    addresses to others yourself.
    """
    return [str(addr) for addr in host.get_addrs()]


def parse_peer_multiaddr(addr: str) -> PeerInfo:
    """"/ip4/.../tcp/PORT/p2p/PEER_ID" -> PeerInfo; DialError if the address names no peer."""
    try:
        return info_from_p2p_addr(Multiaddr(addr))
    except Exception as exc:  # multiaddr/libp2p raise assorted types (ValueError, InvalidAddrError...)
        raise DialError(None, addr, f"not a valid peer multiaddr ({exc})") from exc


async def connect(host: IHost, addr: str, *, timeout: float = DEFAULT_DIAL_TIMEOUT) -> ID:
    """Connect to the peer at `addr` (a full multiaddr with /p2p/PEER_ID); return its peer id.

    Returns at once if a connection to that peer is already open. Raises DialError on a bad
    address, a refused connection, a failed handshake (wrong peer id, no common security or pnet
    key) or after `timeout` seconds. Cancellation by an enclosing scope propagates as usual.
    """
    info = parse_peer_multiaddr(addr)
    peer = str(info.peer_id)
    with trio.move_on_after(timeout) as scope:
        try:
            await host.connect(info)
        except Exception as exc:  # libp2p's dial raises a zoo of types (SwarmException, OSError...)
            raise DialError(peer, addr, _describe(exc)) from exc
    if scope.cancelled_caught:
        raise DialError(peer, addr, f"timed out after {timeout:g} s")
    return info.peer_id


def _describe(exc: BaseException) -> str:
    """libp2p wraps the cause several levels deep; show the chain so the reason is visible."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = str(current) or type(current).__name__
        if text not in parts:
            parts.append(text)
        current = current.__cause__ or current.__context__
    return ": ".join(parts)
