"""Members-only swarm with real daemons: members generate exactly as local transformers does;
non-member daemons and clients are refused right after the handshake, with reasons on both sides;
a revoked member daemon is cut off within one record period and cannot come back."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client import members
from petals_client.localswarm import LocalSwarm
from petals_client.routing import NoRoute
from petals_protocol.membership import certificate_to_text, issue_certificate
from petals_protocol.p2p.identity import ed25519_private_key, load_or_create_identity, peer_id_bytes

from swarmlib import DAEMON_ARGS

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
PERIOD = 2.0  # the daemons' record period (--announce-period): how soon a revocation must bite


def _peer(path: Path):
    from petals_protocol.p2p.identity import peer_id

    return peer_id(load_or_create_identity(path)).to_base58()


def _certify(owner_key: Path, member_key: Path, out: Path, days: float = 1.0) -> Path:
    owner = load_or_create_identity(owner_key)
    blob = issue_certificate(ed25519_private_key(owner), peer_id_bytes(load_or_create_identity(member_key)),
                             issued_at=time.time(), lifetime=days * 86400)
    out.write_text(certificate_to_text(blob))
    return out


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def _logged(daemon, text: str) -> bool:
    return any(text in line for line in list(daemon.log))


def test_members_only_swarm(tmp_path, llama_path) -> None:
    owner_key = tmp_path / "owner.key"
    owner = _peer(owner_key)
    work = tmp_path / "swarm"
    work.mkdir()
    for name in ("d1", "d2", "client"):
        _certify(owner_key, work / f"{name}.key", work / f"{name}.cert")
    timing = ["--announce-period", str(PERIOD), "--record-ttl", str(3 * PERIOD)]
    swarm = LocalSwarm(llama_path, workdir=work, extra_args=DAEMON_ARGS + timing,
                       echo=bool(os.environ.get("PETALS_TEST_ECHO")))
    with swarm:
        member = ["--swarm-owner", owner]
        d1 = swarm.start("0:3", args=[*member, "--member-certificate", str(work / "d1.cert")])
        d2 = swarm.start("3:6", args=[*member, "--member-certificate", str(work / "d2.cert")])

        # Members work normally: exactly local generation.
        ref = AutoModelForCausalLM.from_pretrained(llama_path).generate(PROMPT, max_new_tokens=12, do_sample=False)
        with AutoDistributedModelForCausalLM.from_pretrained(
                llama_path, initial_peers=d1.addrs, identity=work / "client.key", swarm_owner=owner,
                member_certificate=work / "client.cert") as model:
            assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), ref)

        # A client outside the swarm (no membership options): refused; the daemon logs why.
        with pytest.raises(Exception, match=f"members-only swarm \\(owner {owner}\\)") as refused:
            AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=d1.addrs)
        print("plain client:", refused.value)
        _wait_for(lambda: _logged(d1, "membership: refused peer="), 10, "d1 logs the refusal")
        # A client with a certificate of another swarm: refused, and told which swarm it is not in.
        other_key = tmp_path / "other-owner.key"
        _certify(other_key, work / "stranger.key", work / "stranger.cert")
        with pytest.raises(Exception, match=f"not {_peer(other_key)}|is in swarm") as foreign:
            AutoDistributedModelForCausalLM.from_pretrained(
                llama_path, initial_peers=d1.addrs, identity=work / "stranger.key", swarm_owner=_peer(other_key),
                member_certificate=work / "stranger.cert")
        assert "refused" in str(foreign.value)

        # A daemon without a certificate of this owner cannot join: it exits with the reason.
        # (Both start at once: neither waits on the other.)
        outsider = swarm.start("0:3", name="outsider", wait=False, args=[*member])
        stranger = swarm.start("0:3", name="stranger", wait=False,
                               args=["--swarm-owner", _peer(other_key), "--member-certificate",
                                     str(work / "stranger.cert")])
        assert outsider.process.wait(60) != 0
        assert any("membership certificate" in line for line in outsider.log), list(outsider.log)[-5:]
        assert stranger.process.wait(60) != 0
        assert any("refused" in line for line in stranger.log), list(stranger.log)[-5:]

        # Revoke d2. Within one record period (plus a DHT round trip) d1 has the new list, closes
        # d2's connection if one is open, and refuses d2 when it comes back (it announces every period).
        revoked_at = time.monotonic()
        assert members.revoke(owner_key, d2.peer_id, initial_peers=d1.addrs) == 0
        membership_log = lambda: "\n".join(l for l in d1.log if "membership" in l)  # noqa: E731
        _wait_for(lambda: _logged(d1, "membership: revocation list seq 1"), PERIOD + 10,
                  f"d1 reads the new list:\n{membership_log()}")
        learnt = time.monotonic() - revoked_at
        _wait_for(lambda: _logged(d1, f"refused peer={d2.peer_id}: peer {d2.peer_id} was removed"), 2 * PERIOD + 10,
                  f"d1 refuses the revoked member:\n{membership_log()}")
        print(f"revocation: list in force at d1 {learnt:.1f} s after `member revoke` returned, the revoked daemon's "
              f"next dial refused at {time.monotonic() - revoked_at:.1f} s (record period {PERIOD:g} s)")
        # A member client reads the list too: it will not use d2, the only daemon for blocks 3:6.
        with AutoDistributedModelForCausalLM.from_pretrained(
                llama_path, initial_peers=d1.addrs, identity=work / "client.key", swarm_owner=owner,
                member_certificate=work / "client.cert") as model:
            with pytest.raises(NoRoute):
                model.generate(PROMPT, max_new_tokens=2, do_sample=False)
