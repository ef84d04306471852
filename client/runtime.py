"""A trio event loop in a background thread, so that synchronous user code can use the swarm.

`model.generate(...)` is a plain function call, but the libp2p host, its connections and streams
live on a trio loop. The runtime owns that loop in one thread: its main task holds the nursery in
which every client task (connections, stream pumps) runs, and it exits only when `close()` asks
it to, cancelling everything it owns. Sync code calls in with `call(async_fn, *args)`.

Torch work never runs on that loop: the caller's thread embeds, samples and computes the head;
only the network hops run on the loop.
"""
from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class ClientRuntime:
    def __init__(self, main: Callable[[trio.Nursery, trio.Event], Awaitable[None]], name: str = "petals-client") -> None:
        """`main(nursery, stop)` sets up the client's resources inside `nursery` and returns."""
        self._main = main
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._amain)
        except BaseException as exc:  # noqa: BLE001 - reported to the thread that started us
            self._error = exc
        finally:
            self._started.set()

    async def _amain(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            try:
                await self._main(nursery, self._stop)
            finally:
                self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(*args)` on the runtime's loop and return its result (or raise its error)."""
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError("the client runtime is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._thread.is_alive() and self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(10)
