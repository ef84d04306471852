"""The client's view of the swarm: which daemons serve which blocks of our model, and how to reach them.

Lives on the client runtime's trio loop. `refresh()` learns who serves what: from the DHT once
discovery is available (petals_client.discovery), and always by asking daemons directly over
`/petals/info/1`, which also measures the round-trip time that routing uses. Daemons that fail
are banned for a while, with a backoff that doubles on repeated failures.

Trust (issue 22): daemons proven to answer wrong are *flagged*: never used again while the flag
lasts, by this client's own spot checks (client/spotcheck.py) or by a verified evidence report
read from the DHT on refresh (petals_protocol.evidence; forged reports fail verification and are
ignored; with `recheck`, a report whose inputs, run again, show the accused answer right is
ignored too). `allowed_peers` / `blocked_peers` restrict which daemons this client uses at all: a
daemon outside them is never routed through, recovered to or asked for a spot check. An entry of
`allowed_peers` names a daemon by peer id, or a certificate issuer by its peer id (a swarm owner
key, `petals keygen`): then every daemon that shows a valid membership certificate from that
issuer for its own peer id (in its info reply), not voided by the issuer's revocation list in the
DHT, is allowed too. So a daemon outside the list is still asked what it serves (an info probe,
which carries no user data), to see its certificate; a blocked daemon is never contacted.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from petals_protocol.errors import PetalsError
from petals_protocol.ids import FORWARD_PROTOCOL, INFERENCE_PROTOCOL
from petals_protocol.messages import ErrorReply, InfoResponse
from petals_protocol.evidence import EvidenceReport
from petals_protocol.membership import (
    MembershipCertificate,
    NotAMember,
    RevocationList,
    decode_revocations,
    shown_certificate,
)
from petals_protocol.p2p.dht import find_revocations
from petals_protocol.signing import peer_id_from_text, peer_id_to_text
from petals_protocol.p2p.host import connect_any
from petals_protocol.p2p.info import timed_info
from petals_protocol.p2p.relay import is_circuit
from petals_protocol.p2p.streams import NETWORK_ERRORS, FramedStream, open_stream

from .routing import Hop, ServerInfo

log = logging.getLogger("petals_client.swarm")

#: First ban after a failure, doubled on each repeat (Petals: 15 s doubling), capped.
BAN_BASE_SECONDS = 15.0
BAN_MAX_SECONDS = 300.0
#: A daemon proven wrong is not used again for a day (as long as a published report is believed).
FLAG_SECONDS = 24 * 3600.0
#: Timed info round trips per probe (protocol/p2p/info.timed_info); the fastest is the daemon's
#: round-trip time, so that one sample's scheduling delay on a busy machine does not outweigh the
#: differences routing weighs (a relayed hop's penalty, a nearer daemon). Each sample costs a round
#: trip when the swarm is probed (start, recovery), so few.
RTT_SAMPLES = 2


@dataclass
class _Ban:
    until: float
    strikes: int


@dataclass
class SwarmClient:
    host: Any
    nursery: trio.Nursery
    model_fingerprint: str
    initial_peers: Sequence[str]
    connect_timeout: float = 10.0
    step_timeout: float = 30.0
    max_retries: int = 5
    discovery: Any = None  # petals_client.discovery.Discovery once the DHT is joined
    _servers: dict[str, ServerInfo] = field(default_factory=dict)
    _bans: dict[str, _Ban] = field(default_factory=dict)
    _addrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: The DHT records seen by the last refresh (reachability, expiry: what info replies lack)
    records: list[Any] = field(default_factory=list)
    #: Only these daemons are used (None: any); these never are (peer ids, base58 text).
    allowed_peers: frozenset[str] | None = None
    blocked_peers: frozenset[str] = frozenset()
    #: Daemons found answering wrong -> until when (time.monotonic()); see `flag`.
    _flagged: dict[str, float] = field(default_factory=dict)
    #: Verified evidence reports read from the DHT, by accused peer id.
    evidence: dict[str, EvidenceReport] = field(default_factory=dict)
    #: Membership certificates daemons showed (verified: issuer's signature, for that peer id).
    certificates: dict[str, MembershipCertificate] = field(default_factory=dict)
    #: Runs a report's inputs again (client/spotcheck.py `SpotChecker.recheck`): True confirmed,
    #: False refuted (the report is ignored), None not re-checkable. None: believe verified reports.
    recheck: Callable[[EvidenceReport], Awaitable[bool | None]] | None = None
    _rechecked: dict[tuple[str, bytes, float], bool | None] = field(default_factory=dict)
    #: The newest revocation list read from the DHT for each allowed issuer that certified a daemon.
    revocations: dict[bytes, RevocationList] = field(default_factory=dict)

    # ---------------------------------------------------------------- bans
    def ban(self, peer_id: str) -> None:
        previous = self._bans.get(peer_id)
        strikes = previous.strikes + 1 if previous else 1
        seconds = min(BAN_BASE_SECONDS * 2 ** (strikes - 1), BAN_MAX_SECONDS)
        self._bans[peer_id] = _Ban(until=time.monotonic() + seconds, strikes=strikes)
        log.info("banned peer=%s for %.0f s (strike %d)", peer_id, seconds, strikes)

    def unban(self, peer_id: str) -> None:
        """Forget `peer_id`'s failures (an operator or a benchmark knows it is back)."""
        self._bans.pop(peer_id, None)

    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(p for p, b in self._bans.items() if b.until > now)

    def flag(self, peer_id: str, seconds: float = FLAG_SECONDS) -> None:
        """Stop using `peer_id` at once, for `seconds`: it answered wrong (a proof, not a failure)."""
        self._flagged[peer_id] = max(self._flagged.get(peer_id, 0.0), time.monotonic() + seconds)

    def flagged(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(p for p, until in self._flagged.items() if until > now)

    def permitted(self, peer_id: str) -> bool:
        """Whether allowed_peers / blocked_peers let this client use `peer_id` at all: listed, or
        certified by a listed issuer (valid now, not revoked)."""
        if peer_id in self.blocked_peers:
            return False
        return self.allowed_peers is None or peer_id in self.allowed_peers or self.certified(peer_id)

    def certified(self, peer_id: str) -> bool:
        """Whether `peer_id` showed a certificate of an issuer in allowed_peers that holds now."""
        cert = self.certificates.get(peer_id)
        if cert is None or self.allowed_peers is None or peer_id_to_text(cert.owner) not in self.allowed_peers:
            return False
        revocations = self.revocations.get(cert.owner)
        return cert.expires_at > time.time() and not (revocations is not None and revocations.voids(cert))

    def servers(self) -> list[ServerInfo]:
        """Daemons this client may use: permitted and not flagged (banned ones are the router's business)."""
        flagged = self.flagged()
        return [s for s in self._servers.values() if s.peer_id not in flagged and self.permitted(s.peer_id)]

    def route_restrictions(self) -> str:
        """A note for NoRoute when allowed_peers / blocked_peers / flags removed daemons, else ""."""
        notes = []
        if self.allowed_peers is not None:
            notes.append(f"only allowed_peers ({len(self.allowed_peers)}) and daemons they certify may be used")
        if self.blocked_peers:
            notes.append(f"{len(self.blocked_peers)} blocked_peers are excluded")
        if self.flagged():
            notes.append(f"{len(self.flagged())} daemons are flagged for wrong answers")
        return f" ({'; '.join(notes)})" if notes else ""

    # ---------------------------------------------------------------- discovery
    async def _info(self, addr_or_peer: str, addrs: tuple[str, ...] = ()) -> ServerInfo | None:
        """Ask one daemon what it serves; None (logged) when it is unreachable or serves another model."""
        try:
            with trio.fail_after(self.connect_timeout):
                if not addrs:
                    addrs = (addr_or_peer,)
                peer_id, reply, rtt = await timed_info(self.host, addrs, nursery=self.nursery, samples=RTT_SAMPLES)
        except NETWORK_ERRORS as exc:
            log.info("no answer from %s: %s", addr_or_peer, exc)
            return None
        if isinstance(reply, ErrorReply) or not isinstance(reply, InfoResponse):
            log.info("unexpected info reply from %s: %s", addr_or_peer, reply)
            return None
        if reply.model_fingerprint != self.model_fingerprint:
            log.info("peer=%s serves another model (%s), ignored", reply.peer_id, reply.model_fingerprint[:16])
            return None
        self._note_certificate(str(peer_id), reply.certificate)  # the id Noise authenticated, not the reply's
        return ServerInfo(peer_id=peer_id_to_text(reply.peer_id), addrs=addrs, start=reply.start_block, end=reply.end_block,
                          throughput=reply.throughput, cache_tokens_free=reply.cache_tokens_free,
                          state=reply.state, public_name=reply.public_name, dtype=reply.dtype, rtt=rtt,
                          version=reply.version, max_length=reply.max_length,
                          max_batch_size=reply.max_batch_size, adapters=reply.adapters or (),
                          using_relay=bool(addrs) and all(is_circuit(a) for a in addrs))

    async def refresh(self) -> None:
        """Re-learn who serves the model (DHT records if joined, then a direct info probe of each)."""
        targets: dict[str, tuple[str, ...]] = {}
        if self.discovery is not None:
            self.records = await self.discovery.find_servers(self.model_fingerprint)
            for record in self.records:
                if record.peer_id not in self.blocked_peers:  # others are probed for their certificate
                    targets[record.peer_id] = record.addrs
        for addr in self.initial_peers:
            peer = addr.rstrip("/").rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else ""
            if peer not in self.blocked_peers:
                targets.setdefault(addr, ())
        found: dict[str, ServerInfo] = {}
        reports: list[EvidenceReport] = []

        async def read_evidence(peer_ids: list[str]) -> None:
            reports.extend(await self.discovery.find_evidence(self.model_fingerprint, peer_ids))
        legs = {record.peer_id: record.next_rtts for record in self.records}  # routing's daemon-to-daemon legs

        async def probe(target: str, addrs: tuple[str, ...]) -> None:
            if not target.startswith("/"):
                if not addrs:
                    return
                target = addrs[0]
            info = await self._info(target, addrs)
            if info is not None:
                found[info.peer_id] = dataclasses.replace(info, next_rtts=legs.get(info.peer_id, ()))

        async with trio.open_nursery() as nursery:
            if self.discovery is not None:  # beside the probes: a DHT walk can wait on a hung peer
                nursery.start_soon(read_evidence, [r.peer_id for r in self.records if r.peer_id in targets])
            for target, addrs in targets.items():
                nursery.start_soon(probe, target, addrs)
        self._servers = found
        await self._read_revocations()
        await self._believe(reports)  # after the probes: a re-check runs on the daemons just found

    def _note_certificate(self, peer_id: str, blob: bytes | None) -> None:
        """Keep the certificate a daemon showed if it verifies for that daemon (logged otherwise)."""
        self.certificates.pop(peer_id, None)
        if blob is None:
            return
        try:
            self.certificates[peer_id] = shown_certificate(blob, peer_id_from_text(peer_id), time.time())
        except NotAMember as exc:
            log.info("peer=%s shows a certificate that does not hold: %s", peer_id, exc)

    async def _read_revocations(self) -> None:
        """The revocation lists of the allowed issuers that certified a daemon we found (DHT)."""
        if self.discovery is None or self.allowed_peers is None:
            return
        issuers = {c.owner for p, c in self.certificates.items()
                   if p in self._servers and peer_id_to_text(c.owner) in self.allowed_peers}
        for issuer in issuers:
            with trio.move_on_after(self.connect_timeout):
                try:
                    blobs = await find_revocations(self.discovery.dht, issuer)  # valid ones, newest first
                except PetalsError as exc:
                    log.info("revocation list of issuer %s not read: %s", peer_id_to_text(issuer), exc)
                    continue
                if blobs:
                    revocations = decode_revocations(blobs[0], owner=issuer)
                    known = self.revocations.get(issuer)
                    if known is None or revocations.seq > known.seq:
                        self.revocations[issuer] = revocations

    async def _believe(self, reports: list[EvidenceReport]) -> None:
        """Flag the daemons that verified evidence reports in the DHT prove wrong, until the report
        expires; with `recheck`, not those whose report a re-run of its inputs refutes (once per report)."""
        for report in reports:
            accused = report.accused_text
            if self.recheck is not None:
                key = (accused, report.input_digest, report.expires_at)
                if key not in self._rechecked:
                    self._rechecked[key] = await self.recheck(report)
                    log.warning("report on peer=%s (by %s) re-checked: %s", accused, peer_id_to_text(report.reporter),
                                {True: "confirmed", False: "REFUTED, its accused answer is right: ignored",
                                 None: "not re-checkable (no inputs, or no daemon to run them): "
                                       "believed on its signatures"}[self._rechecked[key]])
                if self._rechecked[key] is False:
                    continue
            if accused not in self.evidence:
                log.warning("peer=%s is proven to answer wrong (report by %s, blocks %d:%d): avoiding it",
                            accused, peer_id_to_text(report.reporter), report.start_block, report.end_block)
            self.evidence[accused] = report
            self.flag(accused, max(0.0, report.expires_at - time.time()))

    # ---------------------------------------------------------------- streams
    async def open_inference(self, hop: Hop) -> FramedStream:
        return await self._open(hop.server, INFERENCE_PROTOCOL)

    async def open_forward(self, server: ServerInfo) -> FramedStream:
        return await self._open(server, FORWARD_PROTOCOL)

    async def _open(self, server: ServerInfo, protocol: str) -> FramedStream:
        if server.addrs:
            await connect_any(self.host, server.addrs)
        return await open_stream(self.host, ID.from_base58(server.peer_id), protocol, nursery=self.nursery)

