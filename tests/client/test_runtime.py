"""`ClientRuntime.call`: sync threads run coroutines on the runtime's trio loop through their lanes."""

from __future__ import annotations

import gc
import signal
import threading
import time

import pytest
import trio

from petals_client.runtime import ClientRuntime


def _runtime() -> tuple[ClientRuntime, dict[str, trio.Nursery]]:
    owned: dict[str, trio.Nursery] = {}

    async def main(nursery: trio.Nursery, stop: trio.Event) -> None:
        owned["nursery"] = nursery

    return ClientRuntime(main, name="test-runtime"), owned


async def _echo(value: object, delay: float = 0.0) -> object:
    await trio.sleep(delay)
    return value


async def _fail(message: str) -> None:
    await trio.sleep(0)
    raise ValueError(message)


def _lane_tasks(runtime: ClientRuntime) -> int:
    """Lane tasks alive in the runtime's nursery."""

    async def count() -> int:
        nursery = runtime._nursery
        assert nursery is not None
        return sum(1 for task in nursery.child_tasks if "_Lane.serve" in task.name)

    return runtime._blocking(count)


def test_results_and_errors_come_back_to_the_caller() -> None:
    runtime, _ = _runtime()
    try:
        assert [runtime.call(_echo, i) for i in range(100)] == list(range(100))
        with pytest.raises(ValueError, match="boom"):
            runtime.call(_fail, "boom")
        assert runtime.call(_echo, "after an error") == "after an error"  # the lane survives errors
    finally:
        runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.call(_echo, 1)


def test_threads_call_concurrently_each_on_its_own_lane_and_lanes_end_with_their_threads() -> None:
    runtime, _ = _runtime()
    results: dict[int, list[object]] = {}
    arrived = {"count": 0}
    everyone = trio.Event()

    async def rendezvous(i: int) -> int:
        """Returns only once all 8 threads' calls are in flight at once (else times out)."""
        arrived["count"] += 1
        if arrived["count"] == 8:
            everyone.set()
        with trio.fail_after(10):
            await everyone.wait()
        return i

    try:
        def worker(i: int) -> None:
            results[i] = [runtime.call(rendezvous, i)] + [runtime.call(_echo, (i, k)) for k in range(4)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: [i] + [(i, k) for k in range(4)] for i in range(8)}
        gc.collect()
        deadline = time.monotonic() + 5
        while _lane_tasks(runtime) > 0 and time.monotonic() < deadline:  # the threads have ended
            time.sleep(0.01)
        assert _lane_tasks(runtime) == 0
    finally:
        runtime.close()


def test_calling_from_the_loop_thread_is_refused() -> None:
    runtime, _ = _runtime()
    try:
        async def reenter() -> None:
            runtime.call(_echo, 1)

        with pytest.raises(RuntimeError, match="blocking"):
            runtime.call(reenter)
    finally:
        runtime.close()


def test_closing_during_a_call_answers_the_caller_instead_of_hanging() -> None:
    runtime, _ = _runtime()
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            runtime.call(_echo, 1, 30.0)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    time.sleep(0.2)
    runtime.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "closed" in str(errors[0])


def test_an_interrupted_wait_does_not_hand_its_result_to_the_next_call() -> None:
    """Ctrl-C while `generate` waits: the next call must get its own result, not the one the
    interrupted call left behind."""
    runtime, _ = _runtime()
    # Python's own Ctrl-C handler, even where the suite runs with SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main = threading.main_thread()
        assert threading.current_thread() is main  # signals are delivered to the main thread
        timer = threading.Timer(0.1, signal.pthread_kill, args=(main.ident, signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            runtime.call(_echo, "stale", 0.5)
        timer.join()
        assert runtime.call(_echo, "fresh") == "fresh"
        time.sleep(0.6)  # the interrupted call has finished by now; its lane has ended
        assert runtime.call(_echo, "fresh again") == "fresh again"
        gc.collect()
        assert _lane_tasks(runtime) == 1
    finally:
        signal.signal(signal.SIGINT, previous)
        runtime.close()
