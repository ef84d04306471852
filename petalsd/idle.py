"""Closing connections nothing has happened on for `idle_connection_timeout` seconds.

Every open libp2p connection costs the daemon a socket, Noise state, a yamux reader task and
buffers; a client that opened a session and wandered off would keep all of that (and its KV cache)
until `session_idle_timeout`. This sweeper closes a connection once it has been idle for the
configured time; closing it resets its streams, so the inference handler returns and frees the
session's cache. Clients treat such a close as benign: they re-open and replay on their next step
(client/session.py), and re-dial for stateless requests.

What counts as activity: a stream opened or closed on the connection (every info, forward and
backward request, DHT RPC) or an inference step on a session of that peer. Yamux pings and window
updates do not count, since they flow on idle connections too. The sweeper only reads the host's
connection table and the session table (no hooks in the handlers), so a request that is still
computing when the timeout is reached would be cut: keep the timeout well above `step_timeout`.

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

log = logging.getLogger("petalsd.idle")

MIN_SWEEP_PERIOD = 0.25
MAX_SWEEP_PERIOD = 10.0


class SessionLike(Protocol):
    """What the sweeper reads of a session (petalsd.sessions.Session)."""

    peer: str
    steps: int


@dataclass
class _Seen:
    fingerprint: tuple[frozenset[int], int]
    since: float


@dataclass
class IdleConnections:
    """Tracks when each connection last showed activity; `sweep()` closes the idle ones.

    `timeout` is read at every sweep (a callable, so a reload that changes it applies at once).
    """

    host: Any  # libp2p IHost
    sessions: Callable[[], Iterable[SessionLike]]
    timeout: Callable[[], float]
    clock: Callable[[], float] = time.monotonic
    _seen: dict[int, _Seen] = field(default_factory=dict)

    def _connections(self) -> list[tuple[str, Any]]:
        return [(str(peer), conn) for peer, conns in self.host.get_network().get_connections_map().items()
                for conn in conns]

    def _fingerprint(self, conn: Any, steps_by_peer: dict[str, int]) -> tuple[frozenset[int], int]:
        streams = frozenset(_stream_key(s) for s in conn.get_streams())
        peer = str(conn.muxed_conn.peer_id)
        return streams, steps_by_peer.get(peer, 0)

    def idle_connections(self) -> list[tuple[str, Any, float]]:
        """(peer, connection, idle seconds) of connections idle for at least `timeout()` seconds;
        updates the activity record of every connection as a side effect."""
        now = self.clock()
        steps_by_peer: dict[str, int] = {}
        for session in self.sessions():
            steps_by_peer[session.peer] = steps_by_peer.get(session.peer, 0) + session.steps + 1
        timeout = self.timeout()
        live: dict[int, _Seen] = {}
        idle: list[tuple[str, Any, float]] = []
        for peer, conn in self._connections():
            fingerprint = self._fingerprint(conn, steps_by_peer)
            seen = self._seen.get(id(conn))
            if seen is None or seen.fingerprint != fingerprint:
                seen = _Seen(fingerprint, now)
            live[id(conn)] = seen
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
            self._seen.pop(id(conn), None)
            closed += 1
        return closed

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep forever (until cancelled with the daemon's nursery)."""
        task_status.started()
        while True:
            await trio.sleep(min(max(self.timeout() / 4, MIN_SWEEP_PERIOD), MAX_SWEEP_PERIOD))
            await self.sweep()


def _stream_key(stream: Any) -> int:
    """A yamux stream id (unique per connection); the object's id for other muxers."""
    muxed = getattr(stream, "muxed_stream", None)
    stream_id = getattr(muxed, "stream_id", None)
    return stream_id if isinstance(stream_id, int) else id(stream)
