"""SpotChecker's decisions with scripted daemons (no network): who is flagged, what is reported,
when a step goes unchecked, and that a daemon refusing a request it cannot take is not banned.
The end-to-end behaviour with real daemons is in tests/integration/test_spot_checks.py."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import petals_client.spotcheck as spotcheck
from petals_client.routing import Hop, ServerInfo
from petals_client.session import WrongOutput
from petals_client.spotcheck import SpotChecker, SpotCheckUnavailable
from petals_protocol.errors import ErrorCode, RemoteError
from petals_protocol.evidence import decode_report, encode_report
from petals_protocol.messages import ForwardRequest, ForwardResponse
from petals_protocol.signing import forward_binding, peer_id_from_private_key, peer_id_to_text, sign_response
from petals_protocol.tensors import from_torch, to_torch

FINGERPRINT = "ab" * 32
HISTORY = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(3))


def honest(history: torch.Tensor) -> torch.Tensor:
    return history * 2 + 1  # any fixed function of the input stands for the blocks


def lying(history: torch.Tensor) -> torch.Tensor:
    return honest(history) * 1.01


@dataclass
class Daemon:
    compute: Callable[[torch.Tensor], torch.Tensor] | None  # None: refuses as too long
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def peer_id(self) -> str:
        return peer_id_to_text(peer_id_from_private_key(self.key))


@dataclass
class FakeSwarm:
    daemons: list[Daemon]
    model_fingerprint: str = FINGERPRINT
    bans: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def servers(self) -> list[ServerInfo]:
        return [ServerInfo(peer_id=d.peer_id, addrs=(), start=0, end=4, rtt=0.001 * i)
                for i, d in enumerate(self.daemons) if d.peer_id not in self.flags]

    def banned(self) -> frozenset[str]:
        return frozenset(self.bans)

    def ban(self, peer_id: str) -> None:
        self.bans.append(peer_id)

    def flag(self, peer_id: str) -> None:
        self.flags.append(peer_id)


@pytest.fixture
def forward(monkeypatch):
    """signed_forward answered by the scripted daemons, signed with their keys."""

    async def fake(swarm: FakeSwarm, hop: Hop, hidden, *, prompts=None, adapter=None) -> ForwardResponse:
        daemon = next(d for d in swarm.daemons if d.peer_id == hop.server.peer_id)
        if daemon.compute is None:
            raise RemoteError(ErrorCode.TOO_LONG, "too long", daemon.peer_id)
        request = ForwardRequest(request_id=bytes(range(16)), model_fingerprint=swarm.model_fingerprint,
                                 start_block=hop.start, end_block=hop.end, hidden=hidden)
        out = from_torch(daemon.compute(to_torch(hidden)))
        return ForwardResponse(request_id=request.request_id, hidden=out,
                               signature=sign_response(daemon.key, forward_binding(request, out)))

    monkeypatch.setattr(spotcheck, "signed_forward", fake)


def check(checker: SpotChecker, hop_daemon: Daemon, output: torch.Tensor) -> None:
    hop = next(Hop(s, 0, 4) for s in checker.swarm.servers() if s.peer_id == hop_daemon.peer_id)
    trio.run(checker.check, hop, HISTORY, output[:, -1:])


def make(*computes) -> tuple[FakeSwarm, SpotChecker, list[Daemon]]:
    daemons = [Daemon(c) for c in computes]
    swarm = FakeSwarm(daemons)
    return swarm, SpotChecker(swarm, 1.0, signer=Ed25519PrivateKey.generate()), daemons


def test_an_honest_answer_passes(forward):
    swarm, checker, (hop, other) = make(honest, honest)
    check(checker, hop, honest(HISTORY))
    assert checker.stats.checked == 1 and checker.stats.disagreements == 0 and not swarm.flags


def test_a_wrong_hop_is_flagged_and_proven(forward):
    swarm, checker, (hop, w1, w2) = make(lying, honest, honest)
    with pytest.raises(WrongOutput):
        check(checker, hop, lying(HISTORY))
    assert swarm.flags == [hop.peer_id] and not swarm.bans
    [report] = checker.reports
    blob = encode_report(checker.signer, report)
    assert decode_report(blob, now=time.time()).accused_text == hop.peer_id
    assert {w.peer_id_text for w in report.witnesses} == {w1.peer_id, w2.peer_id}


def test_a_wrong_checker_is_flagged_and_the_hop_stands(forward):
    swarm, checker, (hop, liar, decider) = make(honest, lying, honest)  # the liar is the cheapest checker
    check(checker, hop, honest(HISTORY))
    assert swarm.flags == [liar.peer_id]
    [report] = checker.reports
    assert report.accused_text == liar.peer_id
    assert {w.peer_id_text for w in report.witnesses} == {hop.peer_id, decider.peer_id}


def test_without_a_third_daemon_both_are_flagged_and_nothing_is_reported(forward):
    swarm, checker, (hop, other) = make(lying, honest)
    with pytest.raises(WrongOutput):
        check(checker, hop, lying(HISTORY))
    assert set(swarm.flags) == {hop.peer_id, other.peer_id} and checker.reports == []


def test_three_different_answers_flag_hop_and_checker(forward):
    swarm, checker, (hop, other, third) = make(lying, lambda h: honest(h) * 0.9, honest)
    with pytest.raises(WrongOutput):
        check(checker, hop, lying(HISTORY))
    assert set(swarm.flags) == {hop.peer_id, other.peer_id} and checker.reports == []


def test_no_independent_daemon(forward):
    swarm, checker, (hop,) = make(honest)
    with pytest.raises(SpotCheckUnavailable, match="blocks 0:4"):
        check(checker, hop, honest(HISTORY))
    checker.rate = 0.5  # below 1 the step just goes unchecked
    check(checker, hop, honest(HISTORY))
    assert checker.stats.unchecked == 2 and checker.stats.checked == 0


def test_a_daemon_that_refuses_the_length_is_skipped_not_banned(forward):
    swarm, checker, (hop, refuses, other) = make(honest, None, honest)
    check(checker, hop, honest(HISTORY))
    assert checker.stats.checked == 1 and swarm.bans == [] and swarm.flags == []


def test_the_rate_is_the_fraction_chosen():
    swarm, _, _ = make(honest)
    checker = SpotChecker(swarm, 0.1, rng=random.Random(7))
    chosen = sum(checker.choose() for _ in range(10_000))
    assert checker.stats.steps == 10_000 and 900 < chosen < 1100
    assert all(SpotChecker(swarm, 1.0).choose() for _ in range(100))
    assert not any(SpotChecker(swarm, 0.0).choose() for _ in range(100))
    with pytest.raises(ValueError):
        SpotChecker(swarm, 1.5)
