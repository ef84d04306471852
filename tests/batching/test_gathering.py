"""The gather policy both batchers share, and the client's head batcher."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from petals_client.head_batching import HeadBatcher
from petals_protocol.models.gathering import GatherPolicy


class Session:  # a stand-in for whatever object names a session (weak-referenceable)
    pass


def test_a_lone_session_never_waits() -> None:
    policy = GatherPolicy(max_window_s=0.05, job_factor=2.0)
    one = Session()
    policy.arrived(one, 10.0)
    policy.job_done(0.01)
    assert policy.active(10.0) == 1
    assert policy.window(10.0) == 0.0


def test_window_scales_with_job_time_and_is_capped() -> None:
    policy = GatherPolicy(max_window_s=0.05, job_factor=2.0, ema_weight=0.5)
    a, b = Session(), Session()
    policy.arrived(a, 10.0)
    policy.arrived(b, 10.0)
    assert policy.window(10.0) == 0.0  # nothing measured yet: no guessing
    policy.job_done(0.003)
    assert policy.window(10.0) == pytest.approx(0.006)  # a small model: a few ms at most
    policy.job_done(0.013)  # moving average: 0.003 + 0.5 * (0.013 - 0.003) = 0.008
    assert policy.job_seconds == pytest.approx(0.008)
    assert policy.window(10.0) == pytest.approx(0.016)
    policy.job_done(1.0)
    assert policy.window(10.0) == 0.05  # a big model: capped


def test_quiet_closed_and_collected_sessions_are_not_expected() -> None:
    policy = GatherPolicy(recent_s=1.0)
    a, b, c = Session(), Session(), Session()
    policy.arrived(a, 10.0)
    policy.arrived(b, 10.5)
    policy.arrived(c, 10.9)
    assert policy.active(11.0) == 3
    assert policy.active(11.2) == 2  # a has been quiet for more than recent_s
    policy.forget(b)
    assert policy.active(11.2) == 1
    del c
    gc.collect()
    assert policy.active(11.2) == 0


def test_only_sessions_due_within_the_window_are_waited_for() -> None:
    """Each session's next step is expected at its last arrival plus its last interval; sessions
    in another phase of the chain (due later than the window) are not waited for."""
    policy = GatherPolicy(max_window_s=0.05, job_factor=2.0)
    policy.job_done(0.02)  # window 0.04 s
    soon, later, new, me = Session(), Session(), Session(), Session()
    for s in (soon, later, me):
        policy.arrived(s, 10.0)
    policy.arrived(soon, 10.2)  # every 0.2 s: next due at 10.4
    policy.arrived(later, 10.3)  # every 0.3 s: next due at 10.6
    policy.arrived(new, 10.35)  # first step: no interval yet, so it counts
    policy.arrived(me, 10.39)
    want, window = policy.want(10.39, {me})
    assert window == pytest.approx(0.04)
    assert want == 3  # me (pending), soon (due at 10.4), new; not later (due at 10.6)
    assert policy.want(10.39, {me, soon}) == (3, pytest.approx(0.04))  # pending ones count once
    alone = GatherPolicy()
    alone.job_done(0.02)
    alone.arrived(me, 1.0)
    assert alone.want(1.0, {me}) == (1, 0.0)


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        GatherPolicy(recent_s=0)
    with pytest.raises(ValueError):
        GatherPolicy(ema_weight=0)



class CountingHead:
    """A linear head that records the batch size of every call."""

    def __init__(self, hidden: int = 16, vocab: int = 40) -> None:
        self.linear = torch.nn.Linear(hidden, vocab)
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls.append(x.shape[0])
        time.sleep(0.01)  # long enough for the other threads to queue behind it
        with torch.no_grad():
            return self.linear(x)


def _run_threads(batcher: HeadBatcher, sessions: list[Session], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs: list[torch.Tensor | None] = [None] * len(inputs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def run(i: int) -> None:
        barrier.wait()
        try:
            outputs[i] = batcher(sessions[i], inputs[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors
    return [o for o in outputs if o is not None]


def test_concurrent_sessions_share_head_calls_and_get_their_own_rows() -> None:
    head = CountingHead()
    batcher = HeadBatcher(head, GatherPolicy(max_window_s=0.5, job_factor=1e6))
    sessions = [Session() for _ in range(6)]
    inputs = [torch.randn(1, 1, 16) for _ in sessions]
    _run_threads(batcher, sessions, inputs)  # first round: learns the sessions and the head's time
    head.calls.clear()
    outputs = _run_threads(batcher, sessions, inputs)
    assert len(outputs) == 6
    assert sum(head.calls) == 6 and len(head.calls) < 6, head.calls  # fewer calls than sessions
    assert batcher.batches >= 1
    with torch.no_grad():
        for x, out in zip(inputs, outputs, strict=True):
            torch.testing.assert_close(out, head.linear(x), rtol=0, atol=1e-5)


def test_a_lone_session_takes_the_exact_path_at_once() -> None:
    head = CountingHead()
    batcher = HeadBatcher(head, GatherPolicy(max_window_s=5.0, job_factor=1e6))
    session = Session()
    x = torch.randn(1, 1, 16)
    began = time.monotonic()
    for _ in range(3):
        out = batcher(session, x)
    assert time.monotonic() - began < 1.0  # never waited for the 5 s window
    with torch.no_grad():
        assert torch.equal(out, head.linear(x))
    assert head.calls == [1, 1, 1] and batcher.batches == 0


def test_batches_use_the_batched_head_and_a_lone_session_the_exact_one() -> None:
    """`batched_head` (the client passes the oneDNN-packed head) serves only calls of several rows."""
    exact, batched = CountingHead(), CountingHead()
    batched.linear = exact.linear
    batcher = HeadBatcher(exact, GatherPolicy(max_window_s=0.5, job_factor=1e6), batched_head=batched)
    lone = Session()
    batcher(lone, torch.randn(1, 1, 16))
    batcher.forget(lone)
    sessions = [Session() for _ in range(6)]
    inputs = [torch.randn(1, 1, 16) for _ in sessions]
    _run_threads(batcher, sessions, inputs)
    exact.calls.clear()
    outputs = _run_threads(batcher, sessions, inputs)
    assert batched.calls and all(rows > 1 for rows in batched.calls), batched.calls
    assert all(rows == 1 for rows in exact.calls), exact.calls
    with torch.no_grad():
        for x, out in zip(inputs, outputs, strict=True):
            torch.testing.assert_close(out, exact.linear(x), rtol=0, atol=1e-5)


def test_prefill_shapes_bypass_the_batcher() -> None:
    head = CountingHead()
    batcher = HeadBatcher(head)
    assert batcher(Session(), torch.randn(1, 5, 16)).shape == (1, 5, 40)


def test_an_error_in_the_head_reaches_every_caller_and_the_batcher_recovers() -> None:
    calls = {"n": 0}

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("head exploded")
        return x * 2

    batcher = HeadBatcher(flaky)
    session = Session()
    with pytest.raises(RuntimeError, match="head exploded"):
        batcher(session, torch.ones(1, 1, 4))
    assert torch.equal(batcher(session, torch.ones(1, 1, 4)), torch.full((1, 1, 4), 2.0))
