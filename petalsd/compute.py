"""Where torch runs: one dedicated compute thread, never the trio loop.

A decode step can take tens of milliseconds of CPU; on the trio loop it would stall every stream
(and yamux resets a stream whose reader stalls for 5 s). So every torch call goes through
`ComputeWorker.run`, which hands it to the worker's thread. One job at a time keeps jobs from
fighting over the cores torch already parallelises across.

Who runs next (`_Turns`): inference jobs (steps, session opens) before bulk ones (forward and
backward requests). A forward or backward request is not one job but one per block (`run_steps`
drives the span's `forward_blocks` / `backward_blocks`), so a burst of large requests delays a
decode step by at most one block of one request. Within each class, contributors go first: peers
that serve the swarm themselves (`contributor(peer)`, petalsd/contributors.py: a live signed
record of that peer id, or a client its record names), BitTorrent-style, so that a busy daemon
serves those who serve others before pure consumers. Among equals, peers take turns (round
robin), and one peer's jobs run in the order they arrive. A free worker takes a job at once (no
scheduler pass).

`step_timeout`: a job that waits longer than this for its turn is withdrawn and its caller gets
`ComputeTimeout` (a typed `timeout`). A job that *runs* longer cannot be stopped (torch has no
safe cancellation); `hung_seconds()` reports it, the daemon's status says so, and the systemd
watchdog stops being pinged, so that a stuck daemon is restarted instead of queueing forever.

Why not `trio.to_thread.run_sync`: every decode step crosses into the thread and back, on the
critical path of every token. trio's thread cache costs more per job, both to start it and to
resume the caller (the result comes back through a `run_sync_soon` callback and one more
scheduling pass), than a thread of our own fed through a `queue.SimpleQueue`, whose caller waits
directly on a pipe the thread writes one byte to (figures: BENCHMARKS.md, "Compute worker
hand-off").

Cancellation: the caller waits for the job it submitted to finish (a half-applied KV-cache update
must never be observed); a cancellation that arrived meanwhile is delivered at its next checkpoint.
A job still waiting for its turn is simply withdrawn.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import outcome
import torch
import trio

from petals_protocol.errors import ErrorCode, PetalsError

T = TypeVar("T")

#: Job classes, in the order they get the worker.
INFERENCE, BULK = 0, 1


class ComputeTimeout(PetalsError):
    """A job waited past `step_timeout` for its turn (the worker is overloaded or stuck)."""

    code = ErrorCode.TIMEOUT


class _Turns:
    """The worker's turn: inference before bulk, contributors before consumers within a class,
    peers in turn among equals (see the module docstring). `busy` is True while a job holds the
    turn; a released turn passes straight to the next waiter, so nobody waits while the turn is free.
    `served_first` counts turns a contributor got while a consumer of its class was waiting."""

    def __init__(self) -> None:
        self.busy = False
        self.queued = 0
        self.served_first = 0
        # Queue (priority, contributor): inference/contributor, inference/consumer, bulk/..., bulk/...
        self._waiting: tuple[OrderedDict[str, deque[trio.Event]], ...] = tuple(OrderedDict() for _ in range(4))

    def take_if_free(self) -> bool:
        if self.busy:
            return False
        self.busy = True
        return True

    async def wait(self, priority: int, peer: str, contributor: bool = False) -> None:
        """Wait for the turn (call only when `take_if_free` said no)."""
        event = trio.Event()
        queue = 2 * priority + (0 if contributor else 1)
        self._waiting[queue].setdefault(peer, deque()).append(event)
        self.queued += 1
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # granted just as we were cancelled: pass the turn on
            else:
                waiters = self._waiting[queue][peer]
                waiters.remove(event)
                self.queued -= 1
                if not waiters:
                    del self._waiting[queue][peer]
            raise

    def release(self) -> None:
        for index, queues in enumerate(self._waiting):
            if queues:
                if index % 2 == 0 and self._waiting[index + 1]:
                    self.served_first += 1
                peer, waiters = next(iter(queues.items()))
                event = waiters.popleft()
                del queues[peer]
                if waiters:
                    queues[peer] = waiters  # to the back of the line: the next peer goes first
                self.queued -= 1
                event.set()  # `busy` stays True: the turn goes to that job
                return
        self.busy = False


@dataclass
class ComputeStats:
    """Counters the control API and the announcer read (cheap, updated after each job)."""

    jobs: int = 0
    bulk_jobs: int = 0  # pieces (blocks) of forward/backward requests finished
    # The most bulk jobs that finished while one inference job waited for its turn: the scheduler
    # promises at most the one already running (shown in status, checked by tests on a real daemon).
    max_bulk_ahead_of_inference: int = 0
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

    def __init__(self, step_timeout: float = float("inf"),
                 contributor: Callable[[str], bool] = lambda peer: False) -> None:
        self._turns = _Turns()
        self.contributor = contributor  # whether a peer serves the swarm itself (goes first when busy)
        self.step_timeout = step_timeout  # longest wait for a turn; a longer run counts as hung
        self._running_since: float | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._done_r = self._done_w = -1  # the thread writes one byte per finished job
        self.stats = ComputeStats()

    @property
    def queued(self) -> int:
        return self._turns.queued

    @property
    def served_first(self) -> int:
        """Turns given to a contributor while a consumer of the same class waited."""
        return self._turns.served_first

    @property
    def busy(self) -> bool:
        """A job is running (or handing over to the next one)."""
        return self._turns.busy

    def hung_seconds(self) -> float | None:
        """How long the running job has run, if that is past `step_timeout`; else None."""
        since = self._running_since
        if since is None:
            return None
        running = time.monotonic() - since
        return running if running > self.step_timeout else None

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

    async def run(self, fn: Callable[..., T], *args: object, tokens: int = 0, priority: int = INFERENCE,
                  peer: str = "") -> T:
        """Run `fn(*args)` under `torch.inference_mode` on the compute thread and return its result.
        `priority` and `peer` decide its turn (module docstring)."""

        def job() -> T:
            with torch.inference_mode():
                return fn(*args)

        result = await self._submit(job, priority, peer)
        self.stats.tokens += tokens
        return result

    async def run_steps(self, steps: Generator[None, None, T], *, grad: bool = False, tokens: int = 0,
                        priority: int = BULK, peer: str = "") -> T:
        """Drive a generator that stops between pieces of one long computation (a span's
        `forward_blocks` / `backward_blocks`), one piece per job: each piece takes its turn like
        any job, so inference steps run between the pieces instead of after the whole request.
        `grad`: autograd on (backward), else inference mode. Returns the generator's value."""
        more = object()

        def piece() -> Any:
            with torch.enable_grad() if grad else torch.inference_mode():
                try:
                    next(steps)
                except StopIteration as done:
                    return done.value
                return more

        try:
            while (result := await self._submit(piece, priority, peer)) is more:
                pass
        finally:
            steps.close()  # cancelled or failed between pieces: free what it holds now
        self.stats.tokens += tokens
        return result

    async def _submit(self, fn: Callable[[], T], priority: int = INFERENCE, peer: str = "") -> T:
        if self._thread is None:
            raise RuntimeError("ComputeWorker is not running: use `async with ComputeWorker() as worker:`")
        job = _Job(fn)
        bulk_before = self.stats.bulk_jobs
        if not self._turns.take_if_free():
            with trio.move_on_after(self.step_timeout) as waited:
                await self._turns.wait(priority, peer, self.contributor(peer))
            if waited.cancelled_caught:
                raise ComputeTimeout(f"no compute turn within step_timeout ({self.step_timeout:g} s): "
                                     f"{self._turns.queued} jobs queued here; try another daemon")
        if priority == INFERENCE:
            ahead = self.stats.bulk_jobs - bulk_before
            self.stats.max_bulk_ahead_of_inference = max(self.stats.max_bulk_ahead_of_inference, ahead)
        try:
            self._running_since = time.monotonic()
            self._jobs.put(job)
            with trio.CancelScope(shield=True):  # the job has started: wait for it, whatever happens
                await trio.lowlevel.wait_readable(self._done_r)
                os.read(self._done_r, 1)
        finally:
            self._running_since = None
            if priority == BULK:
                self.stats.bulk_jobs += 1  # before the release: the next job sees it finished
            self._turns.release()
        self.stats.jobs += 1
        self.stats.busy_seconds += job.seconds
        assert job.result is not None
        return job.result.unwrap()
