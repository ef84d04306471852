"""Members-only admission, right after the Noise handshake (the rules: petals_protocol.membership).

`AdmittingSecurity` wraps the Noise transport: once Noise has authenticated the other side's peer
id, and before the muxer is negotiated, both sides exchange two Noise messages each:

    hello:   "/petals/member/1 OWNER CERT"   (CERT: the base64 certificate, "-" for the owner)
    verdict: "ok" | "refused REASON"

Each judges the other's hello against its `Membership` and says so; a refused connection is
closed by both, and each side gets a `MembershipRefused` naming the peer and the reason (our
refusal is logged as one WARNING line; the other side's refusal of us surfaces as the dial's
error). Every path that makes a connection (direct dials, relayed circuits, hole punching, inbound)
goes through the security transport, so none skips the check.

Messages are framed like multistream-select lines (varint length, text, newline), so a libp2p
peer that is not in members-only mode fails its muxer negotiation with our hello in its error
message instead of an opaque one.

`keep_membership` re-reads the swarm's revocation list every record period, stores it again (so
it outlives the DHT's value lifetime) and closes connections of admitted peers whose certificate
was revoked or has expired: a revoked member is cut off within one period.
"""
from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IRawConnection, ISecureConn, ISecureTransport
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure

from ..errors import PetalsError
from ..errors import MalformedMessage
from ..membership import (
    CERTIFICATE_HEADER,
    MAX_CERTIFICATE_SIZE,
    Membership,
    MembershipCertificate,
    NotAMember,
    certificate_from_text,
    parse_owner,
)
from ..signing import peer_id_to_text

__all__ = ["HELLO_PREFIX", "EXCHANGE_TIMEOUT", "AdmissionGate", "AdmittingSecurity", "MembershipRefused",
           "keep_membership", "load_gate", "read_certificate"]

log = logging.getLogger("petals.membership")

HELLO_PREFIX = "/petals/member/1"
#: Two small messages each way after the handshake; a loopback exchange takes about a millisecond
#: and a WAN one two round trips. A peer that says nothing for this long is refused.
EXCHANGE_TIMEOUT = 10.0
#: Bound on one network lookup (and store) of the revocation list: a DHT walk's own bound.
FETCH_TIMEOUT = 30.0
_MAX_LINE = 4096
_OK = "ok"
_REFUSED = "refused"


class MembershipRefused(PetalsError, HandshakeFailure):
    """A connection ended by the membership check: `by_us` when we refused the peer."""

    def __init__(self, peer: str, reason: str, *, by_us: bool) -> None:
        text = f"refused peer {peer}: {reason}" if by_us else f"peer {peer} refused us: {reason}"
        super().__init__(text)
        self.peer = peer
        self.reason = reason
        self.by_us = by_us


class AdmissionGate:
    """Who this peer admits, who it has admitted (and on which certificate), and how many it refused."""

    def __init__(self, membership: Membership, local_peer: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self.membership = membership
        self.clock = clock
        membership.check_own(local_peer, clock())  # NotAMember at start, not at the first dial
        self._hello = _line(f"{HELLO_PREFIX} {peer_id_to_text(membership.owner)} "
                            f"{base64.b64encode(membership.certificate).decode() if membership.certificate else '-'}")
        self.admitted: dict[str, MembershipCertificate | None] = {}
        self.refused = 0

    def hello(self) -> bytes:
        return self._hello

    def judge(self, peer: bytes, hello: bytes) -> MembershipCertificate | None:
        """The certificate `peer` showed, if it admits it; NotAMember otherwise."""
        text = _unline(hello)
        parts = text.split(" ") if text is not None else []
        if len(parts) != 3 or parts[0] != HELLO_PREFIX:
            raise NotAMember(f"peer {peer_id_to_text(peer)} does not speak {HELLO_PREFIX} (not started with the "
                             "members-only options of this swarm)")
        if parts[1] != peer_id_to_text(self.membership.owner):
            raise NotAMember(f"peer {peer_id_to_text(peer)} is in swarm {parts[1]}, "
                             f"not {peer_id_to_text(self.membership.owner)}")
        certificate = None if parts[2] == "-" else certificate_from_text(f"{CERTIFICATE_HEADER} {parts[2]}")
        return self.membership.check(peer, certificate, self.clock())

    def void_peers(self) -> list[str]:
        """Admitted peers whose certificate no longer holds (revoked since, or expired)."""
        now = self.clock()
        return [peer for peer, cert in self.admitted.items() if not self.membership.still_valid(cert, now)]

    def describe(self) -> dict[str, Any]:
        revocations = self.membership.revocations
        return {"owner": peer_id_to_text(self.membership.owner), "admitted": len(self.admitted),
                "refused": self.refused, "revocation_seq": revocations.seq if revocations else None,
                "revoked": len(revocations.revoked) if revocations else 0}


def load_gate(owner: str, certificate: Path | None, local_peer: bytes) -> AdmissionGate:
    """The gate of a peer started with `--swarm-owner OWNER [--member-certificate FILE]`: NotAMember,
    with what to do, if the owner is not a peer id or the certificate file is unusable for us."""
    try:
        owner_id = parse_owner(owner)
    except MalformedMessage as exc:
        raise NotAMember(str(exc)) from exc
    blob = read_certificate(certificate) if certificate is not None else None
    return AdmissionGate(Membership(owner=owner_id, certificate=blob), local_peer)


def read_certificate(path: Path) -> bytes:
    """The certificate blob in a `petals member add` file; NotAMember naming the file otherwise."""
    try:
        with Path(path).open("r", encoding="ascii", errors="replace") as f:
            text = f.read(4 * MAX_CERTIFICATE_SIZE)
    except OSError as exc:
        raise NotAMember(f"membership certificate {path}: {exc.strerror or exc}") from exc
    try:
        return certificate_from_text(text)
    except NotAMember as exc:
        raise NotAMember(f"membership certificate {path}: {exc.reason}") from exc


async def admit(secure: ISecureConn, gate: AdmissionGate) -> None:
    """Run the exchange on a fresh Noise session; return when both sides admit each other, else
    close the session and raise MembershipRefused."""
    peer = secure.get_remote_peer()
    peer_text = str(peer)
    ours: str | None = None
    theirs = "no answer within the membership exchange"
    cert: MembershipCertificate | None = None
    with trio.move_on_after(EXCHANGE_TIMEOUT) as scope:
        try:
            await secure.write(gate.hello())
            try:
                cert = gate.judge(peer.to_bytes(), await secure.read())
            except NotAMember as exc:
                ours = exc.reason
            await secure.write(_line(_OK if ours is None else f"{_REFUSED} {ours}"))
            verdict = _unline(await secure.read()) or ""
            theirs = "" if verdict == _OK else verdict.removeprefix(_REFUSED).strip() or "an unreadable verdict"
        except Exception as exc:  # noqa: BLE001 - the peer hung up or sent garbage: libp2p raises assorted types
            ours = ours or (f"peer {peer_text} hung up during the membership exchange (not in members-only mode, "
                            f"or it refused us): {exc or type(exc).__name__}")
    if scope.cancelled_caught:
        ours = ours or f"no membership hello from peer {peer_text} within {EXCHANGE_TIMEOUT:g} s"
    if ours is None and not theirs:
        gate.admitted[peer_text] = cert
        log.debug("admitted peer=%s (%s)", peer_text, cert.describe() if cert else "the swarm owner")
        return
    await _close_quietly(secure)
    if ours is not None:
        gate.refused += 1
        log.warning("membership: refused peer=%s: %s", peer_text, ours)
        raise MembershipRefused(peer_text, ours, by_us=True)
    log.warning("membership: peer=%s refused us: %s", peer_text, theirs)
    raise MembershipRefused(peer_text, theirs, by_us=False)


class AdmittingSecurity(ISecureTransport):
    """A security transport: `inner` (Noise), then the membership exchange (see the module doc)."""

    def __init__(self, inner: ISecureTransport, gate: AdmissionGate) -> None:
        self.inner = inner
        self.gate = gate

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        secure = await self.inner.secure_inbound(conn)
        await admit(secure, self.gate)
        return secure

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        secure = await self.inner.secure_outbound(conn, peer_id)
        await admit(secure, self.gate)
        return secure


async def keep_membership(
    host: Any,
    gate: AdmissionGate,
    *,
    fetch: Callable[[], Awaitable[list[bytes]]],
    store: Callable[[bytes], Awaitable[int]] | None,
    period: float,
    local: Callable[[], list[bytes]] = list,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `period`: adopt the newest revocation list `fetch` finds, `store` the one we hold
    (daemons; None for clients), and close the connections of peers no longer admitted. `local`:
    lists this node already holds (a DHT server's own store, where the owner's store lands), read
    every period on its own, since a network lookup may take longer than a period on a loaded
    swarm. One round runs before `task_status.started()`: a peer starts with the swarm's list."""
    await _fetch(gate, fetch, store, timeout=period)  # a slow swarm does not hold up the start
    _learn(gate, local())
    await _enforce(host, gate)
    task_status.started()

    async def follow_local() -> None:  # never waits behind a slow lookup
        while True:
            await trio.sleep(period)
            _learn(gate, local())
            await _enforce(host, gate)

    async def follow_network() -> None:
        while True:
            await trio.sleep(period)
            await _fetch(gate, fetch, store)
            await _enforce(host, gate)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_local)
        nursery.start_soon(follow_network)


def _learn(gate: AdmissionGate, blobs: list[bytes]) -> None:
    for blob in blobs:
        if gate.membership.learn(blob):
            revocations = gate.membership.revocations
            assert revocations is not None
            log.info("membership: revocation list seq %d of swarm %s: %d peers revoked",
                     revocations.seq, peer_id_to_text(gate.membership.owner), len(revocations.revoked))


async def _fetch(gate: AdmissionGate, fetch: Callable[[], Awaitable[list[bytes]]],
                 store: Callable[[bytes], Awaitable[int]] | None, timeout: float = FETCH_TIMEOUT) -> None:
    with trio.move_on_after(timeout):
        try:
            _learn(gate, await fetch())
            if store is not None and gate.membership.revocations_blob is not None:
                await store(gate.membership.revocations_blob)
        except PetalsError as exc:
            log.info("membership: revocation list not refreshed: %s", exc)


async def _enforce(host: Any, gate: AdmissionGate) -> None:
    connected = {str(peer) for peer in host.get_network().get_connections_map()}
    for peer_text in [p for p in gate.admitted if p not in connected]:
        del gate.admitted[peer_text]  # checked again when it reconnects
    for peer_text in gate.void_peers():
        await _disconnect(host, peer_text, gate)


async def _disconnect(host: Any, peer_text: str, gate: AdmissionGate) -> None:
    cert = gate.admitted.pop(peer_text, None)
    why = "expired" if cert is not None and cert.expires_at <= gate.clock() else "revoked"
    log.warning("membership: closing connections of peer=%s: its certificate is %s", peer_text, why)
    network = host.get_network()
    for peer_id, conns in list(network.get_connections_map().items()):
        if str(peer_id) == peer_text:
            for conn in list(conns):
                with trio.move_on_after(2.0):
                    try:
                        await conn.close()
                    except Exception as exc:  # noqa: BLE001 - a connection already half gone
                        log.debug("closing peer=%s: %r", peer_text, exc)


async def _close_quietly(secure: ISecureConn) -> None:
    with trio.move_on_after(1.0):
        try:
            await secure.close()
        except Exception as exc:  # noqa: BLE001 - closing a connection the peer may have dropped
            log.debug("closing a refused connection: %r", exc)


def _line(text: str) -> bytes:
    """A multistream-select style line: unsigned varint length, the text, a newline."""
    data = text.encode("utf-8")[: _MAX_LINE - 1] + b"\n"
    n, prefix = len(data), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        prefix.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(prefix) + data


def _unline(message: bytes) -> str | None:
    """Inverse of `_line`; None for anything else."""
    length, shift, i = 0, 0, 0
    while i < min(len(message), 3):
        byte = message[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    body = message[i:]
    if length != len(body) or length > _MAX_LINE or not body.endswith(b"\n"):
        return None
    try:
        return body[:-1].decode("utf-8")
    except UnicodeDecodeError:
        return body[:-1].decode("utf-8", "replace")
