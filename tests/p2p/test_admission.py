"""Members-only admission between real hosts on loopback: who gets in right after the Noise
handshake, what each side is told, and revocation of an admitted member."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from petals_protocol.membership import Membership, NotAMember, RevocationList, issue_certificate, sign_revocations
from petals_protocol.p2p.admission import AdmissionGate, keep_membership
from petals_protocol.p2p.host import DialError, connect, listen_multiaddrs, make_host, running_host
from petals_protocol.p2p.identity import ed25519_private_key, ephemeral_identity, peer_id_bytes
from petals_protocol.p2p.streams import open_framed, open_stream

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
PING = "/petals-test/ping/1"
DAY = 86400.0


async def _echo(stream) -> None:
    async with open_framed(stream) as framed:
        await framed.send_frame(await framed.receive_frame())


class Swarm:
    """An owner key and helpers to make member and outsider hosts."""

    def __init__(self) -> None:
        self.owner_pair = ephemeral_identity()
        self.owner_key = ed25519_private_key(self.owner_pair)
        self.owner = peer_id_bytes(self.owner_pair)

    def certificate(self, pair, *, issued_at: float | None = None, lifetime: float = DAY) -> bytes:
        return issue_certificate(self.owner_key, peer_id_bytes(pair), issued_at=issued_at or time.time(),
                                 lifetime=lifetime)

    def member(self, *, certificate: bytes | None = None, pair=None):
        pair = pair or ephemeral_identity()
        cert = certificate if certificate is not None else self.certificate(pair)
        gate = AdmissionGate(Membership(owner=self.owner, certificate=cert), peer_id_bytes(pair))
        return make_host(pair, admission=gate), gate


async def _talk(client, server) -> None:
    peer = await connect(client, listen_multiaddrs(server)[0], timeout=5)
    async with trio.open_nursery() as nursery:
        framed = await open_stream(client, peer, PING, nursery=nursery, timeout=5)
        await framed.send_frame(b"ping")
        assert await framed.receive_frame() == b"ping"
        await framed.close()


def test_members_talk_and_outsiders_are_refused_with_reasons(caplog: pytest.LogCaptureFixture) -> None:
    swarm = Swarm()
    other = Swarm()

    async def main() -> None:
        server, server_gate = swarm.member()
        server.set_stream_handler(PING, _echo)
        member, _ = swarm.member()
        plain = make_host(ephemeral_identity())  # not in members-only mode at all
        foreign, _ = other.member()  # a member of another swarm
        async with running_host(server, LOOPBACK), running_host(member, LOOPBACK), \
                running_host(plain, LOOPBACK), running_host(foreign, LOOPBACK):
            with trio.fail_after(30):
                await _talk(member, server)
                with pytest.raises(DialError, match="is in swarm"):
                    await connect(foreign, listen_multiaddrs(server)[0], timeout=5)
                with pytest.raises(DialError, match=f"members-only swarm \\(owner {_text(swarm.owner)}\\)"):
                    await connect(plain, listen_multiaddrs(server)[0], timeout=5)
                # The members-only side dialing out refuses a plain peer too.
                with pytest.raises(DialError, match="refused peer"):
                    await connect(server, listen_multiaddrs(plain)[0], timeout=5)
            assert server_gate.refused >= 2
            assert str(member.get_id()) in server_gate.admitted

    with caplog.at_level(logging.WARNING, logger="petals.membership"):
        trio.run(main)
    refusals = [r.getMessage() for r in caplog.records if "membership: refused peer=" in r.getMessage()]
    assert any(f"is in swarm {_text(other.owner)}" in m for m in refusals)
    assert any("does not speak /petals/member/1" in m or "hung up" in m for m in refusals)


def test_expired_stolen_and_revoked_certificates_are_refused() -> None:
    swarm = Swarm()

    async def main() -> None:
        server, server_gate = swarm.member()
        server.set_stream_handler(PING, _echo)
        victim = ephemeral_identity()
        thief = ephemeral_identity()
        with pytest.raises(NotAMember, match="wrong identity key"):
            swarm.member(pair=thief, certificate=swarm.certificate(victim))  # refused at start already
        expired_pair = ephemeral_identity()
        expired = swarm.certificate(expired_pair, issued_at=time.time() - 2 * DAY, lifetime=DAY)
        with pytest.raises(NotAMember, match="expired"):
            swarm.member(pair=expired_pair, certificate=expired)
        member_pair = ephemeral_identity()
        member, _ = swarm.member(pair=member_pair)
        owner_host = make_host(swarm.owner_pair,
                               admission=AdmissionGate(Membership(owner=swarm.owner), swarm.owner))
        async with running_host(server, LOOPBACK), running_host(member, LOOPBACK), \
                running_host(owner_host, LOOPBACK), trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await _talk(owner_host, server)  # the owner needs no certificate
                await _talk(member, server)
                # Revoke the connected member: the next sweep closes its connection, and it cannot
                # come back on the certificate it holds.
                revocations = RevocationList(owner=swarm.owner, seq=1,
                                             revoked={peer_id_bytes(member_pair): time.time()})
                blob = sign_revocations(swarm.owner_key, revocations)

                async def fetch() -> list[bytes]:
                    return [blob]

                await nursery.start(lambda task_status: keep_membership(
                    server, server_gate, fetch=fetch, store=None, period=0.2, task_status=task_status))
                while member.get_id() in server.get_network().get_connections_map():
                    await trio.sleep(0.05)
                with pytest.raises(DialError, match="was removed from swarm"):
                    await connect(member, listen_multiaddrs(server)[0], timeout=5)
                # A list signed by anyone but the owner is ignored.
                forged = sign_revocations(ed25519_private_key(thief), RevocationList(owner=peer_id_bytes(thief), seq=9))
                assert not server_gate.membership.learn(forged)
                assert server_gate.membership.revocations.seq == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


def _text(peer: bytes) -> str:
    from petals_protocol.signing import peer_id_to_text

    return peer_id_to_text(peer)


def test_a_connection_ends_when_the_certificate_expires() -> None:
    swarm = Swarm()

    async def main() -> None:
        server, server_gate = swarm.member()
        server.set_stream_handler(PING, _echo)
        pair = ephemeral_identity()
        member, _ = swarm.member(pair=pair, certificate=swarm.certificate(pair, lifetime=6.0))

        async def nothing() -> list[bytes]:
            return []

        async with running_host(server, LOOPBACK), running_host(member, LOOPBACK), \
                trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await _talk(member, server)
                await nursery.start(lambda task_status: keep_membership(
                    server, server_gate, fetch=nothing, store=None, period=0.2, task_status=task_status))
                assert member.get_id() in server.get_network().get_connections_map()
                while member.get_id() in server.get_network().get_connections_map():
                    await trio.sleep(0.05)
                with pytest.raises(DialError, match="expired"):
                    await connect(member, listen_multiaddrs(server)[0], timeout=5)
            nursery.cancel_scope.cancel()

    trio.run(main)
