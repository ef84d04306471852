"""Round trips to the daemons serving the block right after our span, for our record.

With push forwarding a step's output goes from this daemon straight to the next one: the leg the
client cannot measure, and on a WAN the one that decides which chain is fastest. So a daemon
measures it, the way a client measures its own round trips (an info request on an open stream:
protocol/p2p/info.py), and publishes the results in its signed record (`ServerRecord.next_rtts`), where
client routing reads them (client/routing.py).

Cheap and bounded: at most MAX_NEXT_RTTS daemons, one info request each per period, one at a time.
A request shares the connection (one TCP stream) with the pushes to that daemon, so a sample taken
while a prefill's activations are in flight waits behind them, and one taken while either daemon's
loop is busy waits for it: the published round trip is the smallest of the last few samples (as
TCP and BBR estimate a path's delay), the link's own latency rather than the load of the moment
(the WAN lab's medians were several times the configured round trip on a slow link; figures in
BENCHMARKS.md). Daemons that stop serving the next block are forgotten at the next `learn`.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost

from petals_protocol.messages import InfoResponse
from petals_protocol.p2p.info import timed_info
from petals_protocol.p2p.streams import NETWORK_ERRORS
from petals_protocol.records import MAX_NEXT_RTTS, MAX_RTT, ServerRecord

__all__ = ["NextDaemons", "SAMPLES"]

log = logging.getLogger("petalsd.neighbours")

#: Round-trip samples kept per daemon (their minimum is published).
SAMPLES = 5


@dataclass
class NextDaemons:
    """The daemons after our span and our round trips to them. `learn` the swarm's records,
    `run` the measuring loop, and put `measured()` in each record."""

    host: IHost
    peer_id: bytes  # ours: never measured
    period: float
    on_first: Callable[[], None] = lambda: None  # a daemon got its first sample (announce it soon)
    timeout: float = 5.0
    _targets: dict[bytes, tuple[str, ...]] = field(default_factory=dict)  # peer id -> its addresses
    _samples: dict[bytes, deque[float]] = field(default_factory=dict)
    _new_targets: trio.Event = field(default_factory=trio.Event)

    def learn(self, records: list[ServerRecord], span_end: int) -> None:
        """Measure the online daemons serving block `span_end` (none when our span ends the model),
        the fastest announced first when there are more than we measure."""
        now = time.time()
        nexts = [r for r in records if r.peer_id != self.peer_id and r.state == "online" and r.expires_at > now
                 and r.start_block <= span_end < r.end_block]
        nexts.sort(key=lambda r: -r.throughput)
        self._targets = {r.peer_id: tuple(a if "/p2p/" in a else f"{a}/p2p/{r.peer_id_text}" for a in r.addrs)
                         for r in nexts[:MAX_NEXT_RTTS]}
        for gone in set(self._samples) - set(self._targets):
            del self._samples[gone]
        if set(self._targets) - set(self._samples):
            self._new_targets.set()  # measure them now, not a period later

    def measured(self) -> tuple[tuple[bytes, float], ...] | None:
        """(peer id, smallest recent round trip in seconds) of the daemons measured so far; None if none."""
        pairs = tuple((peer, min(*s, MAX_RTT)) for peer, s in self._samples.items() if s)
        return pairs or None

    async def run(self) -> None:
        """Measure every target once per period, forever."""
        async with trio.open_nursery() as nursery:  # where the info streams' pumps run
            while True:
                await self._measure_all(nursery)
                with trio.move_on_after(self.period):
                    await self._new_targets.wait()

    async def _measure_all(self, nursery: trio.Nursery) -> None:
        self._new_targets = trio.Event()
        first = False
        for peer, addrs in list(self._targets.items()):
            rtt = await self.measure(addrs, nursery)
            if rtt is not None and peer in self._targets:
                first |= peer not in self._samples
                self._samples.setdefault(peer, deque(maxlen=SAMPLES)).append(max(rtt, 1e-6))
        if first:
            self.on_first()

    async def measure(self, addrs: tuple[str, ...], nursery: trio.Nursery) -> float | None:
        """One info request's round trip (the daemon dialled first if need be), as a client
        measures it; None (logged) if the daemon does not answer in time. Never raises for the
        peer's sake: a dead, hung or misbehaving next daemon must not take this one down. The
        stream's pump runs in `nursery` (the caller's, long-lived): inside a nursery of its own, a
        failure would come out wrapped in an exception group, past the handlers below."""
        where = addrs[0] if addrs else "?"
        try:
            with trio.fail_after(self.timeout):
                _, reply, rtt = await timed_info(self.host, addrs, nursery=nursery)
        except NETWORK_ERRORS as exc:
            log.info("round trip to %s not measured: %s: %s", where, type(exc).__name__, exc)
            return None
        except Exception as exc:  # libp2p raises more than its documented types; log and go on
            log.warning("round trip to %s not measured: %s: %s", where, type(exc).__name__, exc)
            return None
        return rtt if isinstance(reply, InfoResponse) else None
