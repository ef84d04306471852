"""Hostile peers, the bookkeeping half: session-id races, per-peer caps, a shrunken budget, a
step that fails midway, a failing pushed step next to healthy ones (in-process, no network)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from petals_protocol.errors import ErrorCode
from petals_protocol.messages import ErrorReply, InferenceStep, StepResult
from petals_protocol.models.span import load_span
from petals_protocol.models.synthetic import make_random_checkpoint
from petals_protocol.p2p.budget import ByteBudget
from petals_protocol.p2p.identity import ephemeral_identity, ed25519_private_key, peer_id
from petals_protocol.tensors import from_torch, to_torch
from petalsd import config as config_mod
from petalsd.batching import Batcher, run_single_step
from petalsd.compute import ComputeWorker
from petalsd.handlers import Limits, ServingContext, _Owned, _serve_push_stream
from petalsd.limits import LimitExceeded, PeerGate, ResourceLimits
from petalsd.sessions import CacheBudget, Session, SessionRefused, SessionTable


def _limits(**changes: Any) -> ResourceLimits:
    base = config_mod.DaemonConfig(model="m")
    return ResourceLimits.from_config(dataclasses.replace(base, **changes))


# ------------------------------------------------------------------------ sessions (items 1, 5, 6)

def test_an_id_is_claimed_at_reserve_so_a_concurrent_open_of_it_is_refused() -> None:
    table = SessionTable(4, CacheBudget(1000))
    table.reserve(b"a" * 16, 100, "p1")  # the first open now awaits its cache allocation...
    with pytest.raises(SessionRefused) as refused:
        table.reserve(b"a" * 16, 100, "p2")  # ...and a second stream opens the same id meanwhile
    assert refused.value.code == ErrorCode.SESSION_EXISTS
    assert table.budget.used == 100
    table.abandon(b"a" * 16)
    assert table.budget.used == 0 and table.claimed == 0


def test_concurrent_opens_cannot_exceed_max_sessions() -> None:
    table = SessionTable(2, CacheBudget(1000))
    table.reserve(b"a" * 16, 10, "p1")
    table.reserve(b"b" * 16, 10, "p2")  # both still allocating: neither is in the table yet
    with pytest.raises(SessionRefused) as refused:
        table.reserve(b"c" * 16, 10, "p3")
    assert refused.value.code == ErrorCode.BUSY


def test_one_peer_cannot_take_every_slot() -> None:
    table = SessionTable(4, CacheBudget(1000), max_per_peer=2)
    for sid in (b"a" * 16, b"b" * 16):
        table.reserve(sid, 10, "greedy")
        table.add(Session(session_id=sid, peer="greedy", start=0, end=1, max_length=1, batch_size=1, cache=None,
                          reserved_bytes=10))
    with pytest.raises(SessionRefused, match="this peer already holds 2 sessions") as refused:
        table.reserve(b"c" * 16, 10, "greedy")
    assert refused.value.code == ErrorCode.BUSY
    table.reserve(b"d" * 16, 10, "other")  # room left for another peer
    table.close(b"a" * 16)
    table.reserve(b"e" * 16, 10, "greedy")  # a closed session frees the peer's share


def test_a_smaller_budget_never_reports_negative_free_space() -> None:
    budget = CacheBudget(1000)
    assert budget.try_reserve(800)
    budget.total = 500  # a reload shrank it below what sessions hold
    assert budget.free == 0
    assert not budget.try_reserve(1)
    budget.release(800)
    assert budget.free == 500


# ------------------------------------------------------------------------------ per-peer gate (5)

def test_streams_jobs_and_request_rate_are_capped_per_peer() -> None:
    gate = PeerGate(_limits(max_streams_per_peer=2, max_jobs_per_peer=1, peer_request_rate=1.0,
                            peer_request_burst=3))
    with gate.stream("p"), gate.stream("p"):
        with pytest.raises(LimitExceeded, match="2 streams"):
            with gate.stream("p"):
                pass
        with gate.stream("q"):  # another peer is not affected
            pass
    with gate.job("p"):
        with pytest.raises(LimitExceeded, match="1 compute jobs"):
            with gate.job("p"):
                pass
    with pytest.raises(LimitExceeded, match="requests per second") as refused:
        gate.request("p")  # two streams took two requests, the third this one: the burst is spent
        gate.request("p")
    assert refused.value.code == ErrorCode.BUSY
    assert gate.refused == 3


# ------------------------------------------------------------------- a step failing midway (7)

@pytest.fixture(scope="module")
def span(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.set_num_threads(1)
    path = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", num_layers=4)
    return load_span(path, 0, 4)


class _FailingFamily:
    """The span's family, but block `fail_at` of the next call raises (a torch error midway)."""

    def __init__(self, family: Any, fail_at: int) -> None:
        self._family = family
        self.fail_at = fail_at
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._family, name)

    def run_block(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at + 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return self._family.run_block(*args)


def test_a_step_that_fails_midway_leaves_the_cache_as_before(span: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    prompt, nxt = torch.randn(1, 5, span.hidden_size, generator=gen), torch.randn(1, 1, span.hidden_size, generator=gen)
    with torch.inference_mode():
        reference_cache = span.new_cache(1, 16)
        span.forward(prompt, reference_cache)
        expected = span.forward(nxt, reference_cache)

        cache = span.new_cache(1, 16)
        run_single_step(span, cache, prompt, None, None, 0, None)
        monkeypatch.setattr(span, "flat_steps", False)
        monkeypatch.setattr(span, "family", _FailingFamily(span.family, fail_at=2))
        with pytest.raises(RuntimeError, match="simulated"):
            run_single_step(span, cache, nxt, None, None, 5, None)
        assert cache.length == 5
        lengths = {layer.keys.shape[2] for layer in cache.dynamic.layers if layer.is_initialized}
        assert lengths == {5}, f"layers hold {lengths} tokens after a failed step"
        monkeypatch.undo()
        got = run_single_step(span, cache, nxt, None, None, 5, None)
    torch.testing.assert_close(to_torch(got), expected)


# ------------------------------------------------------------ a failing pushed step (item 7)

class _Channel:
    """One side of a stream for in-process handler tests."""

    def __init__(self, peer: str, incoming: list[object] | None = None) -> None:
        self.peer_id = peer
        self.sent: list[object] = []
        self._incoming = list(incoming or [])

    async def send(self, msg: object) -> None:
        self.sent.append(msg)

    async def receive(self) -> object:
        if self._incoming:
            return self._incoming.pop(0)
        await trio.sleep_forever()


class _Cache:
    def __init__(self) -> None:
        self.length = 0

    def crop(self, position: int) -> None:
        self.length = position


class _FakeSpan:
    """A span whose step fails for hidden states starting with 13.0 and takes a while otherwise."""

    start, end, num_blocks_total, hidden_size = 0, 2, 2, 4
    dtype, device = torch.float32, torch.device("cpu")

    def forward(self, hidden: torch.Tensor, cache: _Cache, start: int, end: int,
                prompts: torch.Tensor | None = None) -> torch.Tensor:
        if float(hidden[0, 0, 0]) == 13.0:
            raise RuntimeError("out of memory (simulated)")
        import time

        time.sleep(0.2)
        cache.length += hidden.shape[1]
        return hidden + 1


def test_a_failing_pushed_step_does_not_cancel_other_sessions_steps() -> None:
    async def main() -> tuple[list[object], list[object]]:
        async with ComputeWorker() as worker:
            key = ephemeral_identity()
            span = _FakeSpan()
            ctx = ServingContext(
                span=span, fingerprint="f" * 64, model_name="m", peer_id=peer_id(key).to_base58(),
                signer=ed25519_private_key(key), sessions=SessionTable(4, CacheBudget(1 << 20)), worker=worker,
                limits=Limits(max_length=16, max_batch_size=1, session_idle_timeout=5, step_timeout=5),
                gate=PeerGate(_limits()), buffers=ByteBudget(per_peer=1 << 30, total=1 << 30),
                batcher=Batcher(worker, span))
            owners = []
            for sid in (b"g" * 16, b"b" * 16):
                session = Session(session_id=sid, peer="client", start=0, end=2, max_length=16, batch_size=1,
                                  cache=_Cache(), reserved_bytes=0)
                owned = _Owned(session, _Channel("client"))
                ctx.owners[sid] = owned
                owners.append(owned)
            good = InferenceStep(session_id=b"g" * 16, step=0, position=0, hidden=from_torch(torch.zeros(1, 1, 4)),
                                 hypo_ids=None)
            bad = InferenceStep(session_id=b"b" * 16, step=0, position=0,
                                hidden=from_torch(torch.full((1, 1, 4), 13.0)), hypo_ids=None)
            pusher = _Channel("previous-daemon", [bad])
            with trio.move_on_after(3):
                await _serve_push_stream(ctx, pusher, good)
            return owners[0].channel.sent, owners[1].channel.sent

    good_sent, bad_sent = trio.run(main)
    assert len(good_sent) == 1 and isinstance(good_sent[0], StepResult), good_sent
    assert len(bad_sent) == 1 and isinstance(bad_sent[0], ErrorReply) and bad_sent[0].code == ErrorCode.INTERNAL


# --------------------------------------------------------- compute turns and step_timeout (4)

def test_inference_jobs_go_before_a_forward_burst_and_peers_take_turns() -> None:
    from petalsd.compute import BULK, INFERENCE

    order: list[str] = []

    def job(name: str) -> None:
        import time

        time.sleep(0.03)
        order.append(name)

    async def main() -> None:
        async with ComputeWorker() as worker:
            async with trio.open_nursery() as nursery:
                for i in range(6):  # a burst of forward requests from one peer
                    nursery.start_soon(lambda i=i: worker.run(job, f"fwd{i}", priority=BULK, peer="trainer"))
                    await trio.sleep(0.001)
                for i in range(2):  # then two peers' decode steps, three each
                    for peer in ("a", "b"):
                        nursery.start_soon(lambda p=peer, i=i: worker.run(job, f"{p}{i}", priority=INFERENCE, peer=p))
                        await trio.sleep(0.001)
                nursery.start_soon(lambda: worker.run(job, "a2", priority=INFERENCE, peer="a"))
                await trio.sleep(0.001)

    trio.run(main)
    # The forward already running finishes; then every inference job, peers alternating; then the rest.
    assert order[0] == "fwd0"
    assert order[1:6] == ["a0", "b0", "a1", "b1", "a2"], order
    assert order[6:] == [f"fwd{i}" for i in range(1, 6)]


def test_a_job_that_waits_past_step_timeout_fails_typed_and_a_hung_job_is_reported() -> None:
    from petalsd.compute import ComputeTimeout

    release = __import__("threading").Event()

    async def main() -> tuple[float | None, str]:
        async with ComputeWorker(step_timeout=0.3) as worker:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run, release.wait)  # a job that hangs
                await trio.sleep(0.05)
                with pytest.raises(ComputeTimeout) as waited:
                    await worker.run(lambda: None)
                hung = worker.hung_seconds()
                release.set()
            assert worker.hung_seconds() is None and worker.queued == 0
            return hung, waited.value.code.value

    hung, code = trio.run(main)
    assert hung is not None and hung > 0.3
    assert code == "timeout"


# ------------------------------------------------------------------ DHT value store bound (9)

def test_the_dht_value_store_is_capped_with_constant_time_eviction() -> None:
    """Sybil peers each storing a valid record of their own: the store keeps at most the cap,
    dropping the longest-held, without scanning every value on each store."""
    from types import SimpleNamespace

    from libp2p.kad_dht.pb.kademlia_pb2 import Record
    from libp2p.kad_dht.value_store import ValueStore

    from petals_protocol.p2p import compat

    if not compat.INTERNALS:
        pytest.skip("the stock libp2p value store is left as it is")
    store = ValueStore(host=None, local_peer_id=None)  # type: ignore[arg-type]
    compat.bound_value_store(SimpleNamespace(value_store=store), max_values=100)
    for i in range(1000):
        record = Record()
        record.key, record.value, record.timeReceived = b"k%d" % i, b"v", "not a time"
        store.put_record(b"k%d" % i, record)
        assert len(store.store) <= 100
    assert b"k999" in store.store and b"k0" not in store.store
