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
        return self.total - self.used

    def try_reserve(self, nbytes: int) -> bool:
        if nbytes > self.free:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


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
    """Every open session of this daemon; enforces max_sessions and the cache budget."""

    def __init__(self, max_sessions: int, budget: CacheBudget) -> None:
        self.max_sessions = max_sessions
        self.budget = budget
        self._sessions: dict[bytes, Session] = {}
        self.accepting = True

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def reserve(self, session_id: bytes, nbytes: int) -> None:
        """Claim a slot and `nbytes` of cache for `session_id`, or raise SessionRefused."""
        if not self.accepting:
            raise SessionRefused(ErrorCode.DRAINING, "daemon is draining and accepts no new sessions")
        if session_id in self._sessions:
            raise SessionRefused(ErrorCode.SESSION_EXISTS, f"session {session_id.hex()} is already open")
        if len(self._sessions) >= self.max_sessions:
            raise SessionRefused(ErrorCode.BUSY, f"all {self.max_sessions} session slots are in use")
        if not self.budget.try_reserve(nbytes):
            raise SessionRefused(
                ErrorCode.BUSY,
                f"KV cache needs {nbytes} bytes but only {self.budget.free} of {self.budget.total} are free",
            )

    def add(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    def get(self, session_id: bytes) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionRefused(ErrorCode.UNKNOWN_SESSION, f"no open session {session_id.hex()}") from None

    def close(self, session_id: bytes) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self.budget.release(session.reserved_bytes)
            session.cache = None  # drop the tensors now, not when the handler's frame goes away
