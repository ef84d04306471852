"""Circuit Relay v2 for petals peers: relayed dials, the hop service, and reservations kept alive.

py-libp2p ships the protocol (`libp2p.relay.circuit_v2`) but leaves three things to its user
(docs/py-libp2p.md):
- `host.connect` refuses `/p2p-circuit` addresses: `dial_circuit` dials through the relay with
  `CircuitV2Transport`, which leaves an ordinary (relayed) swarm connection behind, so
  `host.new_stream(peer)` works on it like on a direct one.
- `host.upgrade_outbound_connection` skips the private-network key (`--swarm-key`) that the
  answering side's `upgrade_inbound_connection` applies, so every connection we upgrade ourselves
  (relayed dials here, punched ones in punch.py) goes through `protect_outbound` first.
- A host only accepts relayed connections while a `CircuitV2Protocol` service runs on it (the
  STOP handler); a relay runs the same service with the HOP role. `run_relay_protocol` runs one.
  Its default per-circuit limits (docs/py-libp2p.md) would end a long session's activations
  mid-generation, so relays we run take `RelayLimitsConfig`.
- The hop service has no bytes-per-second cap: `RelayThrottle` wraps each inbound HOP stream so
  that its reads and writes take from token buckets (one per circuit, one for the whole relay).
  The service copies a circuit by reading the source's HOP stream and writing the destination's
  STOP stream, and the other way round, so throttling that one stream throttles both directions.
- A reservation is not announced anywhere and not renewed when the relay goes away:
  `Reservations` holds slots on several relays, notices a lost one within `check_period`,
  reserves elsewhere, and reports the `/p2p-circuit` addresses to announce.

Everything here is library glue: which relays to use and when to reserve is the daemon's call.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from .negotiate import new_stream

__all__ = [
    "CIRCUIT",
    "HOP_PROTOCOL",
    "STOP_PROTOCOL",
    "RelayLimitsConfig",
    "RelayThrottle",
    "Reservations",
    "TokenBucket",
    "circuit_addr",
    "dial_circuit",
    "is_circuit",
    "protect_outbound",
    "relay_connections",
    "relay_peer_of",
    "run_relay_protocol",
]

log = logging.getLogger("petals_protocol.p2p.relay")

CIRCUIT = "/p2p-circuit"


def is_circuit(addr: str) -> bool:
    """Whether `addr` goes through a relay ("/.../p2p/RELAY/p2p-circuit/p2p/PEER")."""
    return CIRCUIT + "/" in addr or addr.endswith(CIRCUIT)


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    """The address of `peer_id` through the relay at `relay_addr` (a full "/.../p2p/RELAY")."""
    return f"{relay_addr.rstrip('/')}{CIRCUIT}/p2p/{peer_id}"


def relay_peer_of(addr: str) -> str | None:
    """The relay's peer id in a circuit address; None for a direct address."""
    if not is_circuit(addr):
        return None
    before = addr.split(CIRCUIT, 1)[0]
    _, _, peer = before.rpartition("/p2p/")
    return peer or None


@dataclass(frozen=True)
class RelayLimitsConfig:
    """What a relay we run grants. A circuit carries every activation of the sessions between two
    peers, so its duration and byte limits must outlast long sessions; `max_reservations` (peers
    behind NAT one relay serves) and `max_circuits` (relayed connections per reserved peer at
    once) cap how much of the relay's bandwidth others can take."""

    max_reservations: int = 32
    max_circuits: int = 16
    circuit_duration: float = 24 * 3600.0
    circuit_data: int = 64 * 2**30
    #: Bytes per second all circuits together may carry (None: no cap).
    max_bandwidth: int | None = None
    #: Bytes per second one circuit may carry, both directions together (None: no cap).
    circuit_bandwidth: int | None = None

    def to_libp2p(self) -> RelayLimits:
        return RelayLimits(duration=int(self.circuit_duration), data=int(self.circuit_data),
                           max_circuit_conns=self.max_circuits, max_reservations=self.max_reservations)


#: A bucket holds this many seconds of its rate: short bursts pass at once, a long transfer
#: moves at the rate.
BURST_SECONDS = 0.1


@dataclass
class TokenBucket:
    """`rate` bytes per second with a burst of `BURST_SECONDS` of it. `take(n)` may overdraw:
    it waits until the debt is paid, so tasks sharing a bucket are served in turn, and moving N
    bytes through it takes at least (N - burst) / rate seconds."""

    rate: float
    _tokens: float = 0.0
    _last: float | None = None

    @property
    def burst(self) -> float:
        return self.rate * BURST_SECONDS

    async def take(self, n: int) -> None:
        now = trio.current_time()
        if self._last is None:
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


class _ThrottledStream:
    """An inbound HOP stream whose reads and writes first take their bytes from `buckets` (see
    the module docstring); everything else is the stream's own."""

    def __init__(self, stream: Any, buckets: list[TokenBucket], throttle: RelayThrottle) -> None:
        self._stream, self._buckets, self._throttle = stream, buckets, throttle

    async def _take(self, n: int) -> None:
        self._throttle.relayed_bytes += n
        for bucket in self._buckets:
            await bucket.take(n)

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        await self._take(len(data))
        return data

    async def write(self, data: bytes) -> None:
        await self._take(len(data))
        await self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@dataclass
class RelayThrottle:
    """The relayed-bandwidth caps of one relay: a bucket shared by every circuit and a fresh one
    per circuit. `wrap` turns the hop service's stream handler into one that throttles."""

    max_bandwidth: int | None = None
    circuit_bandwidth: int | None = None
    relayed_bytes: int = 0
    _shared: TokenBucket | None = None

    def __post_init__(self) -> None:
        if self.max_bandwidth is not None:
            self._shared = TokenBucket(float(self.max_bandwidth))

    @property
    def active(self) -> bool:
        return self.max_bandwidth is not None or self.circuit_bandwidth is not None

    def wrap(self, handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def throttled(stream: Any) -> None:
            buckets = [TokenBucket(float(self.circuit_bandwidth))] if self.circuit_bandwidth is not None else []
            if self._shared is not None:
                buckets.append(self._shared)
            await handler(_ThrottledStream(stream, buckets, self))

        return throttled

    def describe(self) -> dict[str, Any]:
        return {"max_bandwidth": self.max_bandwidth, "circuit_bandwidth": self.circuit_bandwidth,
                "relayed_bytes": self.relayed_bytes}


async def run_relay_protocol(host: IHost, *, hop: bool, limits: RelayLimitsConfig = RelayLimitsConfig(),
                             throttle: RelayThrottle | None = None,
                             task_status: trio.TaskStatus[CircuitV2Protocol] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve Circuit Relay v2 on `host` until cancelled: always STOP (accept relayed connections),
    HOP too when `hop` (relay for others, with `limits`; its circuits throttled by `throttle`,
    made from `limits` when not given). Start it with `nursery.start`."""
    protocol = CircuitV2Protocol(host, limits=limits.to_libp2p(), allow_hop=hop)
    if throttle is None:
        throttle = RelayThrottle(limits.max_bandwidth, limits.circuit_bandwidth)
    async with background_trio_service(protocol):
        await protocol.event_started.wait()
        if hop and throttle.active:
            # The service registered its handler through the host's public multiselect table;
            # ours replaces it, and the service's own shutdown removes it again.
            host.set_stream_handler(HOP_PROTOCOL, throttle.wrap(host.get_mux().handlers[HOP_PROTOCOL]))
        task_status.started(protocol)
        await trio.sleep_forever()


def _dialer(host: IHost) -> CircuitV2Transport:
    """A transport that only dials (no reservation on the way, unlike the CLIENT role)."""
    return CircuitV2Transport(host, CircuitV2Protocol(host), RelayConfig(roles=RelayRole.STOP))


def protect_outbound(host: IHost, raw_conn: Any) -> Any:
    """`raw_conn` wrapped in the host's private-network key, if it has one, before an outbound
    upgrade (py-libp2p 0.8.1 applies the key on inbound upgrades only: see the module docstring)."""
    psk = getattr(host.get_network(), "psk", None)
    return new_protected_conn(raw_conn, psk) if psk else raw_conn


async def dial_circuit(host: IHost, addr: str) -> ID:
    """Connect to the peer at a `/p2p-circuit` address through its relay; return the peer's id.

    What `CircuitV2Transport.dial` does, with the swarm key applied (`protect_outbound`).
    Raises whatever the relay dial raises (ConnectionError, SwarmException...); the caller
    (`petals_protocol.p2p.host.connect`) turns it into a DialError with a timeout.
    """
    relay_addr, _, peer = addr.partition(f"{CIRCUIT}/p2p/")
    relay = relay_peer_of(addr)
    if relay is None or not peer:
        raise ConnectionError(f"not a /p2p-circuit/p2p/PEER address: {addr}")
    peer_id = ID.from_base58(peer.strip("/"))
    raw = await _dialer(host).dial_peer_info(
        PeerInfo(peer_id, [Multiaddr(addr)]),
        relay_info=PeerInfo(ID.from_base58(relay), [Multiaddr(relay_addr.rstrip("/"))]))
    conn = await host.upgrade_outbound_connection(protect_outbound(host, raw), peer_id)
    return conn.muxed_conn.peer_id


def relay_connections(host: IHost, hop: CircuitV2Protocol | None = None) -> set[str]:
    """Peers whose connection carries a circuit (a relay stream) or, on a relay (`hop`), a
    reservation: idle-connection sweeping must leave those connections alone, or the relay could
    no longer reach the reserved peer."""
    peers = set()
    for peer_id, conns in host.get_network().get_connections_map().items():
        if hop is not None and hop.resource_manager.has_reservation(peer_id):
            peers.add(str(peer_id))
            continue
        for conn in conns:
            if any(str(s.get_protocol()) in (HOP_PROTOCOL, STOP_PROTOCOL) for s in conn.get_streams()):
                peers.add(str(peer_id))
    return peers


@dataclass
class _Held:
    addr: str  # the relay's full address "/ip4/.../tcp/N/p2p/RELAY"
    since: float


@dataclass
class Reservations:
    """Slots on `want` relays, kept: a relay whose connection dropped is reserved on again or
    replaced by the next candidate. `candidates()` gives relay addresses in preference order
    (operator-given first); `on_change()` is called whenever the set of relays changes (so the
    daemon re-announces its circuit addresses)."""

    host: IHost
    candidates: Callable[[], Awaitable[list[str]]]
    on_change: Callable[[], None]
    want: int = 2
    check_period: float = 2.0
    dial_timeout: float = 10.0
    held: dict[str, _Held] = field(default_factory=dict)  # relay peer id -> reservation
    _failed: dict[str, float] = field(default_factory=dict)  # relay addr -> when it last failed
    retry_after: float = 30.0

    def circuit_addrs(self) -> list[str]:
        me = self.host.get_id().to_base58()
        return [circuit_addr(h.addr, me) for h in self.held.values()]

    def relays(self) -> list[str]:
        return list(self.held)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the reservations until cancelled (reserves once before reporting started)."""
        async with trio.open_nursery() as nursery:
            transport = CircuitV2Transport(self.host, CircuitV2Protocol(self.host), RelayConfig(roles=RelayRole.STOP))
            await self._tend(transport, nursery)
            task_status.started()
            while True:
                await trio.sleep(self.check_period)
                await self._tend(transport, nursery)

    async def _tend(self, transport: CircuitV2Transport, nursery: trio.Nursery) -> None:
        changed = False
        connected = {str(p) for p in self.host.get_network().get_connections_map()}
        for relay, held in list(self.held.items()):
            if relay in connected:
                continue
            log.info("relay lost peer=%s addr=%s; reserving again", relay, held.addr)
            del self.held[relay]
            changed = True
            if not await self._reserve(transport, nursery, held.addr):
                self._failed[held.addr] = trio.current_time()
        if len(self.held) < self.want:
            now = trio.current_time()
            for addr in await self.candidates():
                if len(self.held) >= self.want:
                    break
                relay = addr.rpartition("/p2p/")[2]
                if relay in self.held or relay == self.host.get_id().to_base58():
                    continue
                if now - self._failed.get(addr, -self.retry_after) < self.retry_after:
                    continue
                if await self._reserve(transport, nursery, addr):
                    changed = True
                else:
                    self._failed[addr] = now
        if changed:
            self.on_change()

    async def _reserve(self, transport: CircuitV2Transport, nursery: trio.Nursery, addr: str) -> bool:
        from .host import connect  # host imports this module for relayed dials

        relay = addr.rpartition("/p2p/")[2]
        try:
            with trio.fail_after(self.dial_timeout):
                relay_id = await connect(self.host, addr, timeout=self.dial_timeout)
                stream = await new_stream(self.host, relay_id, HOP_PROTOCOL)
                try:
                    ok = await transport.reserve(stream, relay_id, nursery)
                finally:
                    await stream.close()
        except Exception as exc:  # noqa: BLE001 - DialError, timeouts, and libp2p's zoo of stream errors
            log.info("no reservation on relay %s: %s", addr, exc)
            return False
        if not ok:
            log.info("relay %s refused a reservation", addr)
            return False
        self.held[relay] = _Held(addr=addr, since=trio.current_time())
        log.info("reserved on relay peer=%s addr=%s", relay, addr)
        return True

    def describe(self) -> list[dict[str, Any]]:
        return [{"relay": relay, "addr": h.addr} for relay, h in self.held.items()]
