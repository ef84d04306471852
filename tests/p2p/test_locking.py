"""`held(lock)` / `Eager(lock)`: a free lock is taken without a scheduler pass; a busy one is waited
for fairly and cancellably; the lock is released however the block ends; a wrapper shares its
state with the bare lock (py-libp2p's code keeps using the bare one it entered with)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from petals_protocol.p2p.locking import Eager, held


class _TaskSteps(trio.abc.Instrument):
    """Counts the scheduler's steps of one task (a yield ends a step)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


def test_a_free_lock_is_taken_without_a_scheduler_pass() -> None:
    async def steps_taken(block: object) -> int:
        counter = _TaskSteps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        try:
            async with block:  # type: ignore[attr-defined]
                pass
        finally:
            trio.lowlevel.remove_instrument(counter)
        return counter.steps

    async def main() -> tuple[int, int]:
        lock = trio.Lock()
        return await steps_taken(held(lock)), await steps_taken(lock)

    assert trio.run(main) == (0, 1)  # trio's own acquire yields once, even for a free lock


def test_a_busy_lock_is_handed_over_in_arrival_order() -> None:
    async def main() -> list[int]:
        lock = trio.Lock()
        order: list[int] = []

        async def take(i: int) -> None:
            async with held(lock):
                order.append(i)
                await trio.sleep(0.01)
            if i == 0:  # at once again: the lock went to the first waiter, so this queues behind all
                async with held(lock):
                    order.append(0)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(take, i)
                # queued in this order however slow the machine (a wall-clock pause here lost the
                # race against the holder's sleep on a loaded machine)
                await trio.testing.wait_all_tasks_blocked()
        return order

    assert trio.run(main) == [0, 1, 2, 3, 0]


def test_waiting_is_cancellable_and_the_lock_is_released_on_errors() -> None:
    async def main() -> None:
        lock = trio.Lock()
        with pytest.raises(ValueError):
            async with held(lock):
                raise ValueError("inside")
        assert not lock.locked()
        async with held(lock):
            with trio.move_on_after(0.05) as scope:
                async with held(lock.__class__()):  # a different lock: taken at once
                    pass
                async with trio.open_nursery() as nursery:
                    async def waiter() -> None:
                        async with held(lock):
                            raise AssertionError("the lock is ours")
                    nursery.start_soon(waiter)
            assert scope.cancelled_caught
        assert not lock.locked()

    trio.run(main)


def test_an_eager_wrapper_and_the_bare_lock_exclude_and_queue_together() -> None:
    """A task that entered the bare lock before it was wrapped still excludes users of the wrapper,
    and waiters of either kind are served in arrival order."""

    async def main() -> list[str]:
        bare = trio.Lock()
        eager = Eager(bare)
        order: list[str] = []

        async def use(name: str, lock: object, hold: float) -> None:
            async with lock:  # type: ignore[attr-defined]
                order.append(name)
                assert bare.locked() and eager.locked()
                await trio.sleep(hold)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(use, "bare holder", bare, 0.05)
            await trio.sleep(0.01)
            nursery.start_soon(use, "eager waiter", eager, 0.01)
            await trio.sleep(0.01)
            nursery.start_soon(use, "bare waiter", bare, 0.0)
            await trio.sleep(0.01)
            with pytest.raises(trio.WouldBlock):
                eager.acquire_nowait()  # held, and others queue
            assert eager.statistics().tasks_waiting == 2
        assert not eager.locked()
        return order

    assert trio.run(main) == ["bare holder", "eager waiter", "bare waiter"]


def test_an_eager_semaphore_takes_a_free_slot_without_a_pass_and_waits_for_a_busy_one() -> None:
    async def main() -> None:
        semaphore = Eager(trio.Semaphore(1))
        counter = _TaskSteps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        await semaphore.acquire()
        trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 0 and semaphore.locked()
        with trio.move_on_after(0.02) as scope:
            await semaphore.acquire()  # the only slot is taken: waits until cancelled
        assert scope.cancelled_caught
        semaphore.release()
        async with semaphore:
            assert semaphore.locked()
        assert not semaphore.locked()

    trio.run(main)
