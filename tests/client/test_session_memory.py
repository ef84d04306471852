"""The session's trio layer (client/session.py) against scripted in-memory daemons: real
InferenceSession, real routing, signatures and push, but channels are trio memory channels and
time is trio's MockClock (a hung daemon's timeout and the backoff pass at once). No processes,
no network, no sleeps.

Each fake daemon keeps a per-block cache and computes a function of everything cached, so a
replacement that was replayed wrongly (wrong chunks, positions or order) gives other outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petals_client.routing import Hop, ServerInfo
from petals_client.session import InferenceSession, SessionFailed
from petals_protocol.errors import ErrorCode, RemoteError
from petals_protocol.messages import CloseSession, InferenceStep, OpenSession, SessionOpened, StepResult, error_reply
from petals_protocol.p2p.streams import StreamClosed
from petals_protocol.signing import inference_binding, peer_id_from_private_key, peer_id_to_text, sign_response
from petals_protocol.tensors import from_torch, to_torch

FINGERPRINT = "ef" * 32
HIDDEN = 8


def block(b: int, cache: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `b` on `x` after `cache` (its earlier inputs): the new cache and the output."""
    full = torch.cat([cache, x], dim=1)
    return full, x + 0.01 * (b + 1) * full.cumsum(1)[:, -x.shape[1]:]


class Reference:
    """The whole model in one place, with caches: what every step must return."""

    def __init__(self, blocks: int) -> None:
        self.caches = [torch.zeros(1, 0, HIDDEN) for _ in range(blocks)]

    def step(self, x: torch.Tensor, position: int) -> torch.Tensor:
        for b, cache in enumerate(self.caches):
            self.caches[b], x = block(b, cache[:, :position], x)
        return x


@dataclass
class FakeSession:
    channel: FakeChannel
    start: int
    end: int
    caches: list[torch.Tensor]


@dataclass(eq=False)
class FakeDaemon:
    swarm: FakeSwarm
    start: int
    end: int
    rtt: float
    mode: str = "ok"  # ok | dead | hung (never answers) | liar (signs with another key) | full (refuses opens)
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    sessions: dict[bytes, FakeSession] = field(default_factory=dict)
    channels: list[FakeChannel] = field(default_factory=list)
    steps_from_client: int = 0  # InferenceSteps the client sent this daemon itself
    steps_pushed: int = 0  # InferenceSteps another daemon pushed to it
    hold: int = 0  # hold the client's steps until this many have come, then run them in order
    held: list[tuple[InferenceStep, FakeChannel]] = field(default_factory=list)

    @property
    def peer(self) -> bytes:
        return peer_id_from_private_key(self.key)

    @property
    def peer_id(self) -> str:
        return peer_id_to_text(self.peer)

    @property
    def info(self) -> ServerInfo:
        return ServerInfo(peer_id=self.peer_id, addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{self.peer_id}",),
                          start=self.start, end=self.end, rtt=self.rtt, cache_tokens_free=10**6)

    def kill(self) -> None:
        self.mode = "dead"
        for channel in self.channels:
            channel.replies_in.close()

    async def handle(self, msg: object, channel: FakeChannel | None) -> None:
        if self.mode == "dead":
            return  # a push to a dead daemon is lost (its pusher's own reply is not affected)
        if isinstance(msg, OpenSession) and self.mode == "full":
            assert channel is not None
            await channel.replies_in.send(error_reply(ErrorCode.BUSY, "no room", session_id=msg.session_id))
        elif isinstance(msg, InferenceStep) and msg.session_id not in self.sessions:
            if channel is None:
                self.steps_pushed += 1  # (answered to its pusher, which does not listen here)
            else:
                self.steps_from_client += 1
                await channel.replies_in.send(error_reply(ErrorCode.UNKNOWN_SESSION, "no such session",
                                                          session_id=msg.session_id))
        elif isinstance(msg, OpenSession):
            assert channel is not None
            self.sessions[msg.session_id] = FakeSession(channel, msg.start_block, msg.end_block,
                                                        [torch.zeros(1, 0, HIDDEN)] * (msg.end_block - msg.start_block))
            await channel.replies_in.send(SessionOpened(session_id=msg.session_id, max_length=msg.max_length))
        elif isinstance(msg, CloseSession):
            self.sessions.pop(msg.session_id, None)
        elif isinstance(msg, InferenceStep):
            if channel is None:
                self.steps_pushed += 1
            else:
                self.steps_from_client += 1
            if self.mode == "hung":
                return
            if channel is not None and self.hold:
                self.held.append((msg, channel))
                if len(self.held) < self.hold:
                    return
                self.hold, held, self.held = 0, self.held, []
                for step, _ in held:
                    await self._step(step)
                return
            await self._step(msg)

    async def _step(self, msg: InferenceStep) -> None:
        session = self.sessions[msg.session_id]
        x = to_torch(msg.hidden)
        for i, b in enumerate(range(session.start, session.end)):
            session.caches[i], x = block(b, session.caches[i][:, :msg.position], x)
        output = from_torch(x)
        signer = Ed25519PrivateKey.generate() if self.mode == "liar" else self.key
        binding = inference_binding(msg, start_block=session.start, end_block=session.end,
                                    model_fingerprint=FINGERPRINT, output=output)
        await session.channel.replies_in.send(StepResult(
            session_id=msg.session_id, step=msg.step, position=msg.position, hidden=output,
            signature=sign_response(signer, binding)))
        if msg.push:  # forward the output to the next daemon, as petalsd does
            target, rest = msg.push[0], msg.push[1:]
            await self.swarm.by_peer(target.peer_id).handle(InferenceStep(
                session_id=target.session_id, step=target.step, position=msg.position, hidden=output,
                hypo_ids=None, push=rest or None), None)


class FakeChannel:
    """One client stream to a fake daemon (the `Channel` protocol)."""

    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        self.peer_id = daemon.peer_id
        self.replies_in, self.replies_out = trio.open_memory_channel[object](math.inf)
        daemon.channels.append(self)

    async def send(self, msg: object) -> None:
        await trio.lowlevel.checkpoint()
        if self.daemon.mode == "dead":
            raise StreamClosed(self.peer_id, None, "connection reset")
        await self.daemon.handle(msg, self)

    async def receive(self) -> object:
        try:
            return await self.replies_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StreamClosed(self.peer_id, None, "connection reset") from None

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@dataclass
class FakeSwarm:
    """The `Swarm` protocol over fake daemons."""

    daemons: list[FakeDaemon] = field(default_factory=list)
    model_fingerprint: str = FINGERPRINT
    step_timeout: float = 5.0
    max_retries: int = 3
    bans: list[str] = field(default_factory=list)
    refreshes: int = 0

    def add(self, start: int, end: int, rtt: float = 0.001) -> FakeDaemon:
        daemon = FakeDaemon(self, start, end, rtt)
        self.daemons.append(daemon)
        return daemon

    def by_peer(self, peer: bytes) -> FakeDaemon:
        return next(d for d in self.daemons if d.peer == peer)

    def servers(self) -> list[ServerInfo]:
        return [d.info for d in self.daemons]

    async def refresh(self) -> None:
        self.refreshes += 1

    def ban(self, peer_id: str) -> None:
        self.bans.append(peer_id)

    def banned(self) -> frozenset[str]:
        return frozenset(self.bans)

    def route_restrictions(self) -> str:
        return ""

    async def open_inference(self, hop: Hop) -> FakeChannel:
        await trio.lowlevel.checkpoint()
        daemon = next(d for d in self.daemons if d.peer_id == hop.server.peer_id)
        if daemon.mode == "dead":
            raise StreamClosed(daemon.peer_id, None, "connection refused")
        return FakeChannel(daemon)


def three_daemons(standby: bool = True) -> tuple[FakeSwarm, list[FakeDaemon], FakeDaemon | None]:
    swarm = FakeSwarm()
    chain = [swarm.add(0, 2), swarm.add(2, 4), swarm.add(4, 6)]
    spare = swarm.add(2, 4, rtt=0.5) if standby else None  # slower: chosen only as a replacement
    return swarm, chain, spare


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def run(swarm: FakeSwarm, script) -> None:
    """`script(session, reference)` on a session over blocks 0:6, opened and closed around it,
    in virtual time."""
    async def main() -> None:
        session = InferenceSession(swarm, 0, 6, max_length=32)
        await session.open()
        try:
            await script(session, Reference(6))
        finally:
            await session.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def steps_match(session: InferenceSession, reference: Reference, plan: list[tuple[int, int | None]]) -> None:
    """Run steps of `plan` (tokens, position or None) and compare each with the reference."""
    for seed, (n, position) in enumerate(plan):
        x = tokens(n, seed)
        expected = reference.step(x, session.position if position is None else position)
        got = await session.step(x, position)
        assert torch.allclose(got, expected, atol=1e-6), (seed, (got - expected).abs().max())


def test_push_through_three_daemons_sends_each_step_once_and_rolls_back() -> None:
    swarm, chain, _ = three_daemons(standby=False)

    async def script(session: InferenceSession, reference: Reference) -> None:
        await steps_match(session, reference, [(5, None), (1, None), (1, None), (2, 3), (1, None)])
        assert session.position == 6 and session.push and session.recoveries == 0
        # The prompt trimmed to the 3 tokens the rollback kept, then the two steps after it.
        assert [[c.shape[1] for c in h.chunks] for h in session.hops] == [[3, 2, 1]] * 3

    run(swarm, script)
    assert [d.steps_from_client for d in chain] == [5, 0, 0]  # the client sent every step to the first hop only
    assert [d.steps_pushed for d in chain] == [0, 5, 5]
    assert all(not d.sessions for d in chain)  # closed


def test_a_refused_first_open_fails_the_first_step_with_the_daemons_error() -> None:
    """Opens are not waited for: a refusal (here: busy) is read in front of the hop's first result
    and raised as the daemon's error, as a waited-for open raised it; nobody is banned, nothing is
    rerouted, and the session stays failed."""
    swarm, chain, _spare = three_daemons()
    chain[1].mode = "full"

    async def script(session: InferenceSession, reference: Reference) -> None:
        assert [h.server.peer_id for h in session.route] == [d.peer_id for d in chain]  # opened without waiting
        with pytest.raises(RemoteError) as refused:
            await session.step(tokens(5, 0))
        assert refused.value.code is ErrorCode.BUSY and refused.value.peer == chain[1].peer_id
        with pytest.raises(RemoteError) as again:
            await session.step(tokens(1, 1))
        assert again.value is refused.value
        assert session.recoveries == 0

    run(swarm, script)
    assert swarm.bans == []
    assert chain[0].steps_from_client == 1 and chain[1].steps_pushed == 1 and chain[1].steps_from_client == 0


def test_a_killed_daemon_is_banned_and_its_blocks_replayed_on_another() -> None:
    swarm, chain, spare = three_daemons()

    async def script(session: InferenceSession, reference: Reference) -> None:
        await steps_match(session, reference, [(5, None), (1, None), (1, None)])
        chain[1].kill()
        await steps_match(session, reference, [(1, None), (1, None)])
        assert session.recoveries == 1 and session.push  # a closed stream is no reason to stop pushing
        assert [h.server.peer_id for h in session.route] == [chain[0].peer_id, spare.peer_id, chain[2].peer_id]

    run(swarm, script)
    assert swarm.bans == [chain[1].peer_id]
    assert spare.steps_from_client == 4  # the three remembered chunks replayed, then the failed step resent


def test_a_hung_pushed_hop_times_out_turns_push_off_and_is_replaced() -> None:
    swarm, chain, spare = three_daemons()

    async def script(session: InferenceSession, reference: Reference) -> None:
        await steps_match(session, reference, [(5, None), (1, None)])
        chain[1].mode = "hung"
        began = trio.current_time()
        await steps_match(session, reference, [(1, None), (1, None)])
        assert trio.current_time() - began >= swarm.step_timeout  # it waited for the hung hop
        assert session.recoveries == 1 and not session.push
        assert session.route[1].server.peer_id == spare.peer_id

    run(swarm, script)
    assert swarm.bans == [chain[1].peer_id]
    assert chain[2].steps_from_client == 2  # push off: the client drove the last hop itself


def test_a_lying_pushed_hop_gets_the_step_directly_then_is_replaced() -> None:
    swarm, chain, spare = three_daemons()

    async def script(session: InferenceSession, reference: Reference) -> None:
        await steps_match(session, reference, [(5, None)])
        chain[1].mode = "liar"
        await steps_match(session, reference, [(1, None), (1, None)])
        assert session.recoveries == 1 and session.push
        assert session.route[1].server.peer_id == spare.peer_id

    run(swarm, script)
    assert chain[1].steps_from_client == 1  # resent once directly (nobody blamed for the pushed one)
    assert swarm.bans == [chain[1].peer_id]


def test_no_replacement_fails_naming_the_blocks_after_the_retries() -> None:
    swarm, chain, _ = three_daemons(standby=False)

    async def script(session: InferenceSession, reference: Reference) -> None:
        await session.step(tokens(3, 0))
        chain[2].kill()
        with pytest.raises(SessionFailed) as failed:
            await session.step(tokens(1, 1))
        assert failed.value.blocks == (4, 6)

    run(swarm, script)
    assert swarm.refreshes == swarm.max_retries  # each attempt found no route and re-learned the swarm


def test_a_replacement_that_hangs_in_its_replay_is_banned_and_the_next_one_used() -> None:
    swarm, chain, spare = three_daemons()
    second = swarm.add(2, 4, rtt=0.9)  # the next best replacement
    spare.mode = "hung"

    async def script(session: InferenceSession, reference: Reference) -> None:
        await steps_match(session, reference, [(5, None), (1, None)])
        chain[1].kill()
        await steps_match(session, reference, [(1, None), (1, None)])
        assert session.recoveries == 1
        assert session.route[1].server.peer_id == second.peer_id

    run(swarm, script)
    assert swarm.bans == [chain[1].peer_id, spare.peer_id]
    assert second.steps_from_client == 3  # two chunks replayed, then the failed step


def test_pipelined_prefill_sends_every_chunk_before_any_result_and_matches() -> None:
    swarm, chain, _ = three_daemons(standby=False)
    chain[0].hold = 3  # answers nothing before the third chunk came: a client waiting for results would time out

    async def script(session: InferenceSession, reference: Reference) -> None:
        session.prefill_chunk = 4
        await steps_match(session, reference, [(10, None), (1, None)])
        assert trio.current_time() == 0.0  # no timeout, no fallback
        assert [[c.shape[1] for c in h.chunks] for h in session.hops] == [[4, 4, 2, 1]] * 3

    run(swarm, script)
    assert [d.steps_from_client for d in chain] == [4, 0, 0]  # every chunk went to the first hop only
    assert [d.steps_pushed for d in chain] == [0, 4, 4]


def test_a_pipelined_prefill_that_fails_runs_the_prompt_as_one_step_with_recovery() -> None:
    swarm, chain, spare = three_daemons()

    async def script(session: InferenceSession, reference: Reference) -> None:
        session.prefill_chunk = 4
        chain[1].kill()
        await steps_match(session, reference, [(10, None), (1, None)])
        assert session.recoveries == 1 and session.route[1].server.peer_id == spare.peer_id
        assert [[c.shape[1] for c in h.chunks] for h in session.hops] == [[10, 1]] * 3

    run(swarm, script)
    assert chain[0].steps_from_client == 3 + 2  # the chunks, then the prompt and the token as usual
