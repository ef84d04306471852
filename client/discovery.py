"""The client's side of DHT discovery: join the swarm as a DHT *client* and find a model's daemons.

Every `find_servers` call is a fresh network lookup (petals_protocol.p2p.dht works around
py-libp2p answering from stale local state): the model's index gives the candidate daemons, each
daemon's signed record says what it serves now. Records are verified by the DHT validator
(signature by the daemon, not expired, bound to this model's fingerprint); only the newest record
per daemon counts, and offline or expired daemons are dropped.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost

from petals_protocol.evidence import EvidenceReport
from petals_protocol.p2p.admission import keep_membership
from petals_protocol.p2p.dht import (
    PetalsDHT,
    find_evidence,
    find_model_records,
    find_revocations,
    publish_evidence,
    start_dht,
)
from petals_protocol.p2p.host import parse_peer_multiaddr
from petals_protocol.p2p.relay import relay_peer_of
from petals_protocol.records import ServerRecord
from petals_protocol.signing import peer_id_to_text

#: Seconds between reads of a members-only swarm's revocation list (a daemon's default record period).
MEMBERSHIP_PERIOD = 30.0

__all__ = ["FoundServer", "Discovery", "join_swarm"]

log = logging.getLogger("petals_client.discovery")


@dataclass(frozen=True, slots=True)
class FoundServer:
    """One daemon serving blocks [start, end) of the model, as its latest signed record says."""

    peer_id: str
    addrs: tuple[str, ...]
    start: int
    end: int
    throughput: float
    cache_tokens_free: int
    state: str
    public_name: str
    using_relay: bool
    expires_at: float
    num_blocks: int = 0
    seq: int = 0
    reachability: str | None = None  # what the daemon learnt (petalsd/reachability.py); None: not said
    relays: tuple[str, ...] = ()  # peer ids of the relays its relayed addresses go through
    next_rtts: tuple[tuple[str, float], ...] = ()  # (peer id, seconds) it measured to the next span's daemons

    @classmethod
    def from_record(cls, record: ServerRecord) -> FoundServer:
        peer = record.peer_id_text
        return cls(
            peer_id=peer,
            addrs=tuple(_with_peer_id(addr, peer) for addr in record.addrs),
            start=record.start_block,
            end=record.end_block,
            throughput=record.throughput,
            cache_tokens_free=record.cache_tokens_free,
            state=record.state,
            public_name=record.public_name,
            using_relay=record.using_relay,
            expires_at=record.expires_at,
            num_blocks=record.num_blocks,
            seq=record.seq,
            reachability=record.reachability,
            relays=tuple(dict.fromkeys(r for a in record.addrs if (r := relay_peer_of(a)))),
            next_rtts=tuple((peer_id_to_text(p), rtt) for p, rtt in record.next_rtts or ()),
        )

    @property
    def via(self) -> str:
        """How a client reaches it: "direct" or "relay" and the relays' peer ids."""
        return f"relay {','.join(self.relays)}" if self.relays else "direct"


def _with_peer_id(addr: str, peer: str) -> str:
    """Dialable form: records may list bare transport addresses; `connect` needs /p2p/<id>."""
    return addr if addr.rstrip("/").endswith(f"/p2p/{peer}") else f"{addr.rstrip('/')}/p2p/{peer}"


class Discovery:
    """A joined DHT (client mode) and the lookups a client needs. Lives as long as its nursery."""

    def __init__(self, host: IHost, dht: PetalsDHT, initial_peer_ids: Sequence[str] = ()) -> None:
        self.host = host
        self.dht = dht
        self.initial_peer_ids = tuple(initial_peer_ids)

    async def keep_membership(self, gate: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Members-only swarm: follow the owner's revocation list and drop revoked daemons
        (petals_protocol.p2p.admission; a client reads the list but does not store it)."""
        await keep_membership(self.host, gate, fetch=lambda: find_revocations(self.dht, gate.membership.owner),
                              store=None, period=MEMBERSHIP_PERIOD, task_status=task_status)

    async def find_servers(self, fingerprint: str) -> list[FoundServer]:
        """Daemons serving `fingerprint` right now (online, joining or draining), sorted by span.

        The initial peers are looked up too, even if the index misses them. Never raises for a
        network problem: unreachable parts of the DHT just contribute nothing.
        """
        records = await find_model_records(self.dht, fingerprint, extra_peers=self.initial_peer_ids)
        found = [FoundServer.from_record(r) for r in records if r.state != "offline"]
        log.debug("found %d servers of %s", len(found), fingerprint[:16])
        return found

    async def find_evidence(self, fingerprint: str, peer_ids: Sequence[str]) -> list[EvidenceReport]:
        """Verified evidence reports against any of `peer_ids` (forged or expired ones are dropped)."""
        return await find_evidence(self.dht, fingerprint, peer_ids)

    async def publish_evidence(self, blob: bytes, report: EvidenceReport) -> int:
        """Store a signed report in the DHT; how many peers acknowledged it."""
        return await publish_evidence(self.dht, blob, report)


async def join_swarm(host: IHost, nursery: trio.Nursery, initial_peers: Sequence[str]) -> Discovery:
    """Connect to the initial peers (full multiaddrs) and start a client-mode DHT node.

    Raises petals_protocol.p2p.dht.DHTError if none of them is reachable, DialError for an
    address that names no peer. The DHT runs in `nursery`.
    """
    peer_ids = [str(parse_peer_multiaddr(addr).peer_id) for addr in initial_peers]
    dht = await start_dht(host, nursery, server=False, bootstrap=initial_peers)
    return Discovery(host, dht, peer_ids)
