"""The compute worker: one job at a time on its own thread, in arrival order, errors and
cancellations delivered to the caller, the thread owned by the `async with` block."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import trio

from petalsd.compute import ComputeWorker


def test_jobs_run_on_the_worker_thread_one_at_a_time_in_arrival_order() -> None:
    order: list[int] = []
    threads: set[str] = set()
    running = 0
    overlap = False

    def job(i: int) -> int:
        nonlocal running, overlap
        running += 1
        overlap = overlap or running > 1
        threads.add(threading.current_thread().name)
        time.sleep(0.01)
        order.append(i)
        running -= 1
        return i * i

    async def main() -> list[int]:
        results: dict[int, int] = {}
        async with ComputeWorker() as worker:
            async def one(i: int) -> None:
                results[i] = await worker.run(job, i, tokens=1)

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, i)
                    await trio.sleep(0.001)  # arrival order 0..5
            assert worker.stats.jobs == 6 and worker.stats.tokens == 6 and worker.stats.busy_seconds >= 0.06
        return [results[i] for i in range(6)]

    assert trio.run(main) == [i * i for i in range(6)]
    assert order == list(range(6)) and not overlap
    assert threads == {"petalsd-compute"}


def test_inference_mode_for_run_and_autograd_for_grad_steps() -> None:
    def steps(x: torch.Tensor):
        yield
        return torch.autograd.grad((x * 3).sum(), x)[0]

    async def main() -> tuple[bool, bool]:
        async with ComputeWorker() as worker:
            in_run = await worker.run(torch.is_inference_mode_enabled)
            x = torch.ones(2, requires_grad=True)
            grad = await worker.run_steps(steps(x), grad=True)
        return in_run, bool(torch.equal(grad, torch.full((2,), 3.0)))

    assert trio.run(main) == (True, True)


def test_inference_jobs_run_between_the_pieces_of_a_bulk_request() -> None:
    """A long forward request is driven one block per job: decode steps that arrive while it
    runs wait for one piece, not for the whole request (and the worker counts it)."""
    order: list[str] = []

    def bulk():
        for i in range(5):
            time.sleep(0.03)
            order.append(f"bulk{i}")
            yield
        return "done"

    async def main() -> int:
        async with ComputeWorker() as worker, trio.open_nursery() as nursery:
            async def step(i: int) -> None:
                await worker.run(lambda: order.append(f"step{i}"))

            nursery.start_soon(lambda: worker.run_steps(bulk(), peer="trainer"))
            await trio.sleep(0.01)  # the first piece is running
            for i in range(2):
                nursery.start_soon(step, i)
        return worker.stats.max_bulk_ahead_of_inference

    assert trio.run(main) == 1  # each step waited for the piece that was running, no more
    assert order.index("step0") < order.index("bulk1") and order.index("step1") < order.index("bulk2"), order
    assert order[-1] == "bulk4"


def test_an_error_reaches_its_caller_and_the_worker_goes_on() -> None:
    def boom() -> None:
        raise ValueError("bad shapes")

    async def main() -> int:
        async with ComputeWorker() as worker:
            with pytest.raises(ValueError, match="bad shapes"):
                await worker.run(boom)
            return await worker.run(lambda: 7)

    assert trio.run(main) == 7


def test_a_started_job_finishes_before_cancellation_and_a_queued_one_never_runs() -> None:
    ran: list[str] = []

    def slow(name: str) -> None:
        time.sleep(0.2)
        ran.append(name)

    async def main() -> None:
        async with ComputeWorker() as worker:
            async with trio.open_nursery() as nursery:
                first, second = trio.CancelScope(), trio.CancelScope()

                async def submit(scope: trio.CancelScope, name: str) -> None:
                    with scope:
                        await worker.run(slow, name)
                        await trio.lowlevel.checkpoint()  # the cancellation is delivered here

                nursery.start_soon(submit, first, "first")
                await trio.sleep(0.05)
                nursery.start_soon(submit, second, "second")
                await trio.sleep(0.05)
                began = trio.current_time()
                first.cancel()
                second.cancel()
            # the nursery waited for the started job; the queued one was withdrawn
            assert trio.current_time() - began >= 0.05
            assert first.cancelled_caught and second.cancelled_caught
            assert worker.queued == 0
            assert await worker.run(lambda: "still serving") == "still serving"

    trio.run(main)
    assert ran == ["first"]


def test_the_thread_lives_exactly_as_long_as_the_block() -> None:
    worker = ComputeWorker()

    async def outside() -> None:
        await worker.run(lambda: None)

    with pytest.raises(RuntimeError, match="not running"):
        trio.run(outside)

    async def main() -> None:
        async with worker:
            assert any(t.name == "petalsd-compute" for t in threading.enumerate())
        assert not any(t.name == "petalsd-compute" for t in threading.enumerate())
        async with worker:  # may run again afterwards
            assert await worker.run(lambda: 1) == 1

    trio.run(main)


def test_contributors_go_first_within_a_class_and_round_robin_among_equals() -> None:
    """Contributors first (petalsd/contributors.py): with the worker busy, a contributor's steps
    run before the consumers' that arrived earlier, yet never before inference of anyone when the
    contributor's job is bulk; and the daemon counts the turns it gave a contributor first."""
    from petalsd.compute import BULK, INFERENCE
    from petalsd.contributors import Contributors
    from petals_protocol.records import ServerRecord

    order: list[str] = []
    contributors = Contributors()
    serving = b"\x00\x24\x08\x01\x12\x20" + b"\x01" * 32  # a daemon's peer id
    client = b"\x00\x24\x08\x01\x12\x20" + b"\x02" * 32  # a client its record names (--own-clients)
    record = ServerRecord(peer_id=serving, model_fingerprint="f" * 64, model_name="m", start_block=0, end_block=1,
                          num_blocks=1, state="online", throughput=1.0, cache_tokens_free=1, addrs=(), public_name="",
                          version="1", expires_at=time.time() + 60, seq=1, using_relay=False, clients=(client,))
    contributors.learn([record])
    from petals_protocol.signing import peer_id_to_text

    server_text, client_text = peer_id_to_text(serving), peer_id_to_text(client)
    assert contributors(server_text) and contributors(client_text) and not contributors("consumer")
    expired = ServerRecord(**{**{f: getattr(record, f) for f in record.__dataclass_fields__},
                              "expires_at": time.time() - 1})
    lapsed = Contributors()
    lapsed.learn([expired])
    assert not lapsed(server_text)  # a record that expired vouches for nobody

    hold = threading.Event()

    def job(name: str) -> None:
        if name == "first":
            hold.wait(10)
        order.append(name)

    async def main() -> int:
        async with ComputeWorker(contributor=contributors) as worker:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: worker.run(job, "first", peer="consumer"))  # holds the worker
                await trio.sleep(0.005)
                for i in range(3):  # two consumers' steps, queued before anyone else's
                    for peer in ("consumer", "other"):
                        nursery.start_soon(lambda p=peer, i=i: worker.run(job, f"{p}{i}", peer=p))
                        await trio.sleep(0.001)
                nursery.start_soon(lambda: worker.run(job, "bulk-client", priority=BULK, peer=client_text))
                await trio.sleep(0.001)
                for i in range(2):
                    nursery.start_soon(lambda i=i: worker.run(job, f"client{i}", priority=INFERENCE, peer=client_text))
                    await trio.sleep(0.001)
                while worker.queued < 9:
                    await trio.sleep(0.001)
                hold.set()
            return worker.served_first

    served_first = trio.run(main)
    assert order[0] == "first"
    assert order[1:3] == ["client0", "client1"], order  # ahead of six consumer steps that came earlier
    assert order[3:9] == ["consumer0", "other0", "consumer1", "other1", "consumer2", "other2"], order
    assert order[9] == "bulk-client"  # a contributor's bulk job still waits for inference
    assert served_first == 2
