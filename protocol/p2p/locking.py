"""Locks that cost no scheduler pass when free: `held(lock)` for a block, `Eager(lock)` as a lock.

`async with trio.Lock()` yields to the scheduler once even when the lock is free (trio makes every
acquire a checkpoint); so does `trio.Semaphore.acquire`. That costs a whole pass of the run loop
(an epoll call, the run queue), and on a token's critical path the loop's code and data are cold,
so that pass costs several times what taking a free lock at once does (figures: BENCHMARKS.md,
"Free locks without a scheduler pass"). py-libp2p's yamux takes such locks many times per
message (see `protocol.p2p.compat.yamux`). The blocks they guard yield right away anyway (a job hand-off, a
socket write), so the extra pass buys nothing. A busy lock is waited for exactly as
`Lock.acquire` does (fairly, cancellably); a free one is taken at once (`acquire_nowait` refuses
while others wait, so fairness is kept).
"""
from __future__ import annotations

from types import TracebackType

import trio


class Eager:
    """A `trio.Lock` or `trio.Semaphore` whose acquire skips the scheduler pass when it is free.

    A drop-in for the wrapped object wherever code uses `async with`, `acquire`, `acquire_nowait`,
    `release`, `locked` or `statistics`; the wrapped primitive keeps the state, so waiters that
    use it directly and waiters that use the wrapper queue together.
    """

    __slots__ = ("inner",)

    def __init__(self, inner: trio.Lock | trio.Semaphore) -> None:
        self.inner = inner

    async def acquire(self) -> None:
        try:
            self.inner.acquire_nowait()
        except trio.WouldBlock:
            await self.inner.acquire()

    def acquire_nowait(self) -> None:
        self.inner.acquire_nowait()

    def release(self) -> None:
        self.inner.release()

    def locked(self) -> bool:
        if isinstance(self.inner, trio.Semaphore):
            return self.inner.value == 0
        return self.inner.locked()

    def statistics(self) -> object:
        return self.inner.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.inner.release()


def held(lock: trio.Lock) -> Eager:
    """`async with held(lock):` holds `lock` for the block, at no scheduler pass if it is free."""
    return Eager(lock)
