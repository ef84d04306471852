"""Closing connections nothing has happened on for `idle_connection_timeout` seconds.

Every open libp2p connection costs the daemon a socket, Noise state, a yamux reader task and
buffers; a client that opened a session and wandered off would keep all of that (and its KV cache)
until `session_idle_timeout`. This sweeper closes a connection once it has been idle for the
configured time; closing it resets its streams, so the inference handler returns and frees the
session's cache. Clients treat such a close as benign: they re-open and replay on their next step
(client/session.py), and re-dial for stateless requests.

What counts as activity: a stream opened or closed on the connection (every info, forward and
backward request, DHT RPC; seen through a libp2p network notifee) or an inference step on a
session of that peer (read from the session table). Yamux pings and window updates do not count,
since they flow on idle connections too. Nothing hooks into the handlers, so a stateless request
still computing when the timeout is reached would be cut: keep the timeout above `step_timeout`.

Cost: one pass over the connections and sessions every `timeout / 4` seconds (at least 0.25 s,
at most 10 s), so a connection is closed between `timeout` and `1.25 * timeout` after it went idle.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from libp2p.abc import INetConn, INetStream, INetwork

from petals_protocol.p2p.host import NetworkEvents

log = logging.getLogger("petalsd.idle")

MIN_SWEEP_PERIOD = 0.25
MAX_SWEEP_PERIOD = 10.0


class SessionLike(Protocol):
    """What the sweeper reads of a session (petalsd.sessions.Session)."""

    peer: str
    steps: int


@dataclass
class _Seen:
    steps: int  # steps of this peer's sessions at the last sweep (+1 per session, so opens count)
    since: float  # last activity


class _StreamActivity(NetworkEvents):
    """libp2p notifee: the time of the last stream opened or closed on each connection (inbound
    and outbound; short requests that start and end between two sweeps are seen too). Listening
    is not connection activity."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.last: dict[int, float] = {}  # id(muxed connection) -> time

    def _touch(self, stream: INetStream) -> None:
        self.last[id(stream.muxed_conn)] = self.clock()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        self._touch(stream)

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        self._touch(stream)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.last[id(conn.muxed_conn)] = self.clock()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.last.pop(id(conn.muxed_conn), None)


@dataclass
class IdleConnections:
    """Tracks when each connection last showed activity; `sweep()` closes the idle ones.

    `timeout` is read at every sweep (a callable, so a reload that changes it applies at once).
    `run()` registers the stream-activity notifee on the host's network for as long as it runs.
    """

    host: Any  # libp2p IHost
    sessions: Callable[[], Iterable[SessionLike]]
    timeout: Callable[[], float]
    clock: Callable[[], float] = time.monotonic
    _seen: dict[int, _Seen] = field(default_factory=dict)
    _streams: _StreamActivity | None = None

    def idle_connections(self) -> list[tuple[str, INetConn, float]]:
        """(peer, connection, idle seconds) of connections idle for at least `timeout()` seconds;
        updates the activity record of every connection as a side effect."""
        now = self.clock()
        steps_by_peer: dict[str, int] = {}
        for session in self.sessions():
            steps_by_peer[session.peer] = steps_by_peer.get(session.peer, 0) + session.steps + 1
        timeout = self.timeout()
        stream_times = self._streams.last if self._streams is not None else {}
        live: dict[int, _Seen] = {}
        idle: list[tuple[str, INetConn, float]] = []
        for peer_id, conns in self.host.get_network().get_connections_map().items():
            peer = str(peer_id)
            for conn in conns:
                key = id(conn.muxed_conn)
                steps = steps_by_peer.get(peer, 0)
                seen = self._seen.get(key)
                if seen is None or seen.steps != steps:
                    seen = _Seen(steps, now)
                seen.since = max(seen.since, stream_times.get(key, seen.since))
                live[key] = seen
                if now - seen.since >= timeout:
                    idle.append((peer, conn, now - seen.since))
        self._seen = live  # forget connections that are gone
        return idle

    async def sweep(self) -> int:
        """Close every idle connection; returns how many were closed."""
        closed = 0
        for peer, conn, idle_for in self.idle_connections():
            log.info("closing idle connection peer=%s after %.1f s (%d streams)", peer, idle_for,
                     len(conn.get_streams()))
            with trio.move_on_after(5.0):  # closing resets streams; never let one stuck peer stall the sweeper
                await conn.close()
            self._seen.pop(id(conn.muxed_conn), None)
            closed += 1
        return closed

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep until cancelled (with the daemon's nursery). Compatible with `nursery.start`."""
        network = self.host.get_network()
        self._streams = _StreamActivity(self.clock)
        network.register_notifee(self._streams)
        try:
            task_status.started()
            while True:
                await trio.sleep(min(max(self.timeout() / 4, MIN_SWEEP_PERIOD), MAX_SWEEP_PERIOD))
                await self.sweep()
        finally:
            network.remove_notifee(self._streams)
