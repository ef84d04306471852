"""Spot checks and evidence end to end, with real daemons: one of them alters its outputs while it
announces the honest model and signs every answer normally (tests/integration/lying_daemon.py).

- spot_check_rate=1.0: the client catches the liar at the first step it checks, flags it, publishes
  a report in the DHT, replays on honest daemons, and the tokens equal local transformers';
- a second client reads the report, verifies it and never uses the liar;
- a forged report (a tampered answer in it) is refused by every daemon's DHT and ignored by clients;
- spot_check_rate=0.1: the measured fraction of hop-steps checked, cross-checked against the
  forward requests the daemons counted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.localswarm import DaemonProcess, LocalSwarm
from libp2p.records.record import make_signed_put_record

from petals_client.remote import signed_forward
from petals_client.routing import Hop
from petals_client.spotcheck import CheckedInputs, SpotChecker
from petals_client.swarm_table import show_swarm
from petals_protocol.errors import BadRecord
from petals_protocol.evidence import MAX_EVIDENCE_TTL, EvidenceReport, SignedOutput, decode_report, encode_report, evidence_key
from petals_protocol.p2p import compat
from petals_protocol.p2p.identity import ed25519_private_key, ephemeral_identity
from petals_protocol.signing import ResponseBinding, peer_id_from_private_key, peer_id_from_text, sign_response
from petals_protocol.tensors import from_torch, to_torch

from swarmlib import DAEMON_ARGS, daemon_counters, make_endless_model

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])
LYING_DAEMON = Path(__file__).with_name("lying_daemon.py")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_endless_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path)


@pytest.fixture(scope="module")
def swarm(model_path):
    """Two honest daemons and a liar, each serving every block; the liar claims a huge throughput,
    so routing prefers it."""
    swarm = LocalSwarm(model_path, extra_args=DAEMON_ARGS)
    try:
        swarm.start("0:6", name="honest1", args=["--throughput", "1"])
        swarm.start("0:6", name="liar", args=["--throughput", "1000"], launcher=[str(LYING_DAEMON)], wait=False)
        swarm.start("0:6", name="honest2", args=["--throughput", "1"], wait=False)
        swarm.wait_all()  # the two that join through honest1 start together
        yield swarm
    finally:
        swarm.stop()


def daemon(swarm: LocalSwarm, name: str) -> DaemonProcess:
    return next(d for d in swarm.daemons if d.name == name)


def test_liar_is_caught_reported_and_avoided(swarm, model_path, local):
    liar = daemon(swarm, "liar").peer_id
    honest = {daemon(swarm, "honest1").peer_id, daemon(swarm, "honest2").peer_id}
    reference = local.generate(PROMPT, max_new_tokens=12, do_sample=False)
    emitted: list[list[int]] = []

    class Collect:
        def put(self, value: torch.Tensor) -> None:
            emitted.append(value.flatten().tolist())

        def end(self) -> None:
            pass

    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs[:1],
                                                         spot_check_rate=1.0) as model:
        with model.inference_session(max_length=32) as session:
            assert [h.server.peer_id for h in session.route] == [liar]  # the liar is chosen first
            out = model.generate(PROMPT, session=session, max_new_tokens=12, do_sample=False, streamer=Collect())
            assert session.recoveries == 1
            assert {h.server.peer_id for h in session.route} <= honest
        stats = model.spot_checks
        assert stats is not None
        assert stats.first_disagreement_at == 1  # the very first check (the prompt's step) caught it
        assert stats.flagged == [liar]
        assert stats.published == 1
        assert liar in model.swarm.flagged()
        [report] = model.spot_checker.reports
        assert report.accused_text == liar
        assert {w.peer_id_text for w in report.witnesses} == honest
    # Every token equals local transformers', streamed ones included: none came from the liar's numbers.
    assert out.tolist() == reference.tolist()
    assert sum(emitted, []) == reference[0].tolist()

    # A second client, without spot checks, reads the report, verifies it and never uses the liar.
    before = daemon_counters(swarm, daemon(swarm, "liar"))
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs[:1]) as second:
        assert liar in second.swarm.evidence
        assert liar in second.swarm.flagged()
        assert liar not in {s.peer_id for s in second.swarm.servers()}
        out2 = second.generate(PROMPT, max_new_tokens=12, do_sample=False)
    assert out2.tolist() == reference.tolist()
    assert daemon_counters(swarm, daemon(swarm, "liar")) == before  # not a single request reached it

    # `petals swarm` lists the liar as flagged, with the report's witnesses.
    text, document = io.StringIO(), io.StringIO()
    show_swarm(model_path, swarm.addrs[:1], out=text)
    show_swarm(model_path, swarm.addrs[:1], as_json=True, out=document)
    assert f"FLAGGED: …{liar[-8:]} answered blocks 0:6 wrong" in text.getvalue()
    [flagged] = json.loads(document.getvalue())["flagged"]
    assert flagged["peer_id"] == liar and set(flagged["witnesses"]) == honest


def test_forged_report_is_refused_and_ignored(swarm, model_path):
    """Reports against an honest daemon that prove nothing: one with an altered number in the
    daemon's answer (its signature fails), one whose answers are all genuine (they agree). The
    reporter's signature and a forger-run witness's signature are fine. Every daemon's DHT refuses
    to store them, and a client that reads the DHT does not flag the daemon."""
    victim, other = daemon(swarm, "honest1").peer_id, daemon(swarm, "honest2").peer_id
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs[:1],
                                                         blocked_peers=[daemon(swarm, "liar").peer_id]) as model:
        servers = {s.peer_id: s for s in model.swarm.servers()}
        history = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
        answers = {peer: model.runtime.call(signed_forward, model.swarm, Hop(servers[peer], 0, 6), from_torch(history))
                   for peer in (victim, other)}
        fingerprint = model.swarm.model_fingerprint
        digest = CheckedInputs(history).digest(Hop(servers[victim], 0, 6), fingerprint)

        def signed(peer: str) -> SignedOutput:
            reply = answers[peer]
            return SignedOutput(peer_id_from_text(peer), reply.request_id, reply.hidden, reply.signature)

        # The forger runs a "daemon" of its own, which signs whatever it is told to.
        puppet = ed25519_private_key(ephemeral_identity())
        request_id = os.urandom(16)
        puppet_answer = SignedOutput(peer_id_from_private_key(puppet), request_id, answers[other].hidden, sign_response(
            puppet, ResponseBinding("forward", request_id, 0, 0, 0, 6, fingerprint, digest,
                                    answers[other].hidden.digest())))
        altered = dataclasses.replace(signed(victim), output=from_torch(to_torch(answers[victim].hidden) * 1.01))
        reporter = ed25519_private_key(ephemeral_identity())
        forgeries = [
            EvidenceReport(fingerprint, 0, 6, digest, accused, (signed(other), puppet_answer),
                           peer_id_from_private_key(reporter), time.time() + 600)
            for accused in (altered, signed(victim))
        ]
        dht = model.swarm.discovery.dht
        dht_key = evidence_key(fingerprint, victim).encode()
        for forged in forgeries:
            blob = encode_report(reporter, forged)
            with pytest.raises(BadRecord):
                decode_report(blob, now=time.time())

            async def push_everywhere(blob: bytes = blob) -> list[bytes | None]:
                held = []
                for peer in dht.host.get_connected_peers():
                    with contextlib.suppress(Exception):  # a refusal may reset the stream
                        await compat.store_at_peer(dht, peer, dht_key, blob,
                                                   make_signed_put_record(dht_key, blob, dht.host.get_private_key()))
                    held.append(await compat.get_from_peer(dht, peer, dht_key))
                return held

            held = model.runtime.call(push_everywhere)
            assert len(held) >= 2 and held == [None] * len(held)  # no daemon stored it
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs[:1]) as reader:
        assert victim not in reader.swarm.evidence
        assert victim in {s.peer_id for s in reader.swarm.servers()}


def test_measured_fraction_of_checked_steps(swarm, model_path):
    liar = daemon(swarm, "liar").peer_id
    honest = [d for d in swarm.daemons if d.name != "liar"]
    before = {d.name: daemon_counters(swarm, d).get("forward", 0.0) for d in honest}
    new_tokens = 80
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs[:1],
                                                         spot_check_rate=0.1, blocked_peers=[liar]) as model:
        model.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False)
        stats = model.spot_checks
    assert stats is not None
    forwards = sum(daemon_counters(swarm, d).get("forward", 0.0) - before[d.name] for d in honest)
    print(f"\nspot_check_rate=0.1: {stats.checked} of {stats.steps} hop-steps checked "
          f"(fraction {stats.fraction:.3f}); daemons counted {forwards:.0f} forward requests")
    assert stats.steps == new_tokens  # one hop: one check decision per step (prompt + 79 decode steps)
    assert stats.disagreements == 0 and stats.unchecked == 0
    assert forwards == stats.checked  # each check is one forward on one other daemon, nothing more
    # Binomial(80, 0.1): 0 or more than 24 checks happen with probability < 1e-3.
    assert 1 <= stats.checked <= 24


def test_liar_in_the_first_of_two_pushed_hops(swarm, model_path, local):
    """The liar serves blocks 0:3 of a two-hop route with daemon-to-daemon push on: the second hop
    already computed on its wrong output when the check finds it, so that hop is rolled back too
    and the step re-runs from the replaced hop; the tokens still equal local transformers'."""
    first_liar = daemon(swarm, "liar").peer_id
    half_liar = swarm.start("0:3", name="liar03", args=["--throughput", "1000"], launcher=[str(LYING_DAEMON)],
                            initial_peers=swarm.addrs[:1]).peer_id
    reference = local.generate(PROMPT, max_new_tokens=10, do_sample=False)
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs[:1],
                                                         spot_check_rate=1.0, blocked_peers=[first_liar]) as model:
        with model.inference_session(max_length=32) as session:
            assert [(h.server.peer_id, h.start, h.end) for h in session.route][0] == (half_liar, 0, 3)
            assert len(session.route) == 2
            out = model.generate(PROMPT, session=session, max_new_tokens=10, do_sample=False)
            assert half_liar not in {h.server.peer_id for h in session.route}
        stats = model.spot_checks
        assert stats is not None and stats.flagged == [half_liar] and stats.first_disagreement_at == 1
    assert out.tolist() == reference.tolist()


def _logits(model_path, swarm, **options) -> tuple[torch.Tensor, object]:
    """model(PROMPT).logits through the swarm (no DHT: no report read, so the liar is routed to first)."""
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs, use_dht=False,
                                                         **options) as model:
        with torch.no_grad():
            return model(PROMPT).logits, model.spot_checks


def liars(swarm: LocalSwarm) -> list[str]:
    """The lying daemons running now (an earlier test of this module may have started a second)."""
    return [d.peer_id for d in swarm.daemons if d.name.startswith("liar") and d.process.poll() is None]


def test_stateless_forward_is_spot_checked(swarm, model_path):
    """model(...) at R=1.0: the liar (routed first) is caught on the forward, flagged, and the call
    runs again on honest daemons: the logits equal an honest run's, bit for bit."""
    honest, _ = _logits(model_path, swarm, blocked_peers=liars(swarm))
    unchecked, _ = _logits(model_path, swarm)
    assert not torch.equal(unchecked, honest)  # the liar is routed to and its answer is wrong
    checked, stats = _logits(model_path, swarm, spot_check_rate=1.0)
    assert torch.equal(checked, honest)
    assert stats.flagged[0] == daemon(swarm, "liar").peer_id and stats.first_disagreement_at == 1
    assert set(stats.flagged) <= set(liars(swarm)) and stats.checked >= 2  # the liar's answer, the replacement's


def test_deep_prompt_session_is_spot_checked(swarm, model_path):
    """A session with deep prompts at R=1.0: the checking daemons get the hop's prompts (an honest
    daemon is not found wrong), the liar is caught and replaced, and the tokens equal an honest run's."""
    def generate(**options) -> tuple[list[int], object]:
        with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs, use_dht=False,
                                                             tuning_mode="deep_ptune", pre_seq_len=3, **options) as model:
            with torch.no_grad():
                generator = torch.Generator().manual_seed(5)
                model.ptune.prompt_embeddings.weight.normal_(std=0.5, generator=generator)
                model.ptune.intermediate_prompt_embeddings.weight.normal_(std=0.5, generator=generator)
            out = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
            return out.tolist(), model.spot_checks

    honest, _ = generate(blocked_peers=liars(swarm))
    plain, _ = generate(allowed_peers=[daemon(swarm, "honest1").peer_id])
    assert plain == honest  # the prompts are deterministic: two honest daemons agree
    clean, clean_stats = generate(spot_check_rate=1.0, blocked_peers=liars(swarm))
    assert clean == honest and clean_stats.disagreements == 0 and clean_stats.checked == 8  # prompts reach the checker
    checked, stats = generate(spot_check_rate=1.0)
    assert checked == honest
    assert stats.flagged[0] == daemon(swarm, "liar").peer_id and stats.first_disagreement_at == 1
    assert set(stats.flagged) <= set(liars(swarm))


def test_client_with_the_weights_decides_without_a_third_daemon(model_path, local):
    """Only an honest daemon and a liar serve the blocks: no third witness. The client, loaded from
    a local folder holding the blocks, computes the disputed span itself: the liar is flagged (the
    honest daemon is not), the tokens equal local generation, and with nobody else left the client
    checks the honest daemon's steps itself. Without the local copy the same disagreement cannot be
    decided: both daemons are flagged and the step fails."""
    swarm = LocalSwarm(model_path, extra_args=DAEMON_ARGS)
    with swarm:
        honest = swarm.start("0:6", name="honest", args=["--throughput", "1"]).peer_id
        liar = swarm.start("0:6", name="liar", args=["--throughput", "1000"], launcher=[str(LYING_DAEMON)]).peer_id
        reference = local.generate(PROMPT, max_new_tokens=8, do_sample=False)
        with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs, use_dht=False,
                                                             spot_check_rate=1.0) as model:
            assert model.spot_checker.local is not None  # a local folder holding every block
            with model.inference_session(max_length=32) as session:
                assert [h.server.peer_id for h in session.route] == [liar]
                out = model.generate(PROMPT, session=session, max_new_tokens=8, do_sample=False)
                assert [h.server.peer_id for h in session.route] == [honest]
            stats = model.spot_checks
            assert stats.flagged == [liar] and stats.published == 0
            # the verdict, then every later step of the honest daemon (nobody else is left to check it)
            assert stats.computed_locally == 1 + 8 and stats.unchecked == 0
        assert out.tolist() == reference.tolist()
        with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs, use_dht=False,
                                                             spot_check_rate=1.0) as model:
            model.spot_checker.local = None  # as a client loaded from the Hub, without the blocks
            with pytest.raises(Exception, match="2 daemons are flagged for wrong answers"):
                model.generate(PROMPT, max_new_tokens=2, do_sample=False)
            assert set(model.spot_checks.flagged) == {liar, honest}


def test_readers_recheck_reports(swarm, model_path):
    """Reports carry the disputed forward's inputs. A true report (the liar accused by two honest
    witnesses) is confirmed when a reader runs them again, and the liar avoided; a framing report
    (an honest daemon's genuine signed answer, "witnessed" by two keys of the framer that sign a
    wrong answer: every signature verifies) is refuted on re-check, by the reader's own copy of the
    blocks and by a daemon not involved, and the framed daemon stays in use. Without re-checking
    the framing report is believed."""
    liar, victim, other = (daemon(swarm, n).peer_id for n in ("liar", "honest1", "honest2"))
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs, use_dht=True,
                                                         recheck_reports=False) as model:
        servers = dict(model.swarm._servers)  # the liar included, flagged by an earlier report or not
        fingerprint = model.swarm.model_fingerprint
        history = torch.randn(1, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(11))
        inputs = CheckedInputs(history)
        answers = {peer: model.runtime.call(signed_forward, model.swarm, Hop(servers[peer], 0, 6), from_torch(history))
                   for peer in (liar, victim, other)}
        digest = inputs.digest(Hop(servers[victim], 0, 6), fingerprint)

        def signed(peer: str) -> SignedOutput:
            reply = answers[peer]
            return SignedOutput(peer_id_from_text(peer), reply.request_id, reply.hidden, reply.signature)

        def puppet(output) -> SignedOutput:  # a key of the framer's, signing what it is told
            key, request_id = ed25519_private_key(ephemeral_identity()), os.urandom(16)
            return SignedOutput(peer_id_from_private_key(key), request_id, output, sign_response(
                key, ResponseBinding("forward", request_id, 0, 0, 0, 6, fingerprint, digest, output.digest())))

        wrong = from_torch(to_torch(answers[victim].hidden) * 1.02)
        reporter = ed25519_private_key(ephemeral_identity())
        expires = time.time() + MAX_EVIDENCE_TTL - 60
        reports = [EvidenceReport(fingerprint, 0, 6, digest, signed(liar), (signed(victim), signed(other)),
                                  peer_id_from_private_key(reporter), expires, inputs.payload()),
                   EvidenceReport(fingerprint, 0, 6, digest, signed(victim), (puppet(wrong), puppet(wrong)),
                                  peer_id_from_private_key(reporter), expires, inputs.payload())]
        stored = []
        for report in reports:
            report.verify(now=time.time())  # both prove something on their signatures alone
            stored.append(model.runtime.call(model.swarm.discovery.publish_evidence, encode_report(reporter, report),
                                             report))
        assert stored[1] > 0  # (on the liar, the DHT may keep an earlier test's report, as true as ours)
        model.runtime.call(model.swarm.refresh)
        assert {liar, victim} <= model.swarm.flagged()  # no re-check: the framing works

    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs) as reader:
        verdicts = {key[0]: verdict for key, verdict in reader.swarm._rechecked.items()}
        assert verdicts[liar] is True and verdicts[victim] is False  # on the reader's copy of the blocks
        assert liar in reader.swarm.flagged() and victim not in reader.swarm.flagged()
        # The same on a daemon neither accused nor witness (honest2 for the framing report).
        reader.swarm.recheck = SpotChecker(reader.swarm, 0.0).recheck
        reader.swarm._rechecked.clear()
        before = daemon_counters(swarm, daemon(swarm, "honest2")).get("forward", 0.0)
        reader.runtime.call(reader.swarm.refresh)
        assert {key[0]: v for key, v in reader.swarm._rechecked.items()}[victim] is False
        assert daemon_counters(swarm, daemon(swarm, "honest2")).get("forward", 0.0) == before + 1
        assert victim in {s.peer_id for s in reader.swarm.servers()}
