"""`held(lock)`: hold a `trio.Lock` for a block without a scheduler pass when the lock is free.

`async with trio.Lock()` yields to the scheduler once even when the lock is free (trio makes every
acquire a checkpoint). That costs a whole pass of the run loop (an epoll call, the run queue), and
on a token's critical path the loop's code and data are cold (warm: 7.2 us per acquire/release
against 1.9 us here; in a traced daemon the worker's lock plus the job's set-up took ~40 us). The locks on that path (a session's
step lock, the compute worker's turn, a stream's send lock) guard blocks that yield right away
anyway (a job hand-off, a stream write), so the extra pass buys nothing there. A busy lock is
waited for exactly as `Lock.acquire` does (fairly, cancellably); a free one is taken at once
(`acquire_nowait` refuses while others wait, so fairness is kept).
"""
from __future__ import annotations

from types import TracebackType

import trio


class held:  # noqa: N801 - used like a function: `async with held(lock):`
    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._lock.release()
