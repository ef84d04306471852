"""The daemon-side batcher: concurrent steps gather into one forward, failures and cancellations stay local."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
import trio

from petals_protocol.models.span import Span, SpanCache, SpanUsageError, load_span
from petals_protocol.tensors import to_torch
from petalsd.batching import Batcher, BatchingConfig
from petalsd.compute import ComputeWorker

ON = BatchingConfig(enabled=True, max_rows=8, max_window_s=0.0)
CLOSE = dict(rtol=0.0, atol=1e-4)
R = TypeVar("R")


@pytest.fixture(scope="module")
def span(checkpoint: Callable[[str], Path]) -> Span:
    return load_span(checkpoint("llama"), 0, 4)


def _caches(span: Span, count: int, start: int | None = None, end: int | None = None) -> list[SpanCache]:
    """``count`` single-sequence caches, session i holding i+1 prefilled tokens."""
    caches = []
    for i in range(count):
        cache = span.new_cache(1, 32, start, end)
        prefill = torch.randn(1, i + 1, span.hidden_size, generator=torch.Generator().manual_seed(i))
        span.forward(prefill, cache)
        caches.append(cache)
    return caches


def _steps(span: Span, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    return [torch.randn(1, 1, span.hidden_size, generator=generator) for _ in range(count)]


async def _step(batcher: Batcher, *args: object, **kwargs: object) -> torch.Tensor:
    """A batcher step's output as a tensor (the batcher returns the wire payload)."""
    return to_torch(await batcher.step(*args, **kwargs))


def _run(worker: ComputeWorker, fn: Callable[..., Awaitable[R]], *args: object) -> R:
    """`trio.run(fn, *args)` with `worker`'s compute thread running for its duration."""

    async def main() -> R:
        async with worker:
            return await fn(*args)

    return trio.run(main)


async def _occupy(worker: ComputeWorker, seconds: float, started: trio.Event) -> None:
    """A slow job holding the worker, so that steps queue behind it (a busy daemon)."""
    started.set()
    await worker.run(time.sleep, seconds)


def test_concurrent_steps_run_as_one_batch(span: Span) -> None:
    count = 8
    caches, reference = _caches(span, count), _caches(span, count)
    hiddens = _steps(span, count)
    expected = [span.forward(h, c) for h, c in zip(hiddens, reference, strict=True)]
    worker = ComputeWorker()
    batcher = Batcher(worker, span, ON)
    outputs: dict[int, torch.Tensor] = {}

    async def one(i: int) -> None:
        outputs[i] = await _step(batcher, caches[i], hiddens[i], position=caches[i].length)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started = trio.Event()
            nursery.start_soon(_occupy, worker, 0.2, started)
            await started.wait()
            await trio.sleep(0.01)  # the slow job has the worker
            for i in range(count):
                nursery.start_soon(one, i)

    _run(batcher.worker, main)
    assert batcher.batches == 1 and batcher.batched_steps == count
    assert worker.stats.tokens == count
    for i in range(count):
        torch.testing.assert_close(outputs[i], expected[i], **CLOSE)
        assert caches[i].length == reference[i].length


def test_window_gathers_steps_of_recently_active_sessions(span: Span) -> None:
    """With an idle worker, steps of sessions seen recently wait a few ms for each other."""
    count = 4
    caches = _caches(span, count)
    worker = ComputeWorker()
    batcher = Batcher(worker, span, BatchingConfig(enabled=True, max_window_s=0.5, job_factor=1e6))

    async def one(i: int, delay: float) -> None:
        await trio.sleep(delay)
        await _step(batcher, caches[i], _steps(span, 1)[0])

    async def round_(spread: float) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i, spread * i)

    async def main() -> None:
        await round_(0.0)  # first round: no session is known yet, so no waiting
        batches = batcher.batches
        await round_(0.01)  # arrivals 10 ms apart, all four sessions now recently active
        assert batcher.batches == batches + 1

    _run(batcher.worker, main)
    assert all(c.length == i + 1 + 2 for i, c in enumerate(caches))


def test_a_lone_session_is_bit_exact_and_never_waits(span: Span) -> None:
    (cache,), (reference,) = _caches(span, 1), _caches(span, 1)
    batcher = Batcher(ComputeWorker(), span, BatchingConfig(enabled=True, max_window_s=5.0, job_factor=1e6))
    hiddens = _steps(span, 3)

    async def main() -> list[torch.Tensor]:
        with trio.fail_after(2.0):
            return [await _step(batcher, cache, h) for h in hiddens]

    def no_batch_job(own: object) -> None:
        raise AssertionError("a lone step went through the batch queue")

    batcher._take_and_run = no_batch_job  # type: ignore[method-assign]  # alone: the direct per-session job
    outputs = _run(batcher.worker, main)
    for out, h in zip(outputs, hiddens, strict=True):
        assert torch.equal(out, span.forward(h, reference))
    assert batcher.batches == 0


def test_a_closed_session_is_not_waited_for(span: Span) -> None:
    """After `forget` (the daemon calls it when a session closes) the remaining session is alone
    again and never waits for the window, however long it is."""
    caches = _caches(span, 2)
    batcher = Batcher(ComputeWorker(), span, BatchingConfig(enabled=True, max_window_s=5.0, job_factor=1e6))
    hiddens = _steps(span, 3)

    async def main() -> float:
        async with trio.open_nursery() as nursery:  # both sessions step once: each expects the other
            for cache, hidden in zip(caches, hiddens, strict=False):
                nursery.start_soon(batcher.step, cache, hidden)
        batcher.forget(caches[1])
        began = trio.current_time()
        with trio.fail_after(2.0):
            await _step(batcher, caches[0], hiddens[2])
        return trio.current_time() - began

    assert _run(batcher.worker, main) < 1.0


def test_cancelling_a_queued_step_leaves_the_others_alone(span: Span) -> None:
    count = 4
    caches, reference = _caches(span, count), _caches(span, count)
    hiddens = _steps(span, count)
    expected = [span.forward(h, c) for h, c in zip(hiddens, reference, strict=True)]
    worker = ComputeWorker()
    batcher = Batcher(worker, span, ON)
    outputs: dict[int, torch.Tensor] = {}
    cancelled: list[int] = []

    async def one(i: int, scope: trio.CancelScope) -> None:
        with scope:
            outputs[i] = await _step(batcher, caches[i], hiddens[i])
        if scope.cancelled_caught:
            cancelled.append(i)

    async def main() -> None:
        scopes = [trio.CancelScope() for _ in range(count)]
        async with trio.open_nursery() as nursery:
            started = trio.Event()
            nursery.start_soon(_occupy, worker, 0.5, started)
            await started.wait()
            await trio.sleep(0.01)
            for i in range(count):
                nursery.start_soon(one, i, scopes[i])
            await trio.sleep(0.05)  # all four queued behind the slow job
            scopes[1].cancel()

    _run(batcher.worker, main)
    assert cancelled == [1] and sorted(outputs) == [0, 2, 3]
    assert caches[1].length == 2, "a step cancelled while queued never touches its cache"
    for i in (0, 2, 3):
        torch.testing.assert_close(outputs[i], expected[i], **CLOSE)
    assert batcher.batches == 1 and batcher.batched_steps == 3
    # the cancelled session goes on normally afterwards
    out = _run(batcher.worker, _step, batcher, caches[1], hiddens[1])
    assert torch.equal(out, expected[1])


def test_a_bad_step_fails_alone(span: Span) -> None:
    count = 3
    caches = _caches(span, count)
    worker = ComputeWorker()
    batcher = Batcher(worker, span, ON)
    hiddens = _steps(span, count)
    results: dict[int, object] = {}

    hiddens[1] = torch.zeros(2, 1, span.hidden_size)  # two sequences for a one-sequence cache

    async def one(i: int, position: int) -> None:
        try:
            results[i] = await _step(batcher, caches[i], hiddens[i], position=position)
        except SpanUsageError as exc:
            results[i] = exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started = trio.Event()
            nursery.start_soon(_occupy, worker, 0.1, started)
            await started.wait()
            await trio.sleep(0.01)
            nursery.start_soon(one, 0, caches[0].length)
            nursery.start_soon(one, 1, caches[1].length)  # refused
            nursery.start_soon(one, 2, 1)  # rolls session 2 back to one token, then steps

    _run(batcher.worker, main)
    assert isinstance(results[1], SpanUsageError) and caches[1].length == 2
    assert isinstance(results[0], torch.Tensor) and caches[0].length == 2
    assert isinstance(results[2], torch.Tensor) and caches[2].length == 2
    assert batcher.batches == 1


def test_sub_spans_prefill_and_disabled_batching_take_the_per_session_path(span: Span) -> None:
    whole, sub = _caches(span, 2), _caches(span, 2, 1, 3)
    ref_whole, ref_sub = _caches(span, 2), _caches(span, 2, 1, 3)
    worker = ComputeWorker()
    batcher = Batcher(worker, span, ON)
    hiddens = _steps(span, 4)
    outputs: dict[int, torch.Tensor] = {}
    plan = list(zip(whole + sub, hiddens, strict=True))

    async def one(i: int) -> None:
        cache, hidden = plan[i]
        outputs[i] = await _step(batcher, cache, hidden, cache.start, cache.end)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started = trio.Event()
            nursery.start_soon(_occupy, worker, 0.1, started)
            await started.wait()
            await trio.sleep(0.01)
            for i in range(4):
                nursery.start_soon(one, i)

    _run(batcher.worker, main)
    assert batcher.batches == 2  # one batch per block range, in the same worker job
    for i, (cache, hidden) in enumerate(zip(ref_whole + ref_sub, hiddens, strict=True)):
        torch.testing.assert_close(outputs[i], span.forward(hidden, cache), **CLOSE)

    # fresh caches (the ones above went through a batched step, a few ulps away from the references)
    (fresh,), (ref_fresh,) = _caches(span, 1), _caches(span, 1)
    prefill = torch.randn(1, 3, span.hidden_size)
    out = _run(batcher.worker, _step, batcher, fresh, prefill)
    assert torch.equal(out, span.forward(prefill, ref_fresh))

    off = Batcher(ComputeWorker(), span, BatchingConfig())
    step = hiddens[0]
    assert torch.equal(_run(off.worker, _step, off, fresh, step), span.forward(step, ref_fresh))
    assert off.batches == 0
