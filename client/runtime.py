"""A trio event loop in a background thread, so that synchronous user code can use the swarm.

`model.generate(...)` is a plain function call, but the libp2p host, its connections and streams
live on a trio loop. The runtime owns that loop in one thread: its main task holds the nursery in
which every client task (connections, stream pumps) runs, and it exits only when `close()` asks
it to, cancelling everything it owns. Sync code calls in with `call(async_fn, *args)`.

Each calling thread gets a *lane*: a task of the runtime's nursery that runs that thread's calls
one after another, woken by a `run_sync_soon` callback, its result handed back through a bare
lock. `trio.from_thread.run` spawns a system task per call and returns through a `queue.Queue`;
every decode step crosses twice, and the lane's no-op round trip is much shorter (figures:
BENCHMARKS.md, "Client lanes").

Torch work never runs on that loop: the caller's thread embeds, samples and computes the head;
only the network hops run on the loop.
"""
from __future__ import annotations

import _thread
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

from petals_protocol.errors import first_error

T = TypeVar("T")


class _Lane:
    """One calling thread's way into the loop (see the module docstring), used by that thread only.
    `done` stays acquired between calls; the lane task releases it once per answered call."""

    def __init__(self) -> None:
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.request: tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]] | None = None
        self.result: outcome.Outcome[Any] | None = None
        self.wake = trio.Event()
        self.busy = False  # a call was taken and is not answered yet
        self.closed = False  # the lane task has ended (set before it answers what is left)
        self.retired = False  # its thread ended or stopped waiting: end the task once idle

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                if self.request is None:
                    if self.retired:
                        return
                    continue
                (fn, args), self.request = self.request, None
                self.busy = True
                result = await outcome.acapture(fn, *args)
                if isinstance(result, outcome.Error) and isinstance(result.error, trio.Cancelled):
                    raise result.error  # the runtime is closing: the caller is answered below
                self._answer(result)
                if self.retired:
                    return
        finally:
            self.closed = True
            if self.busy or self.request is not None:
                self.request = None
                self._answer(outcome.Error(RuntimeError("the client runtime closed during the call")))

    def _answer(self, result: outcome.Outcome[Any]) -> None:
        self.result = result
        self.busy = False
        self.done.release()


class _LaneHandle:
    """What a thread keeps of its lane (in a `threading.local`): when the thread ends, its local
    data goes, and the finalizer tells the lane task to end (a client used from many short-lived
    threads would otherwise keep a task per thread it ever saw)."""

    def __init__(self, lane: _Lane, token: trio.lowlevel.TrioToken) -> None:
        self.lane = lane
        weakref.finalize(self, _retire, lane, token)


def _retire(lane: _Lane, token: trio.lowlevel.TrioToken) -> None:
    lane.retired = True
    try:
        token.run_sync_soon(lane.wake.set)
    except trio.RunFinishedError:
        pass


class ClientRuntime:
    def __init__(self, main: Callable[[trio.Nursery, trio.Event], Awaitable[None]], name: str = "petals-client") -> None:
        """`main(nursery, stop)` sets up the client's resources inside `nursery` and returns."""
        self._main = main
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._lanes = threading.local()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join(10)  # the loop is unwinding; let it close its host first
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._amain)
        except BaseException as exc:  # noqa: BLE001 - reported to the thread that started us
            if self._error is None:
                self._error = exc
        finally:
            self._started.set()

    async def _amain(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._main(nursery, self._stop)
                except BaseException as exc:
                    # Recorded before the caller is woken (the `finally` below), so it never sees a
                    # runtime that neither started nor failed; a group is reduced to its cause.
                    self._error = first_error(exc, (Exception,)) or exc
                    raise
                finally:
                    self._started.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except BaseException:
            if self._error is None:
                raise

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(*args)` on the runtime's loop and return its result (or raise its error)."""
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError("the client runtime is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("ClientRuntime.call is blocking: call it from another thread, not the runtime's loop")
        handle: _LaneHandle | None = getattr(self._lanes, "handle", None)
        if handle is None or handle.lane.closed:
            handle = self._lanes.handle = _LaneHandle(self._blocking(self._open_lane), self._token)
        lane = handle.lane
        lane.request = (fn, args)
        try:
            if lane.closed:  # ended meanwhile (checked after posting the request: see _Lane.serve)
                raise trio.RunFinishedError
            self._token.run_sync_soon(lane.wake.set)
        except trio.RunFinishedError:
            self._lanes.handle = None
            raise RuntimeError("the client runtime is closed") from None
        try:
            lane.done.acquire()
        except BaseException:
            # Interrupted (KeyboardInterrupt) while the call runs on: this lane would hand its
            # result to our next call, so it is dropped (its task ends after this call).
            self._lanes.handle = None
            raise
        result, lane.result = lane.result, None
        assert result is not None
        return result.unwrap()

    async def _open_lane(self) -> _Lane:
        assert self._nursery is not None
        lane = _Lane()
        await self._nursery.start(lane.serve)
        return lane

    def _blocking(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise RuntimeError("the client runtime is closed") from None

    def close(self) -> None:
        if self._thread.is_alive() and self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(10)
