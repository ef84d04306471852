"""Where torch runs: one dedicated compute thread, never the trio loop.

A decode step can take tens of milliseconds of CPU; on the trio loop it would stall every stream
(and yamux resets a stream whose reader stalls for 5 s). So every torch call goes through
`ComputeWorker.run`, which hands it to the worker's thread. One job at a time keeps jobs from
fighting over the cores torch already parallelises across; jobs run in the order they arrive
(`trio.Lock` is fair), so sessions are served in the order their steps arrive.

Why not `trio.to_thread.run_sync`: every decode step crosses into the thread and back, on the
critical path of every token. Measured on the 2-vCPU VM the benchmarks run on (3 ms job, median
of 200): trio's thread cache costs 55-120 us to start a job and 105-170 us to resume the caller
(the result comes back through a `run_sync_soon` callback and one more scheduling pass); a thread
of our own fed through a `queue.SimpleQueue`, whose caller waits directly on a pipe the thread
writes one byte to, costs 30-65 us and 45-75 us.

Cancellation: the caller waits for the job it submitted to finish (a half-applied KV-cache update
must never be observed); a cancellation that arrived meanwhile is delivered at its next checkpoint.
A job still waiting for its turn is simply withdrawn.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import outcome
import torch
import trio

from petals_protocol.p2p.locking import held

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


@dataclass
class _Job:
    fn: Callable[[], Any]
    result: outcome.Outcome[Any] | None = None
    seconds: float = 0.0

    def __call__(self) -> None:
        began = time.perf_counter()
        self.result = outcome.capture(self.fn)
        self.seconds = time.perf_counter() - began


class ComputeWorker:
    """Runs torch jobs one at a time on a thread it owns: `async with ComputeWorker() as worker:`.

    The thread lives exactly as long as the `async with` block (a job running when the block exits
    is finished first); `run` outside the block raises RuntimeError.
    """

    def __init__(self) -> None:
        self._turn = trio.Lock()  # fair: jobs run in arrival order
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._done_r = self._done_w = -1  # the thread writes one byte per finished job
        self.stats = ComputeStats()

    @property
    def queued(self) -> int:
        return self._turn.statistics().tasks_waiting

    @property
    def busy(self) -> bool:
        """A job is running (or handing over to the next one)."""
        return self._turn.locked()

    async def __aenter__(self) -> ComputeWorker:
        if self._thread is not None:
            raise RuntimeError("this ComputeWorker is already running")
        self._done_r, self._done_w = os.pipe()
        os.set_blocking(self._done_r, False)
        self._thread = threading.Thread(target=self._serve, name="petalsd-compute", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        thread, self._thread = self._thread, None
        assert thread is not None
        self._jobs.put(None)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)
        os.close(self._done_r)
        os.close(self._done_w)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            os.write(self._done_w, b"\0")

    async def run(self, fn: Callable[..., T], *args: object, tokens: int = 0) -> T:
        """Run `fn(*args)` under `torch.inference_mode` on the compute thread and return its result."""

        def job() -> T:
            with torch.inference_mode():
                return fn(*args)

        result = await self._submit(job)
        self.stats.tokens += tokens
        return result

    async def run_with_grad(self, fn: Callable[..., T], *args: object) -> T:
        """Like `run` but with autograd enabled (backward through the span for fine-tuning)."""

        def job() -> T:
            with torch.enable_grad():
                return fn(*args)

        return await self._submit(job)

    async def _submit(self, fn: Callable[[], T]) -> T:
        if self._thread is None:
            raise RuntimeError("ComputeWorker is not running: use `async with ComputeWorker() as worker:`")
        job = _Job(fn)
        async with held(self._turn):
            self._jobs.put(job)
            with trio.CancelScope(shield=True):  # the job has started: wait for it, whatever happens
                await trio.lowlevel.wait_readable(self._done_r)
                os.read(self._done_r, 1)
        self.stats.jobs += 1
        self.stats.busy_seconds += job.seconds
        assert job.result is not None
        return job.result.unwrap()
