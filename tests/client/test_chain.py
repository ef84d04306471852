"""The client's chain state machine (client/chain.py) in memory: every recovery decision, driven
event by event with no daemons, no network, no clock and no sleeps.

The same decisions with real daemons: tests/integration/test_push.py and test_recovery.py; the
trio layer that performs them, against scripted in-memory daemons: tests/client/test_session_memory.py.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petals_client.chain import (IDLE_RESUME_AFTER, Chain, Done, Expect, Fault, HopState, Recover, ReplayFailed, Send,
                                 SessionFailed, StepRun, WrongOutput)
from petals_client.routing import Hop, NoRoute, ServerInfo
from petals_protocol.errors import BadSignature, ErrorCode, ProtocolError, RemoteError
from petals_protocol.messages import ErrorReply, InferenceStep, StepResult
from petals_protocol.p2p.streams import StreamClosed
from petals_protocol.signing import inference_binding, peer_id_from_private_key, peer_id_to_text, sign_response
from petals_protocol.tensors import TensorPayload, from_torch, to_torch

FINGERPRINT = "cd" * 32
SPANS = [(0, 2), (2, 4), (4, 6)]
KEYS = [Ed25519PrivateKey.generate() for _ in range(4)]


def blocks(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """What a hop computes (any fixed function of its blocks and input stands for them)."""
    return x * (1 + 0.5 * (end - start)) + start


def hop_state(index: int, start: int, end: int, *, relayed: bool = False, addrs: bool = True) -> HopState:
    peer = peer_id_from_private_key(KEYS[index])
    text = peer_id_to_text(peer)
    server = ServerInfo(peer_id=text, addrs=(f"/ip4/127.0.0.1/tcp/{4000 + index}/p2p/{text}",) if addrs else (),
                        start=start, end=end, public_name=f"d{index}")
    return HopState(hop=Hop(server, start, end), session_id=bytes([index + 1]) * 16, peer=peer, relayed=relayed)


def make_chain(*, push: bool = True, max_retries: int = 3) -> Chain:
    return Chain(0, 6, FINGERPRINT, max_retries, push=push,
                 hops=[hop_state(i, a, b) for i, (a, b) in enumerate(SPANS)])


def answer(expect: Expect, *, key: Ed25519PrivateKey | None = None, output: TensorPayload | None = None) -> StepResult:
    """The daemon's signed result for the step `expect` waits for (signed with `key`: another
    daemon's key makes a bad signature; `output`: a wrong output)."""
    state, step = expect.hop, expect.step
    if output is None:
        output = from_torch(blocks(to_torch(step.hidden), state.hop.start, state.hop.end))
    signer = key or KEYS[[s for s, _ in SPANS].index(state.hop.start)]
    binding = inference_binding(step, start_block=state.hop.start, end_block=state.hop.end,
                                model_fingerprint=FINGERPRINT, output=output)
    return StepResult(session_id=step.session_id, step=step.step, position=step.position, hidden=output,
                      signature=sign_response(signer, binding))


def expected_output(x: torch.Tensor, spans=SPANS) -> torch.Tensor:
    for start, end in spans:
        x = blocks(x, start, end)
    return x


def run_through(run: StepRun, now: float = 0.0) -> TensorPayload:
    """Drive `run` with honest answers until Done."""
    while True:
        action = run.next(now)
        if isinstance(action, Done):
            return action.output
        if isinstance(action, Send):
            run.sent()
        else:
            assert isinstance(action, Expect)
            run.received(answer(action), now)


def send_and_expect(run: StepRun, now: float = 0.0) -> Expect:
    """Perform the round's send; the first Expect."""
    send = run.next(now)
    assert isinstance(send, Send)
    run.sent()
    expect = run.next(now)
    assert isinstance(expect, Expect)
    return expect


X = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ the normal path
def test_push_round_sends_once_and_chains_each_input_to_the_previous_verified_output() -> None:
    chain = make_chain()
    run = chain.run(0, from_torch(X), 0)
    send = run.next(0.0)
    assert isinstance(send, Send) and send.hop is chain.hops[0]
    assert [(t.start_block, t.end_block, t.step) for t in send.step.push] == [(2, 4, 0), (4, 6, 0)]
    run.sent()
    inputs = []
    for index in range(3):
        expect = run.next(0.0)
        assert isinstance(expect, Expect) and expect.hop is chain.hops[index]
        inputs.append(to_torch(expect.step.hidden))
        run.received(answer(expect), 0.0)
    done = run.next(0.0)
    assert isinstance(done, Done)
    assert torch.equal(to_torch(done.output), expected_output(X))
    # Hop k is checked against the step the previous daemon should have pushed: its verified output.
    assert torch.equal(inputs[1], blocks(X, 0, 2)) and torch.equal(inputs[2], expected_output(X, SPANS[:2]))
    # Replay memory: each hop keeps the payload it consumed (bytes, no torch), steps counted.
    assert [len(h.chunks) for h in chain.hops] == [1, 1, 1] and [h.step for h in chain.hops] == [1, 1, 1]
    assert all(isinstance(h.chunks[0], TensorPayload) for h in chain.hops)
    assert chain.hops[1].chunks[0] == from_torch(blocks(X, 0, 2))


def test_push_off_sends_to_every_hop_itself() -> None:
    chain = make_chain(push=False)
    run = chain.run(0, from_torch(X), 0)
    sends = 0
    while not isinstance(action := run.next(0.0), Done):
        if isinstance(action, Send):
            assert action.step.push is None
            sends += 1
            run.sent()
        else:
            run.received(answer(action), 0.0)
    assert sends == 3 and torch.equal(to_torch(action.output), expected_output(X))


def test_push_stops_at_a_hop_without_address_or_on_the_same_daemon() -> None:
    chain = make_chain()
    chain.hops[2] = hop_state(2, 4, 6, addrs=False)
    assert chain.push_targets(0) == [chain.hops[1]]
    chain.hops[1] = replace(chain.hops[1], hop=Hop(chain.hops[0].hop.server, 2, 4))
    assert chain.push_targets(0) == []


def test_steps_with_deep_prompts_are_not_pushed() -> None:
    chain = make_chain()
    chain.prompts = torch.zeros(6, 1, 2, 8)
    send = chain.run(0, from_torch(X), 0).next(0.0)
    assert isinstance(send, Send) and send.step.push is None and send.step.prompts is not None
    assert send.step.prompts.shape == (2, 1, 2, 8)
    assert chain.run(0, from_torch(X), 2).next(0.0).step.push is not None  # past the prefix: pushed


def test_stale_results_are_recognised() -> None:
    chain = make_chain()
    chain.hops[1].step = 5
    expect = Expect(chain.hops[1], InferenceStep(session_id=chain.hops[1].session_id, step=5, position=0,
                                                 hidden=from_torch(X), hypo_ids=None))
    old = StepResult(session_id=chain.hops[1].session_id, step=4, position=0, hidden=from_torch(X), signature=bytes(64))
    assert expect.is_stale(old) and not expect.is_stale(replace(old, step=5))


# ------------------------------------------------------------------ what a reply must be
def test_bad_signature_wrong_shape_error_reply_and_wrong_message_are_refused() -> None:
    chain = make_chain()
    expect = send_and_expect(chain.run(0, from_torch(X), 0))
    with pytest.raises(BadSignature):
        chain.check(expect.hop, expect.step, answer(expect, key=KEYS[3]), 0.0)
    with pytest.raises(ProtocolError) as info:
        chain.check(expect.hop, expect.step, answer(expect, output=from_torch(X[:, :2])), 0.0)
    assert info.value.code == ErrorCode.BAD_TENSOR
    with pytest.raises(RemoteError) as remote:
        chain.check(expect.hop, expect.step, ErrorReply(code=ErrorCode.BUSY, message="full", session_id=None,
                                                        request_id=None), 0.0)
    assert remote.value.peer == expect.hop.hop.server.peer_id
    with pytest.raises(ProtocolError) as malformed:
        chain.check(expect.hop, expect.step, object(), 0.0)
    assert malformed.value.code == ErrorCode.MALFORMED
    assert chain.hops[0].step == 0 and not chain.hops[0].chunks  # nothing committed


# ------------------------------------------------------------------ recovery decisions
def test_dead_hop_is_banned_and_replaced() -> None:
    chain = make_chain(push=False)
    run = chain.run(0, from_torch(X), 0)
    run_through(run)
    run = chain.run(0, from_torch(X[:, :1]), 4)
    expect = send_and_expect(run, now=0.5)
    run.failed(StreamClosed("d0", None, "reset"), Fault.CLOSED)
    recover = run.next(0.5)
    assert isinstance(recover, Recover) and recover.index == 0 and not recover.resume
    assert recover.failed.position == 4 and len(recover.failed.chunks) == 1  # what the replacement replays
    assert expect.hop is recover.failed


def test_idle_closed_stream_is_resumed_on_the_same_daemon() -> None:
    chain = make_chain(push=False)
    run_through(chain.run(0, from_torch(X), 0), now=0.0)
    for exc, fault in ((StreamClosed("d0", None, "closed", clean=True), Fault.CLOSED),
                       (RemoteError(ErrorCode.TIMEOUT, "session idle"), Fault.REPLY)):
        run = chain.run(0, from_torch(X[:, :1]), 4)
        send_and_expect(run, now=IDLE_RESUME_AFTER + 3.0)  # the hop was quiet that long
        run.failed(exc, fault)
        recover = run.next(0.0)
        assert isinstance(recover, Recover) and recover.resume and recover.idle_for >= IDLE_RESUME_AFTER
    # The same close right after a busy step is a crash, not an idle close.
    run = chain.run(0, from_torch(X[:, :1]), 4)
    chain.hops[0].last_active = IDLE_RESUME_AFTER + 3.0
    send_and_expect(run, now=IDLE_RESUME_AFTER + 3.1)
    run.failed(StreamClosed("d0", None, "closed"), Fault.CLOSED)
    assert not run.next(0.0).resume


def test_relayed_hop_is_retried_through_its_relays_first() -> None:
    chain = make_chain(push=False)
    chain.hops[0].relayed = True
    run = chain.run(0, from_torch(X), 0)
    send_and_expect(run)
    run.failed(OSError("relay gone"), Fault.NETWORK)
    assert run.next(0.0).resume


def test_hung_first_hop_is_replaced_and_push_stays_on() -> None:
    chain = make_chain()
    run = chain.run(0, from_torch(X), 0)
    send_and_expect(run)
    run.failed(TimeoutError(), Fault.TIMEOUT)
    recover = run.next(0.0)
    assert isinstance(recover, Recover) and recover.index == 0 and not recover.resume
    assert chain.push  # the client sent that step itself: only its daemon is to blame


def test_pushed_hop_timing_out_turns_push_off_and_is_replaced() -> None:
    chain = make_chain()
    run = chain.run(0, from_torch(X), 0)
    expect = send_and_expect(run)
    run.received(answer(expect), 0.0)
    assert run.next(0.0).hop is chain.hops[1]  # waiting for the pushed hop's result
    run.failed(TimeoutError(), Fault.TIMEOUT)
    recover = run.next(0.0)
    assert isinstance(recover, Recover) and recover.index == 1
    assert not chain.push
    assert chain.hops[0].step == 1  # the hop before stands


def test_pushed_hop_with_bad_signature_gets_the_step_resent_directly() -> None:
    chain = make_chain()
    run = chain.run(0, from_torch(X), 0)
    expect = send_and_expect(run)
    run.received(answer(expect), 0.0)
    pushed = run.next(0.0)
    with pytest.raises(BadSignature) as bad:
        run.received(answer(pushed, key=KEYS[3]), 0.0)
    run.failed(bad.value, Fault.REPLY)
    resend = run.next(0.0)  # nobody blamed yet: no Recover
    assert isinstance(resend, Send) and resend.hop is chain.hops[1]
    assert torch.equal(to_torch(resend.step.hidden), blocks(X, 0, 2))  # hop 0's verified output
    assert [t.start_block for t in resend.step.push] == [4]  # and it pushes on from there
    run.sent()
    while not isinstance(action := run.next(0.0), Done):
        run.received(answer(action), 0.0)
    assert torch.equal(to_torch(action.output), expected_output(X))
    assert [h.step for h in chain.hops] == [1, 1, 1] and chain.push


def test_direct_step_with_bad_signature_is_replaced() -> None:
    chain = make_chain()
    run = chain.run(0, from_torch(X), 0)
    expect = send_and_expect(run)
    with pytest.raises(BadSignature) as bad:
        run.received(answer(expect, key=KEYS[3]), 0.0)
    run.failed(bad.value, Fault.REPLY)
    recover = run.next(0.0)
    assert isinstance(recover, Recover) and recover.index == 0 and not recover.resume


def test_a_daemon_refusing_our_request_ends_the_step() -> None:
    chain = make_chain()
    run = chain.run(0, from_torch(X), 0)
    send_and_expect(run)
    refusal = RemoteError(ErrorCode.TOO_LONG, "max_length")
    with pytest.raises(RemoteError):
        run.failed(refusal, Fault.REPLY)


def test_a_step_survives_at_most_max_retries_failures() -> None:
    chain = make_chain(max_retries=2)
    run = chain.run(0, from_torch(X), 0)
    for _ in range(2):
        send_and_expect(run)
        run.failed(OSError("reset"), Fault.NETWORK)
        assert isinstance(run.next(0.0), Recover)
    send_and_expect(run)
    with pytest.raises(SessionFailed) as failed:
        run.failed(OSError("reset"), Fault.NETWORK)
    assert failed.value.blocks == (0, 2)


def test_no_replacement_backs_off_then_fails_naming_the_blocks() -> None:
    chain = make_chain(max_retries=3)
    retries = [chain.replacement_failed(a, NoRoute([(2, 4)])) for a in range(3)]
    assert [r.refresh for r in retries] == [True] * 3
    assert [r.delay for r in retries] == [0.2, 0.4, None]  # no wait after the last attempt
    dead = chain.replacement_failed(0, StreamClosed("12D3KooWdead", None, "refused"))
    assert dead.ban == "12D3KooWdead" and not dead.refresh
    hung = chain.replacement_failed(0, ReplayFailed("12D3KooWhung", TimeoutError()))  # no reply while replaying
    assert hung.ban == "12D3KooWhung"
    error = chain.no_replacement(chain.hops[1], NoRoute([(2, 4)]))
    assert isinstance(error, SessionFailed) and error.blocks == (2, 4) and "2:4" in str(error)


def test_replaced_hop_takes_the_failed_ones_place() -> None:
    chain = make_chain()
    new = [hop_state(3, 2, 3), hop_state(3, 3, 4)]
    chain.replaced(1, new, resumed=False)
    assert [(h.hop.start, h.hop.end) for h in chain.hops] == [(0, 2), (2, 3), (3, 4), (4, 6)]
    chain.replaced(0, [hop_state(0, 0, 2)], resumed=True)
    assert (chain.recoveries, chain.resumes) == (1, 1)


# ------------------------------------------------------------------ rollback and replay memory
def test_wrong_output_rolls_back_the_hop_and_every_later_one() -> None:
    chain = make_chain()
    run_through(chain.run(0, from_torch(X), 0))
    run_through(chain.run(0, from_torch(X[:, :1]), 4))
    assert [h.position for h in chain.hops] == [5, 5, 5]
    hop1_input = chain.hops[1].chunks[-1]
    got = chain.wrong_output(1, 4)
    assert got == hop1_input
    assert [h.position for h in chain.hops] == [5, 4, 4] and [len(h.chunks) for h in chain.hops] == [2, 1, 1]
    chain.hops[1].last_active, chain.hops[1].last_sent = 0.0, 10.0  # idle, but found wrong: never resumed
    recover = chain.recovery(1, WrongOutput("d1 lied"), Fault.REPLY, 4)
    assert not recover.resume
    # The step runs again from the replacement, from hop 1 on; hop 0 is not asked again.
    chain.replaced(1, [hop_state(3, 2, 4)], resumed=False)
    send = chain.run(1, got, 4).next(0.0)
    assert send.hop.hop.server.public_name == "d3" and send.step.position == 4


def test_rollback_trims_the_replay_memory_to_the_position() -> None:
    state = hop_state(0, 0, 2)
    state.commit(from_torch(X), 0)
    state.commit(from_torch(X[:, :1]), 4)
    state.rollback(2)  # inside the first chunk: trimmed, the second dropped
    assert state.position == 2 and len(state.chunks) == 1
    assert torch.equal(to_torch(state.chunks[0]), X[:, :2])
    state.commit(from_torch(X[:, 3:]), 2)  # a step at an earlier position rolls back first
    assert state.position == 3 and state.step == 3


def test_replay_steps_rebuild_the_memory_chunk_by_chunk() -> None:
    chain = make_chain()
    memory = [from_torch(X), from_torch(X[:, :1]), from_torch(X[:, 1:2])]
    fresh = hop_state(3, 0, 2)
    steps = chain.replay_steps(fresh, memory)
    assert [(s.step, s.position, s.hidden) for s in steps] == [(0, 0, memory[0]), (1, 4, memory[1]), (2, 5, memory[2])]
    for step in steps:
        chain.accept(fresh, step, answer(Expect(fresh, step), key=KEYS[3]), 1.0)
    assert fresh.chunks == memory and (fresh.position, fresh.step, fresh.last_active) == (6, 3, 1.0)


def test_the_state_machine_imports_no_trio() -> None:
    code = "import sys, petals_client.chain, petals_client.replies; assert 'trio' not in sys.modules, 'trio'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ pipelined prefill
def test_prefill_plans_every_chunk_for_the_first_hop_pushed_along_the_whole_chain() -> None:
    chain = make_chain()
    chain.hops[2].step = 7  # hops' step numbers need not agree
    chunks = [from_torch(X[:, :2]), from_torch(X[:, 2:])]
    plan = chain.prefill(chunks, 3, now=1.0)
    assert plan is not None and plan.bases == [0, 0, 7] and plan.position == 3
    assert [(s.step, s.position, s.hidden) for s in plan.steps] == [(0, 3, chunks[0]), (1, 5, chunks[1])]
    assert [[(t.start_block, t.step) for t in s.push] for s in plan.steps] == [[(2, 0), (4, 7)], [(2, 1), (4, 8)]]
    assert all(h.last_sent == 1.0 for h in chain.hops)
    # A pushed hop's result is checked against its predecessor's verified output, at its own step.
    expected = chain.pushed_step(chain.hops[2], plan.steps[1], chunks[0])
    assert (expected.session_id, expected.step, expected.position) == (chain.hops[2].session_id, 7, 5)


def test_prefill_is_refused_where_the_chain_cannot_push_end_to_end() -> None:
    chunks = [from_torch(X[:, :2]), from_torch(X[:, 2:])]
    assert make_chain(push=False).prefill(chunks, 0, 0.0) is None
    chain = make_chain()
    assert chain.prefill(chunks[:1], 0, 0.0) is None  # one chunk: nothing to pipeline
    chain.hops[2] = hop_state(2, 4, 6, addrs=False)
    assert chain.prefill(chunks, 0, 0.0) is None
    chain = make_chain()
    chain.prompts = torch.zeros(6, 1, 2, 8)
    assert chain.prefill(chunks, 0, 0.0) is None and chain.prefill(chunks, 2, 0.0) is not None


def test_an_abandoned_prefill_rolls_back_and_leaves_its_late_results_stale() -> None:
    chain = make_chain()
    run_through(chain.run(0, from_torch(X[:, :3]), 0))
    chunks = [from_torch(X[:, :2]), from_torch(X[:, 2:])]
    plan = chain.prefill(chunks, 3, 0.0)
    assert plan is not None
    first = chain.hops[0]
    chain.accept(first, plan.steps[0], answer(Expect(first, plan.steps[0])), 0.0)  # one chunk got through hop 0
    chain.abandon(plan)
    assert [h.position for h in chain.hops] == [3, 3, 3] and [h.step for h in chain.hops] == [3, 3, 3]
    late = answer(Expect(first, plan.steps[1]))
    assert Expect(first, chain.run(0, from_torch(X), 3).next(0.0).step).is_stale(late)
