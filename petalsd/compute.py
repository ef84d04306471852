"""Where torch runs: one worker thread at a time, never on the trio loop.

A decode step can take tens of milliseconds of CPU; on the trio loop it would stall every stream
(and yamux resets a stream whose reader stalls for 5 s). So every torch call goes through
`ComputeWorker.run`, which hands it to a thread. A capacity of one keeps jobs from fighting over
the cores torch already parallelises across; the limiter is FIFO, so sessions are served in the
order their steps arrive.

Cancellation: trio waits for the thread to finish the job it started (a half-applied KV-cache
update must never be observed), then delivers the cancellation.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import trio

T = TypeVar("T")


@dataclass
class ComputeStats:
    """Counters the control API and the announcer read (cheap, updated after each job)."""

    jobs: int = 0
    busy_seconds: float = 0.0
    tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def utilisation(self) -> float:
        elapsed = time.monotonic() - self.started_at
        return self.busy_seconds / elapsed if elapsed > 0 else 0.0


class ComputeWorker:
    def __init__(self) -> None:
        self._limiter = trio.CapacityLimiter(1)
        self.stats = ComputeStats()

    @property
    def queued(self) -> int:
        return self._limiter.statistics().tasks_waiting

    async def run(self, fn: Callable[..., T], *args: object, tokens: int = 0) -> T:
        """Run `fn(*args)` under `torch.inference_mode` in a worker thread and return its result."""

        def job() -> tuple[T, float]:
            begin = time.perf_counter()
            with torch.inference_mode():
                result = fn(*args)
            return result, time.perf_counter() - begin

        result, seconds = await trio.to_thread.run_sync(job, limiter=self._limiter)
        self.stats.jobs += 1
        self.stats.busy_seconds += seconds
        self.stats.tokens += tokens
        return result

    async def run_with_grad(self, fn: Callable[..., T], *args: object) -> T:
        """Like `run` but with autograd enabled (backward through the span for fine-tuning)."""

        def job() -> T:
            with torch.enable_grad():
                return fn(*args)

        return await trio.to_thread.run_sync(job, limiter=self._limiter)
