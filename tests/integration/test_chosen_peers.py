"""allowed_peers / blocked_peers with real daemons: no request of any kind (session step, spot check,
recovery) reaches a daemon outside the chosen ones, counted by every daemon itself, also after a kill
forces recovery; a route the chosen daemons cannot cover fails naming the blocks."""
from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.localswarm import DaemonProcess, LocalSwarm
from petals_client.routing import NoRoute

from swarmlib import DAEMON_ARGS, daemon_counters, make_endless_model

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_endless_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def swarm(model_path):
    """a, c: blocks 0:3; b, d: 3:6; e: everything, and the fastest (routing would pick it)."""
    swarm = LocalSwarm(model_path, extra_args=DAEMON_ARGS)
    try:
        for name, blocks, throughput in [("a", "0:3", "1"), ("b", "3:6", "1"), ("c", "0:3", "1"),
                                         ("d", "3:6", "1"), ("e", "0:6", "1000")]:
            swarm.start(blocks, name=name, args=["--throughput", throughput], wait=not swarm.daemons)
        swarm.wait_all()
        yield swarm
    finally:
        swarm.stop()


def by_name(swarm: LocalSwarm) -> dict[str, DaemonProcess]:
    return {d.name: d for d in swarm.daemons}


def tokens_computed(swarm: LocalSwarm, d: DaemonProcess) -> float:
    """Tokens the daemon ran through its blocks, for anyone, by any request (its own counter)."""
    return daemon_counters(swarm, d)["tokens"]


def test_only_allowed_daemons_serve_steps_and_spot_checks(swarm, model_path):
    daemons = by_name(swarm)
    allowed = [daemons[n].peer_id for n in "abcd"]
    reference = AutoModelForCausalLM.from_pretrained(model_path).generate(PROMPT, max_new_tokens=8, do_sample=False)
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=[daemons["e"].addrs[0]],
                                                         allowed_peers=allowed, spot_check_rate=1.0) as model:
        assert {s.peer_id for s in model.swarm.servers()} == set(allowed)
        out = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        assert model.spot_checks is not None and model.spot_checks.checked == 2 * 8  # two hops, every step
    assert out.tolist() == reference.tolist()
    assert tokens_computed(swarm, daemons["e"]) == 0
    assert all(tokens_computed(swarm, daemons[n]) > 0 for n in "abcd")  # hops and their checkers
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=[daemons["d"].addrs[0]],
                                                         blocked_peers=[daemons[n].peer_id for n in "bde"]) as model:
        with pytest.raises(NoRoute) as blocked:
            model.inference_session(max_length=8)
    assert blocked.value.uncovered == [(3, 6)] and "blocked_peers" in str(blocked.value)


def test_allowed_peers_hold_through_recovery_and_name_uncovered_blocks(swarm, model_path):
    daemons = by_name(swarm)
    allowed = [daemons[n].peer_id for n in "abc"]
    before = {n: tokens_computed(swarm, d) for n, d in daemons.items()}
    reference = AutoModelForCausalLM.from_pretrained(model_path).generate(PROMPT, max_new_tokens=20, do_sample=False)
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs,
                                                         allowed_peers=allowed, step_timeout=5.0) as model:
        with model.inference_session(max_length=32) as session:
            first = next(d for d in daemons.values() if d.peer_id == session.route[0].server.peer_id)
            assert first.name in "ac"
            survivor = daemons["c" if first.name == "a" else "a"]
            killed: list[int] = []

            class KillFirstHop:
                def put(self, value: torch.Tensor) -> None:
                    killed.append(1)
                    if len(killed) == 6:  # the prompt and 5 tokens are out
                        first.signal(signal.SIGKILL)

                def end(self) -> None:
                    pass

            out = model.generate(PROMPT, session=session, max_new_tokens=20, do_sample=False, streamer=KillFirstHop())
            assert session.recoveries == 1
            assert [h.server.peer_id for h in session.route] == [survivor.peer_id, daemons["b"].peer_id]
        # Both allowed daemons for 0:3 gone: the route cannot be built, though d and e still serve it.
        survivor.signal(signal.SIGKILL)
        model.runtime.call(model.swarm.refresh)
        with pytest.raises(NoRoute) as error:
            model.inference_session(max_length=32)
        assert error.value.uncovered == [(0, 3)]
        assert "allowed_peers" in str(error.value)
    assert out.tolist() == reference.tolist()
    for name in "de":
        assert tokens_computed(swarm, daemons[name]) == before[name]


def test_allowed_issuer_routes_only_through_its_certified_daemons(tmp_path, model_path):
    """allowed_peers=[issuer]: in an open swarm, a and b show the issuer's certificate, e (the
    fastest, so routing would pick it) shows another issuer's; only a and b compute, and once the
    issuer revokes b (`petals member revoke --open-swarm`), blocks 3:6 are uncovered."""
    from petals_client import members
    from test_membership import _certify, _peer

    issuer_key, other_key = tmp_path / "issuer.key", tmp_path / "other.key"
    issuer = _peer(issuer_key)
    work = tmp_path / "swarm"
    work.mkdir()
    certs = {"a": issuer_key, "b": issuer_key, "e": other_key}
    for name, key in certs.items():
        _certify(key, work / f"{name}.key", work / f"{name}.cert")
    swarm = LocalSwarm(model_path, workdir=work, extra_args=DAEMON_ARGS)
    with swarm:
        for name, blocks, throughput in [("a", "0:3", "1"), ("b", "3:6", "1"), ("e", "0:6", "1000")]:
            swarm.start(blocks, name=name, wait=not swarm.daemons,
                        args=["--throughput", throughput, "--member-certificate", str(work / f"{name}.cert")])
        swarm.wait_all()
        daemons = by_name(swarm)
        reference = AutoModelForCausalLM.from_pretrained(model_path).generate(PROMPT, max_new_tokens=8, do_sample=False)
        with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=[daemons["e"].addrs[0]],
                                                             allowed_peers=[issuer]) as model:
            assert {s.peer_id for s in model.swarm.servers()} == {daemons["a"].peer_id, daemons["b"].peer_id}
            out = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        assert out.tolist() == reference.tolist()
        assert tokens_computed(swarm, daemons["e"]) == 0
        assert all(tokens_computed(swarm, daemons[n]) > 0 for n in "ab")

        assert members.revoke(issuer_key, daemons["b"].peer_id, initial_peers=daemons["a"].addrs,
                              members_only=False) == 0
        with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=[daemons["e"].addrs[0]],
                                                             allowed_peers=[issuer]) as model:
            assert {s.peer_id for s in model.swarm.servers()} == {daemons["a"].peer_id}
            with pytest.raises(NoRoute) as uncovered:
                model.inference_session(max_length=8)
        assert uncovered.value.uncovered == [(3, 6)] and "allowed_peers" in str(uncovered.value)
        assert tokens_computed(swarm, daemons["e"]) == 0
        # A daemon showing a certificate that is not for its own peer id does not start.
        thief = swarm.start("0:3", name="thief", wait=False, args=["--member-certificate", str(work / "a.cert")])
        assert thief.process.wait(60) != 0
        assert any("--member-certificate" in line and "shows the certificate of" in line for line in thief.log), \
            list(thief.log)[-5:]
