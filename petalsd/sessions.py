"""Inference sessions and the KV-cache memory budget they draw from.

A session is one client's stream through this daemon's span: it owns a KV cache sized for its
declared max_length and batch size. The budget is reserved in full at open, so a session that
does not fit is refused with a typed "busy" error up front, and a running session can never push
the daemon out of memory. Closing (or timing out) returns the reservation.

This module is pure bookkeeping; the torch work on the caches happens in compute.py's thread.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from petals_protocol.errors import ErrorCode, ProtocolError


class SessionRefused(ProtocolError):
    """A session could not be opened or used; `code` says why (busy, too_long, unknown_session...)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


@dataclass
class CacheBudget:
    """Bytes of KV cache this daemon may hold across all sessions (0 < used <= total)."""

    total: int
    used: int = 0

    @property
    def free(self) -> int:
        """Never negative: a reload may shrink `total` below what open sessions already hold
        (they keep their reservations; new sessions wait until enough is released)."""
        return max(0, self.total - self.used)

    def try_reserve(self, nbytes: int) -> bool:
        if nbytes > self.free:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)

    @contextmanager
    def lend(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold `nbytes` while one stateless job (a forward or backward request) waits and runs:
        its activations come out of the same memory as the KV caches, so a burst of them cannot
        push the daemon out of memory. Too big to ever fit: bad_request; no room now: busy."""
        if nbytes > self.total:
            raise SessionRefused(ErrorCode.BAD_REQUEST,
                                 f"{what} needs about {nbytes} bytes of activations, more than this daemon's "
                                 f"whole memory budget ({self.total}); send smaller batches or shorter sequences")
        if not self.try_reserve(nbytes):
            raise SessionRefused(ErrorCode.BUSY, f"{what} needs about {nbytes} bytes of activations but only "
                                                 f"{self.free} of {self.total} are free; retry or use another daemon")
        try:
            yield
        finally:
            self.release(nbytes)


@dataclass
class Session:
    session_id: bytes
    peer: str
    start: int
    end: int
    max_length: int
    batch_size: int
    cache: Any  # petals_protocol.models.span.SpanCache, owned by the compute thread while a step runs
    reserved_bytes: int
    created_at: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.monotonic)
    steps: int = 0
    last_step: int = -1
    tokens: int = 0
    adapter: str | None = None  # the LoRA adapter its steps run with (petalsd/adapters.py)

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id.hex(),
            "peer": self.peer,
            "blocks": [self.start, self.end],
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "position": int(getattr(self.cache, "length", 0)),
            "steps": self.steps,
            "tokens": self.tokens,
            "cache_bytes": self.reserved_bytes,
            "idle_seconds": round(time.monotonic() - self.last_active, 3),
            "age_seconds": round(time.time() - self.created_at, 3),
        }


class SessionTable:
    """Every open session of this daemon; enforces max_sessions, the per-peer share of them and
    the cache budget.

    A session id is claimed by `reserve` itself, before the caller awaits anything (the cache is
    allocated in the compute thread): two streams opening the same id at once cannot both pass,
    and concurrent opens cannot exceed `max_sessions`. `add` turns the claim into a session;
    `abandon` gives up a claim that never became one (its bytes return to the budget).
    """

    def __init__(self, max_sessions: int, budget: CacheBudget, max_per_peer: int = 0) -> None:
        self.max_sessions = max_sessions
        self.max_per_peer = max_per_peer  # 0: no per-peer cap
        self.budget = budget
        self._sessions: dict[bytes, Session] = {}
        self._pending: dict[bytes, tuple[str, int]] = {}  # claimed ids: (peer, reserved bytes)
        self._per_peer: dict[str, int] = {}  # sessions and claims by peer
        self.accepting = True

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    @property
    def claimed(self) -> int:
        """Open sessions plus ids reserved whose caches are still being allocated."""
        return len(self._sessions) + len(self._pending)

    def of_peer(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def reserve(self, session_id: bytes, nbytes: int, peer: str = "") -> None:
        """Claim `session_id`, a slot and `nbytes` of cache for `peer`, or raise SessionRefused."""
        if not self.accepting:
            raise SessionRefused(ErrorCode.DRAINING, "daemon is draining and accepts no new sessions")
        if session_id in self._sessions or session_id in self._pending:
            raise SessionRefused(ErrorCode.SESSION_EXISTS, f"session {session_id.hex()} is already open")
        if self.claimed >= self.max_sessions:
            raise SessionRefused(ErrorCode.BUSY, f"all {self.max_sessions} session slots are in use")
        if self.max_per_peer and self.of_peer(peer) >= self.max_per_peer:
            raise SessionRefused(ErrorCode.BUSY, f"this peer already holds {self.max_per_peer} sessions, "
                                                 "the most one peer may hold here")
        if not self.budget.try_reserve(nbytes):
            raise SessionRefused(
                ErrorCode.BUSY,
                f"KV cache needs {nbytes} bytes but only {self.budget.free} of {self.budget.total} are free",
            )
        self._pending[session_id] = (peer, nbytes)
        self._per_peer[peer] = self.of_peer(peer) + 1

    def add(self, session: Session) -> None:
        """Open a session whose id `reserve` claimed."""
        claim = self._pending.pop(session.session_id)
        assert claim == (session.peer, session.reserved_bytes), "add() must follow reserve() for the same session"
        self._sessions[session.session_id] = session

    def abandon(self, session_id: bytes) -> None:
        """Give up a claim whose session never opened (allocation failed or was cancelled)."""
        claim = self._pending.pop(session_id, None)
        if claim is not None:
            self.budget.release(claim[1])
            self._uncount(claim[0])

    def get(self, session_id: bytes) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionRefused(ErrorCode.UNKNOWN_SESSION, f"no open session {session_id.hex()}") from None

    def close(self, session_id: bytes) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self.budget.release(session.reserved_bytes)
            self._uncount(session.peer)
            session.cache = None  # drop the tensors now, not when the handler's frame goes away

    def _uncount(self, peer: str) -> None:
        left = self.of_peer(peer) - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)
