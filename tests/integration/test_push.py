"""Daemon-to-daemon forwarding (`push`) with real daemons: exact output, multi-turn sessions,
recovery from a daemon killed mid-generation, and per-token time with push on vs off.

Three daemons (0:2 2:4 4:6) serve every test; one more for blocks 2:4 stands by as the
replacement for the kill test. Timings are printed (run with -s), never asserted.
"""
from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.ctl import metrics
from petals_client.localswarm import LocalSwarm
from petals_protocol.errors import ErrorCode
from petals_protocol.ids import INFERENCE_PROTOCOL
from petals_protocol.messages import (PUSH_LANDED_FROM, CloseSession, ErrorReply, InferenceStep, OpenSession,
                                      SessionOpened, StepResult)
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.models.span import load_span
from petals_protocol.tensors import to_torch
from petalsd.forwarding import PUSH_LANDED_WAIT
from petalsd.handlers import PUSH_OPEN_WAIT

from rawclient import RawClient, hidden_payload, new_id, receive, run_raw
from swarmlib import DAEMON_ARGS, make_model, start_swarm

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    # No eos token: greedy generation runs the full max_new_tokens.
    return make_model(tmp_path_factory.mktemp("models"), "llama", eos_token_id=None, bos_token_id=None,
                      pad_token_id=None)


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path)


@pytest.fixture(scope="module")
def swarm(model_path) -> Iterator[LocalSwarm]:
    swarm = start_swarm(model_path, ["0:2", "2:4", "4:6"])
    yield swarm
    for daemon in swarm.daemons:
        daemon.signal(signal.SIGKILL)
    swarm.stop()


def connect(path: Path, swarm: LocalSwarm, **options) -> AutoDistributedModelForCausalLM:
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs, **options)


def test_greedy_with_push_equals_local(model_path, local, swarm):
    expected = local.generate(PROMPT, max_new_tokens=24, do_sample=False)
    with connect(model_path, swarm) as model, model.inference_session(max_length=64) as session:
        out = model.generate(PROMPT, session=session, max_new_tokens=24, do_sample=False)
        assert [(h.start, h.end) for h in session.route] == [(0, 2), (2, 4), (4, 6)]
        inner = session._session
        assert inner.push  # never fell back
        # Every hop still got every input, chunk by chunk, for replay: the prompt, then one token each.
        assert [len(h.chunks) for h in inner.hops] == [24] * 3
        assert [h.position for h in inner.hops] == [PROMPT.shape[1] + 23] * 3
    assert out.tolist() == expected.tolist()


def test_multi_turn_session_with_push(model_path, local, swarm):
    turn2 = torch.tensor([[7, 7, 21]])
    with connect(model_path, swarm) as model, model.inference_session(max_length=64) as session:
        first = model.generate(PROMPT, session=session, max_new_tokens=8)
        second = model.generate(turn2, session=session, max_new_tokens=8)
        assert session.recoveries == 0
    ref1 = local.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert first.tolist() == ref1.tolist()
    ref2 = local.generate(torch.cat([ref1, turn2], dim=1), max_new_tokens=8, do_sample=False)
    assert second.tolist() == ref2[:, ref1.shape[1]:].tolist()


def test_rollback_with_push_matches_client_driven_hops(model_path, swarm):
    """A step at an earlier position crops every hop's cache, pushed hops included: the same
    steps give bit-identical outputs with push on and off."""
    outputs = []
    for push in (True, False):
        with connect(model_path, swarm, push=push) as model, model.inference_session(max_length=32) as session:
            hidden = model.client_part.embed(PROMPT)
            with torch.inference_mode():
                steps = [session.step(hidden), session.step(hidden[:, 5:], position=5),
                         session.step(hidden[:, :2], position=0)]
            assert [h.position for h in session._session.hops] == [2] * 3
            outputs.append(steps)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def _per_token_ms(model, tokens: int) -> float:
    stamps: list[float] = []

    class Stamp:
        def put(self, value: torch.Tensor) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    model.generate(PROMPT, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=Stamp())
    gaps = [b - a for a, b in zip(stamps[2:], stamps[3:])]  # after the first token (prefill excluded)
    return statistics.mean(gaps) * 1000


def test_per_token_time_push_on_vs_off(model_path, swarm):
    """Same swarm, same run, interleaved: push on vs off (printed; no timing is asserted)."""
    with connect(model_path, swarm, push=True) as pushing, connect(model_path, swarm, push=False) as driving:
        for model in (pushing, driving):
            _per_token_ms(model, 8)  # warm up streams and caches
        on, off = [], []
        for _ in range(3):
            on.append(_per_token_ms(pushing, 40))
            off.append(_per_token_ms(driving, 40))
        assert pushing.generate(PROMPT, max_new_tokens=16).tolist() == \
            driving.generate(PROMPT, max_new_tokens=16).tolist()
    print(f"\nper-token time over 3 daemons, tiny llama (hidden 64): push on {statistics.median(on):.2f} ms "
          f"({', '.join(f'{x:.2f}' for x in on)}), push off {statistics.median(off):.2f} ms "
          f"({', '.join(f'{x:.2f}' for x in off)})")


def test_pipelined_prefill_matches_one_pass(model_path, local, swarm):
    """`prefill_chunk`: a long prompt sent in chunks, pipelined along the pushing daemons, gives
    the tokens of one pass and logits within float rounding of it (the difference is printed)."""
    prompt = torch.randint(0, local.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    with connect(model_path, swarm, prefill_chunk=8) as chunked, connect(model_path, swarm) as whole:
        logits = []
        for model in (chunked, whole):
            with model.inference_session(max_length=64) as session, torch.inference_mode():
                logits.append(model.client_part.logits(session.step(model.client_part.embed(prompt))))
                inner = session._session
                assert inner.push and session.recoveries == 0
                chunks = [[c.shape[1] for c in h.chunks] for h in inner.hops]
                assert chunks == ([[8] * 5] * 3 if model is chunked else [[40]] * 3)
        diff = float((logits[0] - logits[1]).abs().max())
        print(f"\npipelined prefill, 40 tokens in chunks of 8 over 3 daemons: logits max abs diff vs one pass "
              f"{diff:.3g} (max abs logit {float(logits[1].abs().max()):.3g})")
        assert diff < 1e-4
        expected = local.generate(prompt, max_new_tokens=12, do_sample=False)
        assert chunked.generate(prompt, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()


LONG_PROMPT = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(7))  # 75 KiB of hidden states


def _landed(swarm: LocalSwarm) -> list[float]:
    return [metrics(str(swarm.workdir / f"{d.name}.sock"))["petalsd_pushes_landed_total"] for d in swarm.daemons]


def test_a_prefill_is_answered_once_its_push_has_landed(model_path, local, swarm):
    """A pushed prefill (hidden states of PUSH_LANDED_FROM bytes or more) is confirmed by the next
    daemon (PushLanded) before the pusher answers its client; decode steps are not."""
    assert LONG_PROMPT.shape[1] * 64 * 4 >= PUSH_LANDED_FROM
    before = _landed(swarm)
    expected = local.generate(LONG_PROMPT, max_new_tokens=6, do_sample=False)
    with connect(model_path, swarm) as model:
        assert model.generate(LONG_PROMPT, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
    landed = [b - a for a, b in zip(before, _landed(swarm))]
    assert landed == [1, 1, 0], landed  # the two pushing daemons, once each: the prompt's step


def test_a_prefill_push_never_confirmed_is_answered_after_the_wait(model_path, local, tmp_path):
    """The next daemon never confirms (an older release, a lost answer): the pusher answers its
    client after PUSH_LANDED_WAIT anyway, and the generation is exact."""
    swarm = LocalSwarm(model_path, workdir=tmp_path, extra_args=DAEMON_ARGS)
    try:
        first = swarm.start("0:3")
        swarm.start("3:6", launcher=[str(Path(__file__).with_name("mute_landing_daemon.py"))])
        expected = local.generate(LONG_PROMPT, max_new_tokens=4, do_sample=False)
        with connect(model_path, swarm) as model, model.inference_session(max_length=320) as session:
            began = time.monotonic()
            out = model.generate(LONG_PROMPT, session=session, max_new_tokens=4, do_sample=False)
            took = time.monotonic() - began
            assert session._session.push and session.recoveries == 0
        assert out.tolist() == expected.tolist()
        assert took >= PUSH_LANDED_WAIT  # the first hop's answer waited for a confirmation that never came
        assert _landed(swarm) == [0, 0]
        assert first.process.poll() is None
    finally:
        swarm.stop()


# Last: it kills a daemon of the module's swarm.
def test_daemon_killed_mid_generation_with_push(model_path, local, swarm):
    swarm.start("2:4", initial_peers=swarm.addrs[:1], wait=True)  # the stand-by for the middle hop
    new_tokens = 60
    expected = local.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False)
    with connect(model_path, swarm, step_timeout=2.0, connect_timeout=3.0, max_retries=3) as model, \
            model.inference_session(max_length=PROMPT.shape[1] + new_tokens) as session:
        middle = session.route[1].server.peer_id
        victim = next(d for d in swarm.daemons if d.peer_id == middle)
        produced: list[float] = []

        class KillAt:
            def put(self, value: torch.Tensor) -> None:
                produced.append(time.perf_counter())
                if len(produced) == 21:
                    victim.signal(signal.SIGKILL)

            def end(self) -> None:
                pass

        out = model.generate(PROMPT, session=session, max_new_tokens=new_tokens, do_sample=False,
                             streamer=KillAt())
        assert session.recoveries == 1
        assert model.swarm.banned() == {middle}
        standby = {d.peer_id for d in swarm.daemons if "2:4" in " ".join(d.args)} - {middle}
        assert session.route[1].server.peer_id in standby
        assert session._session.push  # a closed stream is not a reason to stop pushing
    assert out.tolist() == expected.tolist()


def test_a_push_that_overtakes_its_sessions_open_waits_for_it(model_path, swarm):
    """Clients send OpenSession to every hop and their first step right behind the first hop's, so
    a push may reach a daemon before the session's open: it waits for it (PUSH_OPEN_WAIT) and runs
    exactly; a push for a session that never opens, or whose open is refused, gets UNKNOWN_SESSION
    and the push stream goes on serving."""
    fingerprint = model_fingerprint(model_path)
    middle = next(d for d in swarm.daemons if d.process.poll() is None and d.blocks == "2:4")
    chunks = [hidden_payload(1, 3, 64, seed=1), hidden_payload(1, 1, 64, seed=2)]
    span = load_span(model_path, 2, 4, dtype=torch.float32)
    cache = span.new_cache(1, 16)
    with torch.inference_mode():
        expected = [span.forward(to_torch(chunk), cache) for chunk in chunks]

    def open_msg(max_length: int = 16) -> OpenSession:
        return OpenSession(session_id=new_id(), model_fingerprint=fingerprint, start_block=2, end_block=4,
                           max_length=max_length, batch_size=1)

    def step(session_id: bytes, index: int, position: int) -> InferenceStep:
        return InferenceStep(session_id=session_id, step=index, position=position, hidden=chunks[index], hypo_ids=None)

    async def body(client: RawClient) -> None:
        addr = middle.addrs[0]
        opened = open_msg()
        pusher = await client.open(addr, INFERENCE_PROTOCOL)
        await pusher.send(step(opened.session_id, 0, 0))  # the push stream's first message, before the open
        await trio.sleep(0.3)
        owner = await client.open(addr, INFERENCE_PROTOCOL)
        await owner.send(opened)
        assert isinstance(await receive(owner), SessionOpened)
        result = await receive(owner)  # the pushed step is answered to the session's owner
        assert isinstance(result, StepResult) and result.step == 0
        assert torch.equal(to_torch(result.hidden), expected[0])

        began = time.monotonic()
        await pusher.send(step(new_id(), 1, 3))  # a session that never opens
        reply = await receive(pusher)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNKNOWN_SESSION, reply
        assert time.monotonic() - began >= PUSH_OPEN_WAIT - 0.1

        refused = open_msg(max_length=10**9)
        began = time.monotonic()
        await pusher.send(step(refused.session_id, 1, 3))
        await trio.sleep(0.2)
        other = await client.open(addr, INFERENCE_PROTOCOL)
        await other.send(refused)
        assert (await receive(other)).code == ErrorCode.TOO_LONG
        reply = await receive(pusher)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNKNOWN_SESSION, reply
        assert time.monotonic() - began < PUSH_OPEN_WAIT  # the refusal ended the wait

        await pusher.send(step(opened.session_id, 1, 3))  # the push stream still serves the open session
        result = await receive(owner)
        assert isinstance(result, StepResult) and result.step == 1
        assert torch.equal(to_torch(result.hidden), expected[1])
        await owner.send(CloseSession(session_id=opened.session_id))

    run_raw(body)
