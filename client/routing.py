"""Choosing a chain of daemons that covers a range of blocks at the lowest expected step time.

The cost of using daemon `s` for blocks [a, s.end) is the latency of reaching it plus its compute
time, (s.end - a) / s.throughput, where throughput is what the daemon announced (block-steps per
second for one decode step). The first hop is reached from the client: its latency is the round
trip the client measured. With push forwarding a later hop is reached from the previous daemon,
a leg the client cannot measure: when the previous daemon's record gives a round trip it
measured to `s` (`next_rtts`, petalsd/neighbours.py), that is the latency, else the client's own
round trip to `s` stands in for it. With that linear cost, riding a daemon to the end of its span
is never worse than leaving it early, so the graph only needs (block boundary, daemon that got
there) as nodes and one edge per daemon covering the boundary: Dijkstra over it is exact and
cheap (O(E log V) with E <= servers^2 x boundaries). Daemons without room for the session's cache
get a large penalty rather than being excluded, so a full swarm still yields a (slow) route.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from petals_protocol.errors import ErrorCode, PetalsError

#: Seconds assumed for a daemon whose latency was not measured yet (loopback is ~3 ms).
DEFAULT_RTT = 0.05
#: Added to a hop whose daemon announced too little free cache (Petals uses the same idea).
NO_CACHE_PENALTY = 10.0
#: Added to a hop reached through a relay: its traffic crosses a third party (whose circuit
#: limits and load we do not see), and a direct daemon should win unless the relayed one is
#: clearly faster, not just luckier in one noisy round-trip measurement.
RELAYED_PENALTY = 0.02


@dataclass(frozen=True)
class ServerInfo:
    """What the client knows about one daemon, from its info reply or its DHT record."""

    peer_id: str
    addrs: tuple[str, ...]
    start: int
    end: int
    throughput: float = 1.0
    cache_tokens_free: int = 0
    state: str = "online"
    public_name: str = ""
    using_relay: bool = False
    dtype: str = "float32"
    rtt: float | None = None
    version: str = ""
    max_length: int = 0  # most tokens one session may hold on this daemon (0: not known)
    max_batch_size: int = 0  # most sequences per request (0: not known)
    adapters: tuple[str, ...] = ()  # LoRA adapters a client may select on this daemon
    # (peer id, seconds): round trips this daemon measured to daemons serving the block after its
    # span, from its record (ServerRecord.next_rtts)
    next_rtts: tuple[tuple[str, float], ...] = ()

    @property
    def name(self) -> str:
        return self.public_name or self.peer_id[-8:]

    def next_rtt(self, peer_id: str) -> float | None:
        """The round trip this daemon measured to `peer_id`, if it did."""
        return next((rtt for peer, rtt in self.next_rtts if peer == peer_id), None)


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on `server`."""

    server: ServerInfo
    start: int
    end: int


class NoRoute(PetalsError):
    """No chain of usable daemons covers the requested blocks."""

    code = ErrorCode.UNSUPPORTED

    def __init__(self, uncovered: list[tuple[int, int]], detail: str = "") -> None:
        self.uncovered = uncovered
        ranges = ", ".join(f"{a}:{b}" for a, b in uncovered)
        hint = f" Start a daemon for them, e.g. `petalsd --model MODEL --blocks {uncovered[0][0]}:{uncovered[0][1]}`." if uncovered else ""
        super().__init__(f"no daemon serves blocks {ranges}{detail}.{hint}")


@dataclass(order=True)
class _Entry:
    cost: float
    block: int
    last: str  # peer id of the daemon that reached `block` ("" at the start: the client)
    path: list[Hop] = field(compare=False)


def uncovered_blocks(servers: Iterable[ServerInfo], start: int, end: int) -> list[tuple[int, int]]:
    """Maximal ranges inside [start, end) that no given daemon serves."""
    covered = [False] * (end - start)
    for s in servers:
        for b in range(max(s.start, start), min(s.end, end)):
            covered[b - start] = True
    gaps: list[tuple[int, int]] = []
    b = start
    while b < end:
        if covered[b - start]:
            b += 1
            continue
        gap_start = b
        while b < end and not covered[b - start]:
            b += 1
        gaps.append((gap_start, b))
    return gaps


def hop_cost(server: ServerInfo, start: int, end: int, cache_tokens_needed: int,
             previous: ServerInfo | None = None) -> float:
    """Expected seconds of blocks [start, end) on `server`, reached from `previous` (None: from
    the client, or with push off, where the client drives every hop)."""
    rtt = previous.next_rtt(server.peer_id) if previous is not None else None
    if rtt is None:
        rtt = server.rtt if server.rtt is not None else DEFAULT_RTT
    compute = (end - start) / max(server.throughput, 1e-6)
    penalty = NO_CACHE_PENALTY if server.cache_tokens_free < cache_tokens_needed else 0.0
    if server.using_relay:
        penalty += RELAYED_PENALTY
    return rtt + compute + penalty


def choose_route(
    servers: Iterable[ServerInfo],
    start: int,
    end: int,
    *,
    banned: frozenset[str] | set[str] = frozenset(),
    cache_tokens_needed: int = 0,
    push: bool = True,
) -> list[Hop]:
    """The cheapest chain of hops covering [start, end), or NoRoute naming the gaps. `push`:
    daemons forward to each other, so the legs they measured between them count."""
    usable = [
        s for s in servers
        if s.peer_id not in banned and s.state == "online" and s.start < end and s.end > start
    ]
    if start >= end:
        return []
    best: dict[tuple[int, str], float] = {(start, ""): 0.0}
    queue = [_Entry(0.0, start, "", [])]
    while queue:
        entry = heapq.heappop(queue)
        if entry.block == end:
            return entry.path
        if entry.cost > best.get((entry.block, entry.last), float("inf")):
            continue
        previous = entry.path[-1].server if push and entry.path else None
        for s in usable:
            if not (s.start <= entry.block < s.end):
                continue
            stop = min(s.end, end)
            cost = entry.cost + hop_cost(s, entry.block, stop, cache_tokens_needed, previous)
            if cost < best.get((stop, s.peer_id), float("inf")):
                best[(stop, s.peer_id)] = cost
                heapq.heappush(queue, _Entry(cost, stop, s.peer_id, [*entry.path, Hop(s, entry.block, stop)]))
    gaps = uncovered_blocks(usable, start, end)
    all_gaps = uncovered_blocks(servers, start, end)
    detail = ""
    if gaps and not all_gaps:
        detail = " (daemons exist for them but are banned after failures or not online)"
    raise NoRoute(gaps or [(start, end)], detail)


def describe_route(route: list[Hop]) -> str:
    """One line a user can read: `0:4 via alice (12ab..) -> 4:8 via ...`."""
    return " -> ".join(f"{h.start}:{h.end} via {h.server.name}" for h in route)
