"""A libp2p host configured the way every petals peer needs it, with the py-libp2p workarounds.

What `make_host` fixes compared with `libp2p.new_host()` defaults (docs/py-libp2p.md numbers the bugs):
- Security is Noise only. The default host also accepts plaintext and secio peers (bug 5).
- Stream muxer is yamux only (mplex moves bulk far slower; BENCHMARKS.md, "Connection set-up").
- `ConnectionConfig(max_connections_per_peer=1)`: with the default every dial waits for
  "happy eyeballs" (bug 1); with it a loopback connect takes milliseconds.
- The swarm's auto-connector is switched off (`min_connections=0` and a once-a-day interval). By
  default it dials up to ~150 peers from the peerstore every 30 s (every daemon a client ever
  looked up in the DHT, say); petals peers choose whom to connect to themselves (routing).
- Optional private network (pnet) key: peers without the same 32-byte key cannot even start the
  Noise handshake. py-libp2p's pnet uses Salsa20 with an 8-byte nonce, so it only interoperates
  with other py-libp2p peers, which is all a petals swarm contains.

`running_host` also fixes that `host.run()` silently ignores addresses it failed to listen on,
and that py-libp2p listens with SO_REUSEPORT, so that a port already in use by another daemon
"works" and the kernel splits connections between the two: it raises ListenError instead.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

from ..errors import PetalsError
from .admission import HELLO_PREFIX, AdmissionGate, AdmittingSecurity, MembershipRefused
from .compat import keep_alive
from .relay import dial_circuit, is_circuit

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
    "connect_any",
]

# A loopback connect takes milliseconds and a WAN one a few RTTs; 10 s leaves room for a slow
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
        super().__init__(f"cannot connect to {addr}: {reason}")  # the address names the peer
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


def make_host(key_pair: KeyPair, *, psk: bytes | None = None, admission: AdmissionGate | None = None) -> IHost:
    """A Noise-only, yamux-only host with one connection per peer and an optional pnet key.

    `admission`: a members-only swarm; every connection is checked right after its Noise
    handshake (petals_protocol.p2p.admission). The host does not listen until it runs: use
    `running_host(host, listen_addrs)`.
    """
    if psk is not None and len(psk) != _SWARM_KEY_SIZE:
        raise ValueError(f"psk must be {_SWARM_KEY_SIZE} bytes, got {len(psk)}")
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    security = noise if admission is None else AdmittingSecurity(noise, admission)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: security},
        muxer_opt=create_yamux_muxer_option(),
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=0,
            low_watermark=0,
            auto_connect_interval=_AUTO_CONNECT_OFF_INTERVAL,
        ),
        psk=psk.hex() if psk is not None else None,
    )
    host.get_network().register_notifee(_KeepAlive())
    return host


class NetworkEvents(INotifee):
    """A libp2p network notifee that ignores every event: subclasses override the ones they watch
    (INotifee declares all six abstract)."""

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class _KeepAlive(NetworkEvents):
    """Every connection's TCP socket gets keepalives and a user timeout as it is made, dialled or
    accepted (compat.keep_alive: a dead connection is given up in seconds, not minutes)."""

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        keep_alive(conn)


class _ForwardTruncated(logging.Handler):
    """Hand libp2p's records to the root logger's handlers, with hex-dump-sized messages cut.

    A handler (not a logger filter) because logger filters do not see records that propagate
    up from child loggers such as libp2p.kad_dht.kad_dht.
    """

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if len(message) > _MAX_LOG_MESSAGE:
            record.msg = f"{message[:_MAX_LOG_MESSAGE]}... [{len(message)} chars]"
            record.args = None
        logging.getLogger().handle(record)


def quiet_libp2p_logs(level: int = logging.WARNING, *, dht_level: int = logging.ERROR) -> None:
    """Route libp2p's logs through the application's handlers at a sane level.

    py-libp2p detaches its "libp2p" logger (propagate=False, no handler) unless LIBP2P_DEBUG is
    set, so its warnings reach stderr through logging's last-resort handler, unformatted. Kademlia
    logs a WARNING for routine events on every RPC (bug 6), hence its own, higher `dht_level`;
    and it logs rejected records as multi-megabyte hex dumps, hence the truncation.
    Idempotent: call it once at start-up, after configuring logging.
    """
    root = logging.getLogger("libp2p")
    root.setLevel(level)
    root.propagate = False  # records go to the root handlers through _ForwardTruncated instead
    if not any(isinstance(h, _ForwardTruncated) for h in root.handlers):
        root.addHandler(_ForwardTruncated())
    logging.getLogger("libp2p.kad_dht").setLevel(max(level, dht_level))
    # The auto-connector sets its own INFO level and reports its (disabled) dial plans every tick.
    logging.getLogger("libp2p.network.auto_connector").setLevel(max(level, logging.WARNING))
    # A failed dial (a peer that left; the DHT still knows its address) is logged as ERROR by the
    # TCP transport on every attempt; callers get a DialError with the reason, so this is noise.
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(max(level, logging.CRITICAL))
    # Dialing a members-only peer without its options: the peer's membership hello fails our muxer
    # negotiation, logged as ERROR on every attempt; the dial's error already names the swarm.
    logging.getLogger("libp2p.protocol_muxer.multiselect_client").setLevel(max(level, logging.CRITICAL))


@asynccontextmanager
async def running_host(host: IHost, listen_addrs: Sequence[str]) -> AsyncIterator[IHost]:
    """Run `host` listening on every address in `listen_addrs`; stop it when the block exits.

    Raises ListenError if any address could not be bound (libp2p itself only logs that at debug
    level and carries on). Listen on "/ip4/127.0.0.1/tcp/0" for a free port; `listen_multiaddrs`
    then reports the real one.
    """
    multiaddrs = [_parse_listen_addr(addr) for addr in listen_addrs]
    for addr in multiaddrs:
        # py-libp2p listens with SO_REUSEPORT (for hole punching), so a second daemon on a taken
        # port binds "successfully" and the kernel splits incoming connections between the two.
        # A bind without SO_REUSEPORT fails while the port has a listener: check first.
        problem = _probe_bind(addr)
        if problem is not None:
            raise ListenError(str(addr), problem)
    async with host.run(multiaddrs):
        listeners = host.get_network().listeners
        for addr in multiaddrs:
            if str(addr) not in listeners:
                raise ListenError(str(addr), _probe_bind(addr) or "libp2p could not listen there")
        yield host


def _parse_listen_addr(addr: str) -> Multiaddr:
    try:
        return Multiaddr(addr)
    except Exception as exc:  # multiaddr raises several unrelated types for bad input
        raise ListenError(addr, f"not a valid multiaddr ({exc})") from exc


def _probe_bind(addr: Multiaddr) -> str | None:
    """Why we cannot listen on `addr` (the OS's answer to a plain bind), or None if we can.

    SO_REUSEADDR keeps a restart from failing on the previous run's TIME_WAIT connections; on
    Linux it still refuses a port that has a listening socket.
    """
    protocols = {p.name for p in addr.protocols()}
    if "tcp" not in protocols or not ({"ip4", "ip6"} & protocols):
        return "unsupported address (petals listens on /ip4|ip6/.../tcp/PORT)"
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return None  # the OS picks a free port
    family = socket.AF_INET if "ip4" in protocols else socket.AF_INET6
    host = addr.value_for_protocol("ip4" if family == socket.AF_INET else "ip6")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "address already in use"
        return exc.strerror or str(exc)
    return None


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
    relayed = is_circuit(addr)
    if relayed and await _reuse_connection(host, info.peer_id):
        return info.peer_id  # host.connect's shortcut, which a relayed dial does not take
    with trio.move_on_after(timeout) as scope:
        try:
            if relayed:  # host.connect refuses relay-only addresses (py-libp2p bug 8)
                await dial_circuit(host, addr)
            else:
                await host.connect(info)
        except Exception as exc:  # libp2p's dial raises a zoo of types (SwarmException, OSError...)
            raise DialError(peer, addr, _describe(exc)) from exc
    if scope.cancelled_caught:
        raise DialError(peer, addr, f"timed out after {timeout:g} s")
    return info.peer_id


async def _reuse_connection(host: IHost, peer: ID) -> bool:
    """Whether a live connection to `peer` is open. Dead ones are closed first: a relayed
    connection outlives its relay for a while, and new streams would be refused on it."""
    live = False
    for conn in list(host.get_network().get_connections(peer)):
        if conn.is_closed or getattr(conn.muxed_conn, "is_closed", False):
            with trio.move_on_after(1.0):
                await conn.close()
        else:
            live = True
    return live


async def connect_any(host: IHost, addrs: Sequence[str], *, timeout: float = DEFAULT_DIAL_TIMEOUT) -> ID:
    """Connect to one peer known by several addresses: direct ones first (routing prefers direct
    paths), then relayed ones in the given order. Raises the last DialError if none works."""
    if not addrs:
        raise DialError(None, "", "no address to dial")
    ordered = sorted(addrs, key=is_circuit)  # stable: keeps the announced order within each kind
    last: DialError | None = None
    for addr in ordered:
        try:
            return await connect(host, addr, timeout=timeout)
        except DialError as exc:
            last = exc
    assert last is not None
    raise last


def _describe(exc: BaseException) -> str:
    """The reason a dial failed, in words a user can act on ("connection refused", "timed out").

    libp2p wraps the cause several levels deep (SwarmDialAllFailedError -> MultiError ->
    SwarmException -> OpenConnectionError -> trio's OSError -> ConnectionRefusedError), each
    level repeating the peer id; the innermost OS error is what the user needs. Without one, the
    chain's distinct messages are shown instead. A members-only refusal says why, whatever else
    the chain holds.
    """
    refusal = _find_in_chain(exc, MembershipRefused, set())
    if refusal is not None:
        return str(refusal)
    hello = _find_in_chain(exc, BaseException, set(), text=HELLO_PREFIX)
    if hello is not None:  # we are not in members-only mode; the peer is, and its hello names the owner
        words = str(hello).split(HELLO_PREFIX, 1)[1].split()
        owner = words[0] if words else "?"
        return (f"the peer is in a members-only swarm (owner {owner}): join with --swarm-owner {owner} and a "
                "membership certificate from its owner")
    os_error = _innermost_os_error(exc, set())
    if os_error is not None and os_error.errno is not None:
        return os.strerror(os_error.errno).lower()
    if os_error is not None:
        return str(os_error)
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = (str(current) or type(current).__name__).splitlines()[0]
        if text not in parts:
            parts.append(text)
        current = current.__cause__ or current.__context__
    return ": ".join(parts)


def _nested(exc: BaseException) -> list[BaseException]:
    """Causes, contexts, exception groups and libp2p's MultiError (`.errors`) of `exc`."""
    inner: list[BaseException] = []
    for nested in (getattr(exc, "errors", None), getattr(exc, "exceptions", None)):
        if isinstance(nested, (list, tuple)):
            inner.extend(e for e in nested if isinstance(e, BaseException))
    inner.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return inner


def _find_in_chain(exc: BaseException, kind: type[BaseException], seen: set[int], *,
                   text: str = "") -> BaseException | None:
    """The first error of type `kind` (whose message holds `text`) in `exc`'s chain."""
    if id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, kind) and text in str(exc):
        return exc
    for e in _nested(exc):
        if (found := _find_in_chain(e, kind, seen, text=text)) is not None:
            return found
    return None


def _innermost_os_error(exc: BaseException, seen: set[int]) -> OSError | None:
    """Depth-first through causes, contexts, exception groups and libp2p's MultiError (`.errors`):
    the deepest OSError, preferring one that carries an errno."""
    if id(exc) in seen:
        return None
    seen.add(id(exc))
    found = None
    for e in _nested(exc):
        deeper = _innermost_os_error(e, seen)
        if deeper is not None and (found is None or (found.errno is None and deeper.errno is not None)):
            found = deeper
    if found is None and isinstance(exc, OSError):
        return exc
    return found
