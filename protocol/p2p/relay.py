"""Circuit Relay v2 for petals peers: relayed dials, the hop service, and reservations kept alive.

py-libp2p ships the protocol (`libp2p.relay.circuit_v2`) but leaves three things to its user
(docs/py-libp2p.md):
- `host.connect` refuses `/p2p-circuit` addresses: `dial_circuit` dials through the relay with
  `CircuitV2Transport.dial`, which leaves an ordinary (relayed) swarm connection behind, so
  `host.new_stream(peer)` works on it like on a direct one.
- A host only accepts relayed connections while a `CircuitV2Protocol` service runs on it (the
  STOP handler); a relay runs the same service with the HOP role. `run_relay_protocol` runs one.
  Its default per-circuit limits (docs/py-libp2p.md) would end a long session's activations
  mid-generation, so relays we run take `RelayLimitsConfig`.
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
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

__all__ = [
    "CIRCUIT",
    "HOP_PROTOCOL",
    "STOP_PROTOCOL",
    "RelayLimitsConfig",
    "Reservations",
    "circuit_addr",
    "dial_circuit",
    "is_circuit",
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

    def to_libp2p(self) -> RelayLimits:
        return RelayLimits(duration=int(self.circuit_duration), data=int(self.circuit_data),
                           max_circuit_conns=self.max_circuits, max_reservations=self.max_reservations)


async def run_relay_protocol(host: IHost, *, hop: bool, limits: RelayLimitsConfig = RelayLimitsConfig(),
                             task_status: trio.TaskStatus[CircuitV2Protocol] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve Circuit Relay v2 on `host` until cancelled: always STOP (accept relayed connections),
    HOP too when `hop` (relay for others, with `limits`). Start it with `nursery.start`."""
    protocol = CircuitV2Protocol(host, limits=limits.to_libp2p(), allow_hop=hop)
    async with background_trio_service(protocol):
        await protocol.event_started.wait()
        task_status.started(protocol)
        await trio.sleep_forever()


def _dialer(host: IHost) -> CircuitV2Transport:
    """A transport that only dials (no reservation on the way, unlike the CLIENT role)."""
    return CircuitV2Transport(host, CircuitV2Protocol(host), RelayConfig(roles=RelayRole.STOP))


async def dial_circuit(host: IHost, addr: str) -> ID:
    """Connect to the peer at a `/p2p-circuit` address through its relay; return the peer's id.

    Raises whatever the relay dial raises (ConnectionError, SwarmException...); the caller
    (`petals_protocol.p2p.host.connect`) turns it into a DialError with a timeout.
    """
    conn = await _dialer(host).dial(Multiaddr(addr))
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
                stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL])
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
