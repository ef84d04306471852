"""Every use of py-libp2p's private names goes through here, behind one version check.

Two things need libp2p internals: the lean yamux/Noise path (`yamux.py` in this package: far fewer scheduler
passes for every message, the receive-window enforcement, bounded frame assembly) and the DHT's
per-peer RPCs (`dht.py`: a network walk that never answers from a stale local copy, and a store
that pins the exact record). Both were written against one libp2p release, `WRITTEN_FOR`. On any
other release, or with `PETALS_LIBP2P_STOCK=1` in the environment (the tests force it to keep the
stock path correct), `INTERNALS` is False and every function here takes libp2p's public API
instead: plain yamux streams (stock speed; stock py-libp2p's own window handling), and the
DHT's `put_value` / `get_value` / `provide` / `find_providers` (with the staleness caveats of
the stock calls). Nothing outside this package names a private libp2p attribute; `yamux.py` is imported only
from here, and only when the version check passes.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import libp2p
import trio

log = logging.getLogger(__name__)

#: The libp2p release the internals below were written against (pinned in pyproject.toml).
WRITTEN_FOR = "0.8.1"
#: Environment variable that forces the stock paths (any non-empty value).
STOCK_ENV = "PETALS_LIBP2P_STOCK"

INTERNALS: bool = getattr(libp2p, "__version__", "") == WRITTEN_FOR and not os.environ.get(STOCK_ENV)

#: Values a DHT node keeps (ours are small signed records; libp2p's own cap is far larger and
#: evicts by scanning every value on each store).
MAX_DHT_VALUES = 4096


def describe() -> str:
    """One line for the startup log."""
    version = getattr(libp2p, "__version__", "?")
    if INTERNALS:
        return f"libp2p {version}: lean yamux and per-peer DHT RPCs"
    why = f"{STOCK_ENV} is set" if os.environ.get(STOCK_ENV) else f"written for {WRITTEN_FOR}"
    return f"libp2p {version}: stock yamux and DHT paths ({why})"


def make_lean(stream: object) -> None:
    """The lean yamux/Noise path for this stream's connection (compat/yamux.py), or nothing."""
    if INTERNALS:
        from .yamux import make_lean as lean

        lean(stream)


#: A connection that has acknowledged nothing for this long, data or keepalive probe, is given up
#: (TCP_USER_TIMEOUT), and one that idles is probed after KEEPALIVE_IDLE seconds. A NAT that forgets
#: its mapping, or a path that fails, leaves a connection dead with no reset to either end: stock
#: TCP retransmits into it for about fifteen minutes, and every push written into it meanwhile is
#: lost (each session through those two daemons then waits out its step timeout and bans the
#: next one). Given up, it is dialled afresh by the next stream to that peer. Long enough for any
#: live path: TCP's own retransmissions back off to seconds, not tens of seconds.
DEAD_CONNECTION_AFTER = 25.0
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL = 10, 5


def keep_alive(conn: object) -> None:
    """Keepalives and the user timeout above on a new connection's TCP socket (compat/yamux.py);
    on the stock path, TCP's defaults."""
    if INTERNALS:
        from .yamux import keep_alive as keep

        keep(conn, DEAD_CONNECTION_AFTER, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL)


#: Receive window every framed stream starts with (compat/yamux.py, `open_receive_window`): what
#: the stock path reaches on the side that accepts a stream, given to both sides.
INITIAL_RECEIVE_WINDOW = 4 * 2**20


async def open_receive_window(stream: object) -> None:
    """The stream's yamux receive window opened to INITIAL_RECEIVE_WINDOW at once (compat/yamux.py);
    on the stock path the window grows only as reads come."""
    if INTERNALS:
        from .yamux import open_receive_window as open_window

        await open_window(stream, INITIAL_RECEIVE_WINDOW)


def send_window_waits(stream: object) -> int:
    """Writes on this libp2p stream that waited for the peer's yamux window (compat/yamux.py);
    0 on the stock path, where it is not read."""
    if INTERNALS:
        from .yamux import send_window_waits as waits

        return waits(stream)
    return 0


# ------------------------------------------------------------------------------------ the DHT

async def store_at_peer(dht: Any, peer: Any, key: bytes, blob: bytes, record: Any) -> bool:
    """PUT_VALUE of exactly `record` to one peer (internals only: see `store_everywhere`)."""
    return bool(await dht.value_store._store_at_peer(peer, key, blob, record=record))


async def store_everywhere(dht: Any, key: bytes, blob: bytes) -> None:
    """The stock store: libp2p's own put_value (local copy and the closest peers)."""
    await dht.put_value(key.decode("utf-8"), blob)


async def get_from_peer(dht: Any, peer: Any, key: bytes) -> bytes | None:
    value = await dht.value_store._get_from_peer(peer, key)
    return value if isinstance(value, bytes) and value else None


async def get_stock(dht: Any, key: bytes) -> bytes | None:
    value = await dht.get_value(key.decode("utf-8"))
    return value if isinstance(value, bytes) and value else None


async def send_add_provider(dht: Any, peer: Any, key: bytes) -> bool:
    return bool(await dht.provider_store._send_add_provider(peer, key))


async def provide_stock(dht: Any, key: bytes) -> bool:
    return bool(await dht.provider_store.provide(key))


async def get_providers_from_peer(dht: Any, peer: Any, key: bytes) -> list[Any]:
    providers, _closer = await dht.provider_store._get_providers_from_peer_with_closers(peer, key)
    return list(providers)


async def find_providers_stock(dht: Any, key: bytes) -> list[Any]:
    return list(await dht.provider_store.find_providers(key))


def bound_peer_queries(dht: Any, timeout: float, *, skip: Callable[[Any], bool],
                       on_timeout: Callable[[Any], None]) -> None:
    """Bound each peer's answer in a network walk (`find_closest_peers_network`) by `timeout`: a
    peer that does not answer in time counts as having named no one, and `on_timeout(peer)` is
    told; a peer for which `skip(peer)` holds is not asked at all. libp2p 0.8.1 waits on each peer
    until its dial gives up (a TCP dial to a router that drops it: minutes), so one daemon behind
    NAT in the routing table held every lookup until the caller's bound on the whole walk.
    Stock: left as it is."""
    if not INTERNALS:
        return
    routing = dht.peer_routing
    query = routing._query_peer_for_closest

    async def bounded(peer: Any, target_key: bytes) -> list[Any]:
        if skip(peer):
            return []
        with trio.move_on_after(timeout):
            return await query(peer, target_key)
        if not skip(peer):  # walks running side by side may each have been waiting on it
            log.info("DHT peer %s did not answer within %g s: left out of lookups for a while", peer, timeout)
        on_timeout(peer)
        return []

    routing._query_peer_for_closest = bounded


def bound_value_store(dht: Any, max_values: int = MAX_DHT_VALUES) -> None:
    """Cap the node's value store at `max_values` with O(1) eviction of the longest-held value
    (libp2p 0.8.1 keeps 50,000 and scans them all on every store once full: Sybil peers each
    storing a valid record of their own would make every store O(n)). Stock: left as it is."""
    if not INTERNALS:
        return
    store = dht.value_store

    def evict_if_full() -> None:
        while len(store.store) >= max_values:
            del store.store[next(iter(store.store))]  # insertion order: the longest-held first

    store._evict_if_full = evict_if_full


def diversify_providers(dht: Any, group_of: Callable[[Any], str],
                        admit: Callable[[dict[str, tuple[str, float]], str, str], tuple[bool, str | None]]) -> None:
    """Store providers by `admit` (dht.admit_provider: a full key still takes peers from networks
    it under-represents) instead of libp2p's "first 20 ever". `group_of(peer_id)`: the network the
    provider's connection comes from. Stock: left as it is (first come, first kept)."""
    if not INTERNALS:
        return
    store = dht.provider_store
    local = dht.local_peer_id
    stock_add = store.add_provider
    groups: dict[bytes, dict[str, str]] = {}  # key -> provider -> its network when it was added

    def add_provider(key: bytes, provider: Any) -> None:
        if len(groups) > 2 * len(store.providers) + 64:  # keys libp2p expired meanwhile
            for stale in [k for k in groups if k not in store.providers]:
                del groups[stale]
        held = store.providers.get(key, {})
        known = groups.setdefault(key, {})
        for gone in [peer for peer in known if peer not in held]:
            del known[gone]
        peer = str(provider.peer_id)
        group = "self" if provider.peer_id == local else known.get(peer) or group_of(provider.peer_id)
        entries = {p: (known.get(p, "unknown"), record.timestamp) for p, record in held.items()}
        ok, evict = admit(entries, peer, group)
        if not ok:
            log.debug("provider %s (%s) not stored for a full key: its network already holds as many", peer, group)
            return
        if evict is not None:
            del held[evict]
            known.pop(evict, None)
        known[peer] = group
        stock_add(key, provider)
        if not store.providers.get(key):
            groups.pop(key, None)

    store.add_provider = add_provider
