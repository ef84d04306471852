"""Kademlia glue: the petals validator, a DHT that keeps clients out of routing tables, and lookups
that really walk the network (the workarounds for py-libp2p bug 6, docs/py-libp2p.md).

What py-libp2p 0.8.1 gets wrong, and what this module does instead:
- `put_value` says nothing about how many peers stored a record -> `put_record` counts the
  PUT_VALUE acknowledgements and returns that number.
- `get_value` / `find_providers` answer from local state when they have any, so a node never sees
  a newer record or a new provider -> `get_fresh` / `find_providers_fresh` ask the k closest peers
  found by an iterative network lookup, every time, and merge with the local copy.
- Peers that opened a KAD stream to us are added to the routing table unchecked, so client-mode
  nodes end up there and every later lookup fails on them ("protocol not supported") ->
  `ServerOnlyRoutingTable` admits a peer only once it is known to speak /ipfs/kad/1.0.0 (identify
  says so, or a background probe opened a KAD stream to it).
- The routing table is not filled from existing connections -> `start_dht` adds the bootstrap
  peers and every connected server itself, then runs a self-lookup.
- Routine RPCs log WARNINGs and rejected records as multi-MB hex -> the kad_dht logger is raised
  to ERROR.

Freshness is never py-libp2p's business: values live 24 h and providers 48 h there, with no
per-record TTL and no way to withdraw. Every petals value carries `expires_at` and `seq` inside
its signed body and `PetalsValidator` enforces them on every node, on store and on read.

The per-model index (how a client finds every daemon of a model in a few queries): daemons add
themselves as *providers* of index keys derived from the model fingerprint, and clients read the
providers, then fetch each provider's signed record. Liveness is judged only by that record
(expiry, state), never by the provider entry. Two problems of py-libp2p's provider store shape the
keys: entries cannot be withdrawn and live 48 h, and a node keeps at most 20 providers per key and
ignores any newcomer beyond that. So the index key rotates every `INDEX_EPOCH_SECONDS` (dead
daemons fall out of the index within an epoch, and "first 20 ever" never locks newcomers out for
good), and it is split into `INDEX_SHARDS` shards by peer id (up to 20 x INDEX_SHARDS daemons per
model per epoch). A client reads the shards of the current epoch in parallel. Daemons provide the
next epoch's keys `INDEX_EPOCH_LEAD` seconds before it starts, so clients whose clock is a little
ahead still find them. Keys are 34-byte sha2-256 multihashes (ADD_PROVIDER refuses keys over 80
bytes, and the textual "/petals-model/<fingerprint>" alone is 78).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.records.record import make_signed_put_record
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from ..errors import BadRecord, PetalsError
from ..evidence import EVIDENCE_NAMESPACE, EvidenceReport, decode_report, evidence_key, parse_evidence_key, select_report
from ..records import (
    RECORD_NAMESPACE,
    ServerRecord,
    decode_record,
    model_index_key,
    parse_record_key,
    record_key,
    select_record,
)
from ..membership import REVOCATIONS_NAMESPACE, decode_revocations, revocations_key, select_revocations
from ..signing import peer_id_from_text, peer_id_to_text
from . import compat
from .host import DialError, connect
from .negotiate import new_stream

__all__ = [
    "INDEX_EPOCH_SECONDS",
    "INDEX_EPOCH_LEAD",
    "INDEX_SHARDS",
    "RPC_TIMEOUT",
    "DHTError",
    "PetalsValidator",
    "ServerOnlyRoutingTable",
    "PetalsDHT",
    "start_dht",
    "put_record",
    "get_fresh",
    "find_server_record",
    "provide",
    "find_providers_fresh",
    "index_keys",
    "index_key_for",
    "find_model_records",
    "RevocationsValidator",
    "find_revocations",
    "stored_revocations",
    "EvidenceValidator",
    "publish_evidence",
    "find_evidence",
]

log = logging.getLogger(__name__)

#: The index key of a model changes every hour: dead daemons leave the index within ~1 h.
INDEX_EPOCH_SECONDS = 3600.0
#: Daemons also provide the next epoch's key during the last 10 minutes of an epoch.
INDEX_EPOCH_LEAD = 600.0
#: A py-libp2p node keeps 20 providers per key; 4 shards -> up to 80 daemons per model and epoch.
INDEX_SHARDS = 4
#: One DHT RPC (dial + request + answer). A loopback RPC takes milliseconds, a WAN one a few RTTs;
#: 5 s bounds how long one dead peer can hold up a lookup (libp2p's own QUERY_TIMEOUT is 10 s).
RPC_TIMEOUT = 5.0
#: A peer that let a lookup's query to it time out is left out of lookups for this long: one
#: daemon behind NAT (in others' routing tables, but undialable) then costs a node one RPC_TIMEOUT
#: per this period instead of one per lookup stage (walk, then the RPC to each peer it found).
UNRESPONSIVE_SECONDS = 60.0
#: Verdicts of "is this peer a DHT server" probes, kept this long and for this many peers.
_VERDICT_TTL = 600.0
_MAX_VERDICTS = 4096
_MULTIHASH_SHA256 = b"\x12\x20"


class DHTError(PetalsError):
    """The DHT could not be joined or used (no bootstrap peer reachable, ...)."""


# ------------------------------------------------------------------------------------ validator


class PetalsValidator(Validator):
    """Accepts a value under "/petals/<fingerprint>/<peer id>" only if it is a valid record.

    Valid means everything `decode_record` checks (size, structure, signature by the peer the
    record names, not expired, not living longer than MAX_TTL), plus: the peer and fingerprint in
    the record are the ones in the key, so nobody can store a record under another peer's key or
    another model's key. `select` prefers the higher seq (then the later expiry); an invalid
    candidate never wins. `clock` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        fingerprint, peer_id = parse_record_key(key)
        decode_record(value, now=self._clock(), expected_peer_id=peer_id, expected_fingerprint=fingerprint)

    def select(self, key: str, values: list[bytes]) -> int:
        fingerprint, peer_id = parse_record_key(key)
        return select_record(values, now=self._clock(), expected_peer_id=peer_id, expected_fingerprint=fingerprint)


class RevocationsValidator(Validator):
    """Accepts under "/petals-members/<owner>" only a revocation list signed by that owner; the
    higher seq wins (petals_protocol.membership)."""

    def validate(self, key: str, value: bytes) -> None:
        decode_revocations(value, key=key)

    def select(self, key: str, values: list[bytes]) -> int:
        return select_revocations(values, key=key)


class EvidenceValidator(Validator):
    """Accepts a value under "/petals-ev/<fingerprint>/<peer id>" only if it proves that peer
    answered wrong (petals_protocol.evidence): a forged or expired report is refused by every node,
    on store and on read. `select` keeps the report that expires last."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        fingerprint, accused = parse_evidence_key(key)
        decode_report(value, now=self._clock(), expected_fingerprint=fingerprint, expected_accused=accused)

    def select(self, key: str, values: list[bytes]) -> int:
        fingerprint, accused = parse_evidence_key(key)
        return select_report(values, now=self._clock(), expected_fingerprint=fingerprint, expected_accused=accused)


# ------------------------------------------------------------------------------ routing table


T = TypeVar("T")


class _Recent(Generic[T]):
    """A value per peer, believed for `ttl` seconds; at most `_MAX_VERDICTS` peers, the least
    recently set dropped first."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: OrderedDict[ID, tuple[T, float]] = OrderedDict()

    def get(self, peer_id: ID) -> T | None:
        item = self._items.get(peer_id)
        return item[0] if item is not None and time.monotonic() - item[1] < self.ttl else None

    def put(self, peer_id: ID, value: T) -> None:
        self._items[peer_id] = (value, time.monotonic())
        self._items.move_to_end(peer_id)
        while len(self._items) > _MAX_VERDICTS:
            self._items.popitem(last=False)


class ServerOnlyRoutingTable(RoutingTable):
    """A routing table that admits only peers known to serve the KAD protocol.

    py-libp2p adds every peer that sent us a KAD request (`skip_server_mode_check=True`), and
    every peer it is about to query, whether or not that peer answers KAD requests itself;
    client-mode nodes do not, so lookups that later pick them fail. Here a peer enters only when
    identify listed /ipfs/kad/1.0.0 for it or a probe (opening a KAD stream, done in the
    background so no RPC waits for it) succeeded. Verdicts are cached for `_VERDICT_TTL`.
    """

    def __init__(self, local_id: ID, host: IHost) -> None:
        super().__init__(local_id, host)
        self._nursery: trio.Nursery | None = None
        self._verdicts: _Recent[bool] = _Recent(_VERDICT_TTL)
        self._probing: set[ID] = set()

    def attach(self, nursery: trio.Nursery) -> None:
        """Where background probes run; without one, unknown peers are simply not admitted."""
        self._nursery = nursery

    async def add_peer(self, peer_obj: PeerInfo | ID, *, skip_server_mode_check: bool = False) -> bool:
        peer_id = peer_obj.peer_id if isinstance(peer_obj, PeerInfo) else peer_obj
        if peer_id == self.local_id:
            return False
        if self.peer_in_table(peer_id):
            return await super().add_peer(peer_obj, skip_server_mode_check=True)  # refresh last-seen
        verdict = self._known_verdict(peer_id)
        if verdict is None:
            if self._nursery is not None and peer_id not in self._probing:
                self._probing.add(peer_id)
                self._nursery.start_soon(self._probe_and_add, peer_id)
            return False
        if not verdict:
            return False
        return await super().add_peer(peer_obj, skip_server_mode_check=True)

    async def admit(self, peer_id: ID) -> bool:
        """Probe `peer_id` now if needed and add it if it is a DHT server (used while bootstrapping)."""
        verdict = self._known_verdict(peer_id)
        if verdict is None:
            verdict = await self._probe(peer_id)
        return verdict and await super().add_peer(peer_id, skip_server_mode_check=True)

    def _known_verdict(self, peer_id: ID) -> bool | None:
        try:
            protocols = self.host.get_peerstore().get_protocols(peer_id)
        except Exception:  # PeerStoreError for an unknown peer; the peerstore raises nothing narrower
            protocols = []
        if protocols and str(KAD_PROTOCOL) in protocols:
            return True  # identify says so; a peer that lacks it in identify may still be probed
        return self._verdicts.get(peer_id)

    async def _probe(self, peer_id: ID) -> bool:
        """Open (and close) a KAD stream: multistream-select tells whether the peer serves KAD."""
        is_server = False
        with trio.move_on_after(RPC_TIMEOUT):
            try:
                stream = await new_stream(self.host, peer_id, KAD_PROTOCOL)
            except Exception as exc:  # libp2p raises assorted types for "not supported"/"no route"
                log.debug("peer %s is not a DHT server: %s", peer_id, exc)
            else:
                is_server = True
                await stream.close()
        self._verdicts.put(peer_id, is_server)
        return is_server

    async def _probe_and_add(self, peer_id: ID) -> None:
        try:
            if await self._probe(peer_id):
                await super().add_peer(peer_id, skip_server_mode_check=True)
        finally:
            self._probing.discard(peer_id)


class PetalsDHT(KadDHT):
    """KadDHT with the petals validator and a server-only routing table; no random walk."""

    def __init__(self, host: IHost, mode: DHTMode, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(host, mode, enable_random_walk=False)
        self.clock = clock
        self.register_validator(RECORD_NAMESPACE, PetalsValidator(clock))
        self.register_validator(REVOCATIONS_NAMESPACE, RevocationsValidator())
        self.register_validator(EVIDENCE_NAMESPACE, EvidenceValidator(clock))
        # Swap the table before anything uses it; PeerRouting (shared by the provider store) holds
        # its own reference.
        table = ServerOnlyRoutingTable(self.local_peer_id, host)
        self.routing_table = table
        self.peer_routing.routing_table = table
        self.server_table = table
        self.unresponsive: _Recent[bool] = _Recent(UNRESPONSIVE_SECONDS)  # peers a lookup's query timed out on

    def silent(self, peer_id: ID) -> bool:
        """Whether a lookup's query to `peer_id` timed out within UNRESPONSIVE_SECONDS."""
        return self.unresponsive.get(peer_id) is not None

    def note_silent(self, peer_id: ID) -> None:
        self.unresponsive.put(peer_id, True)


class _DropKadNegotiationFailures(logging.Filter):
    """basic_host logs an 8-line ERROR for every stream that fails to open. For the KAD protocol
    that is routine (probing or querying a client-mode peer), so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to open stream") and str(KAD_PROTOCOL) in message)


def _quiet_dht_logs() -> None:
    """kad_dht logs a WARNING per routine RPC and rejected values as hex dumps: ERROR and up only."""
    logger = logging.getLogger("libp2p.kad_dht")
    if logger.getEffectiveLevel() < logging.ERROR:
        logger.setLevel(logging.ERROR)
    host_logger = logging.getLogger("libp2p.host.basic_host")
    if not any(isinstance(f, _DropKadNegotiationFailures) for f in host_logger.filters):
        host_logger.addFilter(_DropKadNegotiationFailures())


async def _run_service(dht: KadDHT, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with background_trio_service(dht):
        task_status.started()
        await trio.sleep_forever()


async def start_dht(
    host: IHost,
    nursery: trio.Nursery,
    *,
    server: bool,
    bootstrap: Iterable[str],
    clock: Callable[[], float] = time.time,
) -> PetalsDHT:
    """Start a Kademlia node on a running host; it lives as long as `nursery`.

    `server=True` for daemons (answers DHT requests, stores records), False for clients (asks
    only, and is never added to anyone's routing table). `bootstrap`: full multiaddrs
    (".../p2p/PEER_ID") of daemons to join through; unreachable ones are logged and skipped.
    Raises DHTError when bootstrap addresses were given but none could be reached (a daemon with
    `--new-swarm` passes none). On return the routing table holds every reachable bootstrap peer
    and every already-connected DHT server, and a self-lookup has run.
    """
    _quiet_dht_logs()
    dht = PetalsDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT, clock=clock)
    dht.server_table.attach(nursery)
    compat.bound_value_store(dht)
    compat.bound_peer_queries(dht, RPC_TIMEOUT, skip=dht.silent, on_timeout=dht.note_silent)
    compat.diversify_providers(dht, lambda peer_id: connection_group(host, peer_id), admit_provider)
    await nursery.start(_run_service, dht)

    addrs = list(bootstrap)
    reached: list[ID] = []
    failures: list[str] = []

    async def dial(addr: str) -> None:
        try:
            reached.append(await connect(host, addr))
        except DialError as exc:
            failures.append(str(exc))

    async with trio.open_nursery() as dials:
        for addr in addrs:
            dials.start_soon(dial, addr)
    if addrs and not reached:
        # One error that carries every cause; logging each as well would say it all twice.
        raise DHTError(f"no initial peer reachable: {'; '.join(failures)}")
    for failure in failures:
        log.warning("DHT bootstrap: skipping an initial peer: %s", failure)

    async with trio.open_nursery() as admits:
        for peer_id in dict.fromkeys([*reached, *host.get_connected_peers()]):
            admits.start_soon(dht.server_table.admit, peer_id)
    if dht.routing_table.size() > 0:
        with trio.move_on_after(4 * RPC_TIMEOUT):
            await dht.peer_routing.find_closest_peers_network(host.get_id().to_bytes())
    log.info("DHT %s mode, %d peers in the routing table", dht.mode.value.lower(), dht.routing_table.size())
    return dht


# ---------------------------------------------------------------------------------- values


async def _closest_peers(dht: PetalsDHT, key: bytes) -> list[ID]:
    """The walk's closest peers, less ourselves and the peers it found silent (asking them again
    would wait RPC_TIMEOUT once more)."""
    with trio.move_on_after(6 * RPC_TIMEOUT):
        peers = await dht.peer_routing.find_closest_peers_network(key)
        return [p for p in peers if p != dht.local_peer_id and not dht.silent(p)]
    return []


async def put_record(dht: PetalsDHT, key: str, blob: bytes) -> int:
    """Validate `blob`, keep it locally (servers) and store it at the k closest peers.

    Returns how many *remote* peers acknowledged storing it (a peer that already holds a newer or
    identical record refuses and is not counted). Raises BadRecord (only) if the blob is not
    valid for `key`: a caller's bug, never a network condition.
    """
    try:
        dht.validator.validate(key, blob)  # type: ignore[union-attr]  # PetalsDHT always has one
    except BadRecord:
        raise
    except Exception as exc:  # libp2p's InvalidRecordType for a key without a validator
        raise BadRecord(f"no validator accepts key {key[:200]!r}: {exc}") from exc
    key_bytes = key.encode("utf-8")
    if not compat.INTERNALS:  # libp2p's own store: no per-peer acknowledgements to count
        await compat.store_everywhere(dht, key_bytes, blob)
        return len(await _closest_peers(dht, key_bytes))
    if dht.mode == DHTMode.SERVER:
        dht.value_store.put(key_bytes, blob)
    stored = 0

    async def store(peer: ID) -> None:
        nonlocal stored
        with trio.move_on_after(RPC_TIMEOUT):
            # Unlike put_value's path, `record` pins the value we store (not a stale local one).
            if await compat.store_at_peer(dht, peer, key_bytes, blob, _signed(dht, key_bytes, blob)):
                stored += 1

    # Store at the closest peers we already know at once, in parallel with the network walk: the
    # walk can spend RPC_TIMEOUT on each unresponsive peer it meets, and an OFFLINE announcement at
    # shutdown must not wait for that. Peers the walk adds get the record when it ends.
    async with trio.open_nursery() as nursery:
        known = [p for p in dht.routing_table.find_local_closest_peers(key_bytes)
                 if p != dht.local_peer_id and not dht.silent(p)]
        for peer in known:
            nursery.start_soon(store, peer)
        for peer in await _closest_peers(dht, key_bytes):
            if peer not in known:
                nursery.start_soon(store, peer)
    return stored


def _signed(dht: KadDHT, key: bytes, value: bytes) -> Record:
    """A libp2p Record envelope for `value`, signed by this host (what PUT_VALUE carries)."""
    return make_signed_put_record(key, value, dht.host.get_private_key())


async def get_fresh(dht: KadDHT, key: str) -> list[bytes]:
    """Every distinct valid value for `key` held by the k closest peers (and locally), best first.

    Always walks the network (never answers from the local copy alone). Values that fail the
    validator (forged, expired, for another key) are dropped. Empty when nobody has a valid one.
    """
    key_bytes = key.encode("utf-8")
    values: list[bytes] = []
    local = dht.value_store.get(key_bytes)
    if local is not None:
        values.append(local.value)
    if not compat.INTERNALS:
        with trio.move_on_after(6 * RPC_TIMEOUT):
            if (value := await compat.get_stock(dht, key_bytes)) is not None:
                values.append(value)
        return _valid_best_first(dht, key, values)

    async def fetch(peer: ID) -> None:
        with trio.move_on_after(RPC_TIMEOUT):
            value = await compat.get_from_peer(dht, peer, key_bytes)
            if value is not None:
                values.append(value)

    async with trio.open_nursery() as nursery:
        for peer in await _closest_peers(dht, key_bytes):
            nursery.start_soon(fetch, peer)
    return _valid_best_first(dht, key, values)


async def _from_connected(dht: KadDHT, key: str) -> list[bytes]:
    """Valid values for `key` held by the peers we already have connections to: one RPC each, in
    parallel, no dial. A daemon behind NAT cannot dial most of the swarm, so a network walk stalls on
    peers only reachable through relays, while its relays (DHT servers it is connected to) store
    every record of a small swarm."""
    if not compat.INTERNALS:
        return []
    key_bytes = key.encode("utf-8")
    values: list[bytes] = []

    async def fetch(peer: ID) -> None:
        with trio.move_on_after(RPC_TIMEOUT):
            try:
                value = await compat.get_from_peer(dht, peer, key_bytes)
            except Exception as exc:  # noqa: BLE001 - a client or a peer without KAD: skip it
                log.debug("connected peer %s gave no value for %s: %s", peer, key[:80], exc)
                return
            if value is not None:
                values.append(value)

    async with trio.open_nursery() as nursery:
        for peer in dht.host.get_connected_peers():
            nursery.start_soon(fetch, peer)
    return _valid_best_first(dht, key, values)


def _valid_best_first(dht: KadDHT, key: str, values: list[bytes]) -> list[bytes]:
    validator = dht.validator
    assert validator is not None
    valid: list[bytes] = []
    for value in dict.fromkeys(values):
        try:
            validator.validate(key, value)
        except Exception as exc:  # BadRecord from ours; libp2p's validators raise their own types
            log.debug("dropped an invalid value for %s: %s", key[:120], exc)
        else:
            valid.append(value)
    if len(valid) > 1:
        best = validator.select(key, valid)
        valid.insert(0, valid.pop(best))
    return valid


# ------------------------------------------------------------------------------- providers

#: Providers a node keeps per key (libp2p's own cap, k).
MAX_PROVIDERS_PER_KEY = 20


def network_group(addr: str) -> str:
    """The network a connection comes from, as Sybil resistance counts it: an IPv4 /24 or an IPv6
    /48 (an attacker gets many peer ids for free, but few networks), or for a relayed connection
    the relay it comes through."""
    parts = addr.split("/")
    if "p2p-circuit" in parts:
        return "relay:" + (parts[parts.index("p2p-circuit") - 1] if "p2p" in parts else addr)
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            net = ipaddress.ip_network(f"{parts[2]}/{24 if parts[1] == 'ip4' else 48}", strict=False)
        except ValueError:
            return addr
        return str(net)
    return addr


def admit_provider(entries: dict[str, tuple[str, float]], peer: str, group: str,
                   cap: int = MAX_PROVIDERS_PER_KEY) -> tuple[bool, str | None]:
    """Whether a node stores `peer` (from network `group`) as a provider of a key that already has
    `entries` (peer -> (group, time added)), and which entry it evicts for it.

    libp2p keeps the first `cap` providers of a key and ignores every later one. Index keys are
    predictable, so Sybil peers providing them early would hide every honest daemon. Here a full
    key still takes a newcomer whose network holds fewer entries than the most represented one: it
    replaces that network's oldest entry. Peers from one network can then hold a key only until
    peers from other networks come; honest daemons spread over networks always get in.
    """
    if peer in entries or len(entries) < cap:
        return True, None
    counts: dict[str, int] = {}
    for entry_group, _added in entries.values():
        counts[entry_group] = counts.get(entry_group, 0) + 1
    crowded = max(counts, key=lambda g: counts[g])
    if counts.get(group, 0) + 1 >= counts[crowded]:
        return False, None
    oldest = min((p for p, (g, _t) in entries.items() if g == crowded), key=lambda p: entries[p][1])
    return True, oldest


def connection_group(host: IHost, peer_id: ID) -> str:
    """`network_group` of the address our connection to `peer_id` really uses (never the addresses
    it claims), or "unknown" (one group for all such peers)."""
    for conn in host.get_network().get_connections(peer_id):
        for addr in conn.get_transport_addresses():
            return network_group(str(addr))
    return "unknown"



async def provide(dht: KadDHT, key: bytes) -> int:
    """Announce this node as a provider of `key` to the k closest peers; how many were sent.

    ADD_PROVIDER has no acknowledgement in py-libp2p (fire-and-forget, like Kubo), so the count is
    of messages delivered to a stream, the best evidence available.
    """
    dht.provider_store.add_provider(key, PeerInfo(dht.local_peer_id, dht.host.get_addrs()))
    if not compat.INTERNALS:
        with trio.move_on_after(6 * RPC_TIMEOUT):
            await compat.provide_stock(dht, key)
        return len(await _closest_peers(dht, key))
    sent = 0

    async def send(peer: ID) -> None:
        nonlocal sent
        with trio.move_on_after(RPC_TIMEOUT):
            if await compat.send_add_provider(dht, peer, key):
                sent += 1

    async with trio.open_nursery() as nursery:
        for peer in await _closest_peers(dht, key):
            nursery.start_soon(send, peer)
    return sent


async def find_providers_fresh(dht: KadDHT, key: bytes) -> list[PeerInfo]:
    """Providers of `key` according to the k closest peers (and the local store), one per peer."""
    found: dict[ID, PeerInfo] = {info.peer_id: info for info in dht.provider_store.get_providers(key)}
    if not compat.INTERNALS:
        with trio.move_on_after(6 * RPC_TIMEOUT):
            for info in await compat.find_providers_stock(dht, key):
                found.setdefault(info.peer_id, info)
        return list(found.values())

    async def ask(peer: ID) -> None:
        with trio.move_on_after(RPC_TIMEOUT):
            for info in await compat.get_providers_from_peer(dht, peer, key):
                known = found.get(info.peer_id)
                if known is None or (not known.addrs and info.addrs):
                    found[info.peer_id] = info

    async with trio.open_nursery() as nursery:
        for peer in await _closest_peers(dht, key):
            nursery.start_soon(ask, peer)
    return list(found.values())


def _epoch(now: float) -> int:
    return math.floor(now / INDEX_EPOCH_SECONDS)


def index_key_for(fingerprint: str, epoch: int, shard: int) -> bytes:
    """The provider key of one shard of a model's index in one epoch (a sha2-256 multihash)."""
    text = f"{model_index_key(fingerprint)}/{epoch}/{shard}"
    return _MULTIHASH_SHA256 + hashlib.sha256(text.encode("utf-8")).digest()


def _shard_of(peer_id_text: str) -> int:
    return hashlib.sha256(peer_id_text.encode("utf-8")).digest()[0] % INDEX_SHARDS


def index_keys(fingerprint: str, *, now: float, peer_id_text: str | None = None) -> list[bytes]:
    """Index keys to use at time `now`.

    With `peer_id_text` (a daemon providing itself): its shard in the current epoch, plus the
    next epoch's when that starts within INDEX_EPOCH_LEAD. Without (a reader): every shard of the
    current epoch.
    """
    epoch = _epoch(now)
    if peer_id_text is None:
        return [index_key_for(fingerprint, epoch, shard) for shard in range(INDEX_SHARDS)]
    shard = _shard_of(peer_id_text)
    keys = [index_key_for(fingerprint, epoch, shard)]
    if _epoch(now + INDEX_EPOCH_LEAD) != epoch:
        keys.append(index_key_for(fingerprint, epoch + 1, shard))
    return keys


async def find_model_records(dht: PetalsDHT, fingerprint: str, *, extra_peers: Iterable[str] = ()) -> list[ServerRecord]:
    """The newest valid record of every daemon that indexed itself under `fingerprint`.

    Reads all index shards in parallel, de-duplicates providers, then fetches each provider's
    record with `get_fresh` (in parallel) and keeps the one with the highest seq. Records that are
    expired, forged or for another model are dropped; offline ones are kept (callers decide).
    `extra_peers`: peer ids (text) to look up even if the index does not list them (e.g. initial
    peers). Time (index epoch, expiry) is the DHT's clock.
    """
    providers: set[str] = set(extra_peers)

    async def read_shard(key: bytes) -> None:
        for info in await find_providers_fresh(dht, key):
            providers.add(info.peer_id.to_base58())

    async with trio.open_nursery() as nursery:
        for key in index_keys(fingerprint, now=dht.clock()):
            nursery.start_soon(read_shard, key)

    records: dict[bytes, ServerRecord] = {}

    async def fetch(peer_text: str) -> None:
        record = await find_server_record(dht, fingerprint, peer_text)
        if record is not None:
            records[record.peer_id] = record

    async with trio.open_nursery() as nursery:
        for peer_text in sorted(providers):
            nursery.start_soon(fetch, peer_text)
    return sorted(records.values(), key=lambda r: (r.start_block, r.end_block, peer_id_to_text(r.peer_id)))


async def find_server_record(dht: PetalsDHT, fingerprint: str, peer_text: str, *,
                             local_first: bool = False) -> ServerRecord | None:
    """The newest valid record of one daemon for `fingerprint` (a network lookup), or None.
    `local_first`: a valid copy this node stores is enough (no network round trip; in a swarm of
    fewer than k daemons every server stores every record)."""
    try:
        key = record_key(fingerprint, peer_text)
    except (ValueError, PetalsError) as exc:
        log.debug("skipping provider %s: %s", peer_text, exc)
        return None
    def decoded(blob: bytes) -> ServerRecord | None:
        try:
            return decode_record(blob, now=dht.clock(), expected_peer_id=peer_id_from_text(peer_text),
                                 expected_fingerprint=fingerprint)
        except BadRecord as exc:  # expired meanwhile
            log.debug("record of %s: %s", peer_text, exc)
            return None

    local = dht.value_store.get(key.encode("utf-8")) if local_first else None
    if local is not None and (record := decoded(local.value)) is not None:
        return record
    if local_first:
        for blob in await _from_connected(dht, key):
            if (record := decoded(blob)) is not None:
                return record
    for blob in await get_fresh(dht, key):  # valid ones, best first
        if (record := decoded(blob)) is not None:
            return record
    return None


async def find_revocations(dht: PetalsDHT, owner: bytes) -> list[bytes]:
    """The valid revocation lists of a members-only swarm that the closest peers and the peers we
    are connected to hold, newest first (a network lookup)."""
    key = revocations_key(owner)
    found = await _from_connected(dht, key)
    return _valid_best_first(dht, key, [*found, *await get_fresh(dht, key)])


def stored_revocations(dht: PetalsDHT, owner: bytes) -> list[bytes]:
    """The revocation list this node stores (a DHT server receives the owner's PUT directly): no
    network round trip, so a revocation takes effect here at the next check."""
    key = revocations_key(owner)
    local = dht.value_store.get(key.encode("utf-8"))
    return _valid_best_first(dht, key, [local.value]) if local is not None else []


# -------------------------------------------------------------------------------- evidence


async def publish_evidence(dht: PetalsDHT, blob: bytes, report: EvidenceReport) -> int:
    """Store a signed evidence report under its accused daemon's key; how many peers acknowledged it."""
    return await put_record(dht, evidence_key(report.model_fingerprint, report.accused_text), blob)


async def find_evidence(dht: PetalsDHT, fingerprint: str, peer_texts: Iterable[str]) -> list[EvidenceReport]:
    """Valid reports about any of `peer_texts` (one network lookup each, in parallel). Forged and
    expired reports are dropped by the validator; what is returned has been verified here."""
    found: list[EvidenceReport] = []

    async def fetch(peer_text: str) -> None:
        try:
            key = evidence_key(fingerprint, peer_text)
        except (ValueError, PetalsError):
            return
        for blob in await get_fresh(dht, key):  # valid ones, best first
            try:
                found.append(decode_report(blob, now=dht.clock(), expected_fingerprint=fingerprint,
                                           expected_accused=peer_id_from_text(peer_text)))
            except BadRecord as exc:  # expired meanwhile
                log.debug("report on %s: %s", peer_text, exc)
                continue
            return

    async with trio.open_nursery() as nursery:
        for peer_text in dict.fromkeys(peer_texts):
            nursery.start_soon(fetch, peer_text)
    return found
