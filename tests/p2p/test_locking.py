"""`held(lock)`: a free lock is taken without a scheduler pass; a busy one is waited for fairly and
cancellably; the lock is released however the block ends."""

from __future__ import annotations

import pytest
import trio

from petals_protocol.p2p.locking import held


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
                await trio.sleep(0.001)
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
