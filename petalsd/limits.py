"""Resource limits: what one peer may take of this daemon, in one place.

A daemon on the open internet meets peers that flood, hold every slot or race. Each limit below
is a config option (petalsd/config.py, the "resource limits" group) and is shown in /v1/status;
`ResourceLimits` gathers them, `PeerGate` enforces the per-peer ones that are not bookkept
elsewhere:

- sessions per peer: `SessionTable` (sessions.py), next to max_sessions and the KV budget;
- bytes of unread frames per peer and in total: `ByteBudget` (petals_protocol.p2p.budget),
  charged by every stream's pump;
- streams per peer, compute jobs per peer and the request rate per peer: here;
- strikes: a peer whose streams keep ending in protocol errors or limit refusals (more than
  `peer_strikes` a minute) is cut off: its connections are closed and new ones from it are
  closed on arrival for `peer_ban_seconds` (petalsd/banning.py). Refusing a flood stream by
  stream still costs a stream negotiation each (milliseconds of the event loop); cutting the
  peer off is what keeps a flood from slowing everyone else's tokens.

Exceeding any of them is answered with a typed `busy` error (the client bans the daemon for a
while, with exponential backoff, and routes around it). Every check is O(1) per request; decode
steps cross none of them but the per-peer job count (a dict lookup and two additions).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from petals_protocol.errors import ErrorCode

from .sessions import SessionRefused

#: Peers whose counters are kept after they have nothing open (their request bucket refilling);
#: past this, the idle ones are forgotten (a fresh bucket gives a peer nothing it could not get
#: from a new peer id).
MAX_TRACKED_PEERS = 4096


@dataclass(frozen=True)
class ResourceLimits:
    """Every resource limit of a daemon (see the config options of the same names)."""

    max_sessions: int
    max_sessions_per_peer: int
    cache_budget: int
    max_streams_per_peer: int
    max_jobs_per_peer: int
    peer_request_rate: float
    peer_request_burst: int
    max_buffered_per_peer: int
    max_buffered_total: int
    max_frame_size: int
    max_push_targets_per_session: int
    peer_strikes: int
    peer_ban_seconds: float
    step_timeout: float

    @classmethod
    def from_config(cls, config: Any) -> ResourceLimits:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    def describe(self) -> dict[str, Any]:
        return asdict(self)


class LimitExceeded(SessionRefused):
    """A per-peer limit refused a request (`busy`: retry later or elsewhere)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BUSY, message)


@dataclass
class _PeerUse:
    streams: int = 0
    jobs: int = 0
    tokens: float = 0.0  # request bucket
    refilled_at: float = 0.0
    strikes: float = 0.0  # leaks at peer_strikes a minute
    struck_at: float = 0.0
    banned_until: float = 0.0


class PeerGate:
    """Per-peer stream, job and request-rate accounting (reads `limits` at each use: reloadable)."""

    def __init__(self, limits: ResourceLimits) -> None:
        self.limits = limits
        self._peers: dict[str, _PeerUse] = {}
        self.refused = 0  # requests refused by a limit here, for /v1/status
        self.bans = 0  # peers cut off for too many strikes

    def _use(self, peer: str) -> _PeerUse:
        use = self._peers.get(peer)
        if use is None:
            if len(self._peers) >= MAX_TRACKED_PEERS:
                self._forget_idle()
            use = self._peers[peer] = _PeerUse(tokens=float(self.limits.peer_request_burst),
                                               refilled_at=time.monotonic())
        return use

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for peer in [p for p, u in self._peers.items() if not u.streams and not u.jobs and u.banned_until < now]:
            del self._peers[peer]

    def _refuse(self, message: str) -> LimitExceeded:
        self.refused += 1
        return LimitExceeded(message)

    def request(self, peer: str) -> None:
        """Take one request from the peer's bucket (refilled at peer_request_rate), or refuse."""
        use = self._use(peer)
        now = time.monotonic()
        burst = float(self.limits.peer_request_burst)
        use.tokens = min(burst, use.tokens + (now - use.refilled_at) * self.limits.peer_request_rate)
        use.refilled_at = now
        if use.tokens < 1.0:
            raise self._refuse(f"this peer exceeds {self.limits.peer_request_rate:g} requests per second "
                               f"(burst {self.limits.peer_request_burst}); slow down")
        use.tokens -= 1.0

    def stream(self, peer: str) -> AbstractContextManager[None]:
        """Hold one of the peer's stream slots for the life of the block (a new stream is a request too)."""
        self._take_slot(peer, "streams", self.limits.max_streams_per_peer, "streams open")
        self.request(peer)
        return self._slot_held(peer, "streams")

    def job(self, peer: str) -> AbstractContextManager[None]:
        """Hold one of the peer's compute-job slots while its job waits and runs."""
        self._take_slot(peer, "jobs", self.limits.max_jobs_per_peer, "compute jobs queued")
        return self._slot_held(peer, "jobs")

    def _take_slot(self, peer: str, kind: str, cap: int, what: str) -> None:
        if getattr(self._use(peer), kind) >= cap:
            raise self._refuse(f"this peer already has {cap} {what} here")

    @contextmanager
    def _slot_held(self, peer: str, kind: str) -> Iterator[None]:
        use = self._use(peer)
        setattr(use, kind, getattr(use, kind) + 1)
        try:
            yield
        finally:
            setattr(use, kind, getattr(use, kind) - 1)

    def strike(self, peer: str) -> bool:
        """Count one protocol error or refusal against the peer; True when this one bans it."""
        use = self._use(peer)
        now = time.monotonic()
        per_second = self.limits.peer_strikes / 60.0
        use.strikes = max(0.0, use.strikes - (now - use.struck_at) * per_second) + 1.0
        use.struck_at = now
        if use.strikes > self.limits.peer_strikes and use.banned_until < now:
            use.banned_until = now + self.limits.peer_ban_seconds
            self.bans += 1
            return True
        return False

    def banned(self, peer: str) -> bool:
        use = self._peers.get(peer)
        return use is not None and use.banned_until > time.monotonic()

    def describe(self) -> dict[str, Any]:
        busiest = sorted(self._peers.items(), key=lambda kv: -(kv[1].streams + kv[1].jobs))[:8]
        return {
            "peers_tracked": len(self._peers),
            "refused": self.refused,
            "bans": self.bans,
            "banned": sorted(p for p, u in self._peers.items() if u.banned_until > time.monotonic())[:16],
            "busiest": [{"peer": p, "streams": u.streams, "jobs": u.jobs} for p, u in busiest if u.streams or u.jobs],
        }
