"""Can others dial us? A dial-back probe (`/petals/dialback/1`) and what the daemon does with the answer.

py-libp2p's AutoNAT is a server only and not wired into the host, so daemons ask each other: the
asker sends the direct addresses it announces; the helper dials each one back from a throwaway
host (a fresh key and a fresh connection, so the connection the request came on proves nothing)
and says which ones answered with the asker's peer id. A helper only ever dials the asker: every
address must name the asking peer and carry the IP the request came from, so nobody can make
a daemon dial a third party; requests are rate-limited per peer and bounded overall.

The asker's verdict (`judge`): *public* when a helper reached it on a globally routable address
(two helpers when two answered); *private* when helpers answered and none reached any address
(behind NAT the helper sees the router's IP, refuses the private addresses, and the router drops
the dial to a forwarded-nowhere port); *unknown* otherwise. Loopback and private addresses are
never proof of public reachability: a swarm on 127.0.0.1 (not even probed) or a LAN stays
*unknown* and keeps announcing its direct addresses, no relays involved. `--reachability public|private` skips the
probe.

`NatTraversal` applies the verdict, and applies it again whenever a later probe changes it:
public daemons serve Circuit Relay v2 hop (if `relay_service`), throttled to the relayed-bandwidth
caps; private ones stop serving hop (the peers reserved on them are disconnected, so they reserve
elsewhere, and the record, saying private, no longer offers them as a relay), hold reservations
on relays (`--relay` ones first, then daemons whose records say public) and announce their
`/p2p-circuit` addresses. A later *unknown* verdict (an inconclusive probe) keeps the last
conclusive one.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from multiaddr import Multiaddr

from petals_protocol.errors import PetalsError
from petals_protocol.framing import FrameDecoder, encode_frame
from petals_protocol.p2p.host import DialError, connect, make_host, running_host
from petals_protocol.p2p.punch import PUNCH_PROTOCOL, PunchError, PunchService
from petals_protocol.p2p.relay import (
    RelayLimitsConfig,
    RelayThrottle,
    Reservations,
    is_circuit,
    relay_connections,
    run_relay_protocol,
)

from .forwarding import LinkActivity

__all__ = ["DIALBACK_PROTOCOL", "DialbackServer", "NatTraversal", "ask_dialback", "judge", "is_public_addr"]

log = logging.getLogger("petalsd.reachability")

DIALBACK_PROTOCOL = "/petals/dialback/1"
REACHABILITY = ("auto", "public", "private")
MAX_ADDRS = 8
MAX_MESSAGE = 8 * 1024
#: A request from the same peer within this many seconds is refused.
MIN_INTERVAL_PER_PEER = 10.0
#: Dial-backs running at once (each holds a throwaway host); more are refused as busy.
MAX_CONCURRENT = 2
DIAL_TIMEOUT = 5.0
ASK_TIMEOUT = 20.0
#: Helpers asked per probe.
HELPERS = 3


class DialbackError(PetalsError):
    """A dial-back exchange that went wrong (refused, malformed, timed out)."""


def is_public_addr(addr: str) -> bool:
    """Whether a direct address carries a globally routable IP (never loopback, private, TEST-NET)."""
    try:
        ma = Multiaddr(addr)
        names = {p.name for p in ma.protocols()}
        ip = ma.value_for_protocol("ip4" if "ip4" in names else "ip6")
        return ipaddress.ip_address(ip).is_global
    except Exception:  # noqa: BLE001 - dns names, garbage: not proof of anything
        return False


def _is_loopback(addr: str) -> bool:
    ip = _ip_of(addr)
    return ip is not None and ipaddress.ip_address(ip).is_loopback


def _ip_of(addr: str) -> str | None:
    try:
        ma = Multiaddr(addr)
        names = {p.name for p in ma.protocols()}
        if "tcp" not in names or not ({"ip4", "ip6"} & names):
            return None
        return str(ipaddress.ip_address(ma.value_for_protocol("ip4" if "ip4" in names else "ip6")))
    except Exception:  # noqa: BLE001
        return None


async def _read_message(stream: Any) -> Any:
    decoder = FrameDecoder(MAX_MESSAGE)
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return msgpack.unpackb(frame, raw=False)
        data = await stream.read(MAX_MESSAGE)
        if not data:
            raise DialbackError("stream closed before a whole message")
        decoder.feed(data)


async def _write_message(stream: Any, obj: Any) -> None:
    await stream.write(encode_frame(msgpack.packb(obj, use_bin_type=True), MAX_MESSAGE))


# --------------------------------------------------------------------------- helper side


@dataclass
class DialbackServer:
    """Answers dial-back requests (the stream handler for DIALBACK_PROTOCOL). `psk`: the swarm's
    private network key, which the throwaway dialling host needs too (without it nothing in a
    `--swarm-key` swarm would ever be found reachable)."""

    psk: bytes | None = None
    clock: Callable[[], float] = time.monotonic
    _last: dict[str, float] = field(default_factory=dict)
    _running: int = 0

    def check_addr(self, addr: object, asker: str, observed_ip: str | None) -> str | None:
        """Why we will not dial `addr` for `asker` (None: we will)."""
        if not isinstance(addr, str) or len(addr) > 256:
            return "not a multiaddr string"
        if is_circuit(addr):
            return "relayed address"
        if not addr.rstrip("/").endswith(f"/p2p/{asker}"):
            return "address does not name the asking peer"
        ip = _ip_of(addr)
        if ip is None:
            return "not an /ip4|ip6/.../tcp/ address"
        if observed_ip is None or ip != observed_ip:
            return f"IP {ip} is not the IP the request came from ({observed_ip})"
        return None

    async def handle(self, stream: Any) -> None:
        asker = str(stream.muxed_conn.peer_id)
        remote = stream.get_remote_address()
        observed_ip = str(ipaddress.ip_address(remote[0])) if remote else None
        try:
            with trio.fail_after(ASK_TIMEOUT):
                request = await _read_message(stream)
                reply = await self._answer(request, asker, observed_ip)
                await _write_message(stream, reply)
        except Exception as exc:  # noqa: BLE001 - a handler must not take the host down
            log.info("dialback request peer=%s failed: %s", asker, exc)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def _answer(self, request: Any, asker: str, observed_ip: str | None) -> dict[str, Any]:
        now = self.clock()
        addrs = request.get("addrs") if isinstance(request, dict) else None
        if not isinstance(addrs, list) or not addrs or len(addrs) > MAX_ADDRS:
            return {"error": f"expected 'addrs': a list of 1 to {MAX_ADDRS} multiaddrs"}
        if now - self._last.get(asker, -MIN_INTERVAL_PER_PEER) < MIN_INTERVAL_PER_PEER:
            return {"error": "rate limited: ask again later"}
        if self._running >= MAX_CONCURRENT:
            return {"error": "busy: ask again later"}
        self._last[asker] = now
        if len(self._last) > 4096:  # forget the oldest askers
            for peer in sorted(self._last, key=self._last.__getitem__)[:2048]:
                del self._last[peer]
        self._running += 1
        try:
            results = []
            for addr in addrs:
                problem = self.check_addr(addr, asker, observed_ip)
                if problem is None:
                    problem = await _dial_fresh(addr, self.psk)
                results.append({"addr": str(addr)[:256], "ok": problem is None, "detail": problem or ""})
        finally:
            self._running -= 1
        log.info("dialback peer=%s observed=%s: %s", asker, observed_ip,
                 ", ".join(f"{r['addr']} {'ok' if r['ok'] else r['detail']}" for r in results))
        return {"observed_ip": observed_ip or "", "results": results}


async def _dial_fresh(addr: str, psk: bytes | None = None) -> str | None:
    """Dial `addr` from a throwaway host; None if the peer it names answered, else why not."""
    host = make_host(create_new_key_pair(), psk=psk)
    try:
        async with running_host(host, []):
            await connect(host, addr, timeout=DIAL_TIMEOUT)
    except DialError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - host shutdown noise
        return f"dial failed: {exc}"
    return None


# --------------------------------------------------------------------------- asker side


async def ask_dialback(host: Any, helper_addr: str, addrs: Sequence[str]) -> dict[str, Any]:
    """Ask the daemon at `helper_addr` to dial us back on `addrs`; its reply (DialbackError if none)."""
    try:
        with trio.fail_after(ASK_TIMEOUT):
            peer = await connect(host, helper_addr)
            stream = await host.new_stream(peer, [DIALBACK_PROTOCOL])
            try:
                await _write_message(stream, {"addrs": list(addrs)[:MAX_ADDRS]})
                reply = await _read_message(stream)
            finally:
                with trio.move_on_after(1):
                    await stream.close()
    except DialbackError:
        raise
    except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - dial errors, resets, timeouts
        raise DialbackError(f"dialback via {helper_addr}: {exc}") from exc
    if not isinstance(reply, dict) or "error" in reply:
        raise DialbackError(f"dialback via {helper_addr} refused: {reply.get('error') if isinstance(reply, dict) else reply}")
    return reply


def judge(replies: Sequence[dict[str, Any]]) -> str:
    """public / private / unknown from the helpers' replies (see the module docstring)."""
    if not replies:
        return "unknown"
    public = sum(1 for r in replies if any(x.get("ok") and is_public_addr(x.get("addr", "")) for x in r["results"]))
    reached = sum(1 for r in replies if any(x.get("ok") for x in r["results"]))
    if public >= min(2, len(replies)):
        return "public"
    if reached == 0:
        return "private"
    return "unknown"


@dataclass
class NatTraversal:
    """The daemon's reachability and what follows from it: hop service or relay reservations.

    `direct_addrs()` are the addresses to test; `helpers()` the daemons to ask (full multiaddrs);
    `relay_candidates()` relays found in the swarm; `on_change()` asks for a new announcement.
    """

    host: Any
    mode: str  # auto | public | private
    direct_addrs: Callable[[], list[str]]
    helpers: Callable[[], Awaitable[list[str]]]
    relay_candidates: Callable[[], Awaitable[list[str]]]
    on_change: Callable[[], None]
    relays: Sequence[str] = ()  # operator-given relays (--relay), tried first
    relay_service: bool = True
    hole_punching: bool = True
    limits: RelayLimitsConfig = RelayLimitsConfig()
    min_relays: int = 2
    probe_period: float = 600.0
    reachability: str = "unknown"
    hop: bool = False
    reservations: Reservations | None = None
    _nursery: trio.Nursery | None = None
    _ticks: int = 0
    _hop_protocol: Any = None  # the hop service while it runs (its reservations keep connections open)
    _relay_service: tuple[trio.CancelScope, trio.Event] | None = None  # the running relay protocol task
    throttle: RelayThrottle | None = None  # relayed-bandwidth caps, kept across hop restarts
    observed_ip: str | None = None  # our IP as helpers saw it (behind NAT: the router's)
    punch_budget: float = 5.0
    punch: PunchService | None = None

    def _punch_ip(self) -> str | None:
        """Take part in hole punching only behind NAT, with the IP helpers saw us at."""
        return self.observed_ip if self.reachability == "private" and self.hole_punching else None

    async def direct_path(self, peer: Any) -> None:
        """After a relayed dial to `peer`: punch a direct connection if we are behind NAT too, and
        drop the relayed one. Bounded by `punch_budget`; on failure the relay stays in use."""
        if self.punch is None or self._punch_ip() is None:
            return
        with trio.move_on_after(self.punch_budget) as scope:
            try:
                direct = await self.punch.punch(peer)
            except PunchError as exc:
                log.info("no direct path to peer=%s, staying relayed: %s", peer, exc)
                return
            for conn in list(self.host.get_network().get_connections(peer)):
                if conn is not direct:
                    await conn.close()
        if scope.cancelled_caught:
            log.info("no direct path to peer=%s within %.0f s, staying relayed", peer, self.punch_budget)

    def keepalive(self) -> list[LinkActivity]:
        """Connections the idle sweeper must leave open: those to our relays and those carrying
        circuits or reservations (a relayed stream shows no stream opens while it carries steps).
        Fresh step counts on every call read as activity."""
        self._ticks += 1
        peers = relay_connections(self.host, self._hop_protocol)
        if self.reservations is not None:
            peers.update(self.reservations.relays())
        return [LinkActivity(peer=p, steps=self._ticks) for p in peers]

    def announce_addrs(self, direct: list[str]) -> list[str]:
        """What to put in the record: relayed addresses instead of undialable direct ones."""
        circuits = self.reservations.circuit_addrs() if self.reservations else []
        if self.reachability == "private" and circuits:
            return circuits
        return direct

    @property
    def using_relay(self) -> bool:
        return self.reachability == "private" and bool(self.reservations and self.reservations.held)

    def describe(self) -> dict[str, Any]:
        return {"reachability": self.reachability, "mode": self.mode, "relay_service": self.hop,
                "relay_bandwidth": self.throttle.describe() if self.throttle else None,
                "observed_ip": self.observed_ip, "punched": self.punch.punched if self.punch else 0,
                "relays": self.reservations.describe() if self.reservations else []}

    async def probe(self) -> str:
        addrs = [a for a in self.direct_addrs() if not is_circuit(a)]
        if all(_is_loopback(a) for a in addrs):
            return "unknown"  # a swarm on one machine: nothing to learn, nobody to bother
        helpers = [h for h in await self.helpers() if not is_circuit(h)][:HELPERS]
        replies: list[dict[str, Any]] = []

        async def ask(helper: str) -> None:
            try:
                replies.append(await ask_dialback(self.host, helper, addrs))
            except DialbackError as exc:
                log.info("%s", exc)

        if addrs:
            async with trio.open_nursery() as nursery:
                for helper in helpers:
                    nursery.start_soon(ask, helper)
        seen = [r.get("observed_ip") for r in replies if r.get("observed_ip")]
        if seen:
            self.observed_ip = max(set(seen), key=seen.count)
        verdict = judge(replies)
        log.info("reachability peer=%s: %s (%d of %d helpers answered)", self.host.get_id(), verdict,
                 len(replies), len(helpers))
        return verdict

    async def _serve_relay(self, hop: bool) -> None:
        """(Re)start the relay protocol: STOP only, or STOP and HOP. Stopping HOP drops the
        reservations it granted: their peers are disconnected so that they notice and reserve
        elsewhere (a reservation on a relay that no longer relays would be announced for nothing)."""
        assert self._nursery is not None
        reserved: list[Any] = []
        if self._relay_service is not None:
            if self._hop_protocol is not None:
                manager = self._hop_protocol.resource_manager
                reserved = [p for p in self.host.get_network().get_connections_map() if manager.has_reservation(p)]
            scope, done = self._relay_service
            scope.cancel()
            await done.wait()
        self._hop_protocol = None
        self._relay_service, protocol = await self._nursery.start(self._run_relay, hop)
        self.hop = hop
        if hop:
            self._hop_protocol = protocol
            log.info("relay service on peer=%s (max %d reservations, %d circuits each, bandwidth cap %s B/s, "
                     "%s B/s per circuit)", self.host.get_id(), self.limits.max_reservations,
                     self.limits.max_circuits, self.limits.max_bandwidth or "none",
                     self.limits.circuit_bandwidth or "none")
        for peer in reserved:
            log.info("relay service off: disconnecting reserved peer=%s", peer)
            for conn in list(self.host.get_network().get_connections(peer)):
                with trio.move_on_after(5):
                    await conn.close()

    async def _run_relay(self, hop: bool, *, task_status: trio.TaskStatus[Any]) -> None:
        scope, done = trio.CancelScope(), trio.Event()
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    protocol = await nursery.start(lambda task_status: run_relay_protocol(
                        self.host, hop=hop, limits=self.limits, throttle=self.throttle, task_status=task_status))
                    task_status.started(((scope, done), protocol))
        finally:
            done.set()

    async def _apply(self, verdict: str) -> None:
        assert self._nursery is not None
        if verdict == "unknown" and self.reachability != "unknown":
            log.info("reachability peer=%s: probe inconclusive, staying %s", self.host.get_id(), self.reachability)
            return
        changed = verdict != self.reachability
        self.reachability = verdict
        hop = verdict == "public" and self.relay_service
        if hop != self.hop:
            await self._serve_relay(hop)
        if verdict == "private" and self.reservations is None:
            self.reservations = Reservations(self.host, self._candidates, self.on_change, want=self.min_relays)
            await self._nursery.start(self.reservations.run)
        if changed:
            self.on_change()

    async def _candidates(self) -> list[str]:
        found = [a for a in await self.relay_candidates() if a not in self.relays]
        return [*self.relays, *found]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Decide (probe unless overridden), start hop or reservations, then re-probe every
        `probe_period` in auto mode. Reports started once the first decision is applied."""
        self.punch = PunchService(self.host, self._punch_ip)
        self.host.set_stream_handler(PUNCH_PROTOCOL, self.punch.handle)
        self.throttle = RelayThrottle(self.limits.max_bandwidth, self.limits.circuit_bandwidth)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._serve_relay(False)  # every daemon accepts relayed connections (the STOP role)
            await self._apply(self.mode if self.mode != "auto" else await self.probe())
            task_status.started()
            while self.mode == "auto":
                await trio.sleep(self.probe_period)
                await self._apply(await self.probe())
            await trio.sleep_forever()
