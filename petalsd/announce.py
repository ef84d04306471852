"""The daemon's DHT announcer: re-publish a signed record of what we serve, forever.

Each announce signs a fresh `ServerRecord` (from the daemon's `make_record` callback) with a seq
higher than any before it (unix milliseconds, so a restart never goes back) and
`expires_at = now + ttl`, stores it under "/petals/<fingerprint>/<peer id>" at the k closest DHT
peers, and adds us to the model's index (petals_protocol.p2p.dht). A record is believed until it
expires, so `ttl` must exceed `period` (config enforces it) and a daemon that dies silently
disappears from clients' views within `ttl`.

A DHT failure is never fatal: it costs one log line and the next period retries. Cancellation
(daemon shutdown) propagates as usual.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.abc import IHost

from petals_protocol.p2p.dht import PetalsDHT, index_keys, provide, put_record
from petals_protocol.records import ServerRecord, encode_record, record_key

__all__ = ["Announcer", "INDEX_REPROVIDE_SECONDS"]

log = logging.getLogger("petalsd.announce")

#: Provider entries are not refreshed by py-libp2p within an index epoch; re-send ours this often
#: so a DHT node that restarted (and lost them) learns them again.
INDEX_REPROVIDE_SECONDS = 600.0


class Announcer:
    """Publishes this daemon's record every `period` seconds; `announce_offline` once at drain.

    `make_record()` returns the current record (state, span, throughput, cache room, addrs...);
    its `seq` and `expires_at` are ignored and set here. `clock` is injectable for tests.
    """

    def __init__(
        self,
        host: IHost,
        dht: PetalsDHT,
        signer: Ed25519PrivateKey,
        peer_id_text: str,
        make_record: Callable[[], ServerRecord],
        *,
        period: float,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < period < ttl:
            raise ValueError(f"need 0 < period ({period}) < ttl ({ttl}) so records never lapse")
        self.host = host
        self.dht = dht
        self.signer = signer
        self.peer_id_text = peer_id_text
        self.make_record = make_record
        self.period = period
        self.ttl = ttl
        self._clock = clock
        self._seq = 0
        self._provided: dict[bytes, float] = {}  # index key -> monotonic time it was last sent
        self._wake = trio.Event()
        self.last_record: ServerRecord | None = None
        self.last_stored = 0  # remote peers that acknowledged the last record

    def request_announce(self) -> None:
        """Announce now instead of at the end of the current period (state or span changed)."""
        self._wake.set()

    async def run(self) -> None:
        """Announce, then every `period` seconds (or on `request_announce`), forever."""
        while True:
            await self.announce_once()
            self._wake = trio.Event()
            with trio.move_on_after(self.period):
                await self._wake.wait()

    async def announce_offline(self) -> bool:
        """Publish our record once with state "offline" (SIGTERM drain); False if nobody stored it."""
        return await self.announce_once(state="offline")

    async def announce_once(self, *, state: str | None = None) -> bool:
        """Sign and publish one record (and refresh our index entries). True if any peer stored it."""
        try:
            record = self._next_record(state)
            blob = encode_record(self.signer, record)
            key = record_key(record.model_fingerprint, self.peer_id_text)
            self.last_stored = await put_record(self.dht, key, blob)
            self.last_record = record
            if record.state != "offline":
                await self._provide_index(record.model_fingerprint)
        except trio.Cancelled:
            raise
        except Exception as exc:  # a DHT error must never take the daemon down; log and retry later
            log.warning("announce failed: %s: %s", type(exc).__name__, exc)
            return False
        if self.last_stored == 0:
            # Alone in a new swarm that is expected; otherwise worth a line.
            level = logging.WARNING if self.dht.routing_table.size() > 0 else logging.DEBUG
            log.log(level, "announce seq=%d state=%s stored by no peer", record.seq, record.state)
            return False
        log.debug("announced seq=%d state=%s to %d peers", record.seq, record.state, self.last_stored)
        return True

    def _next_record(self, state: str | None) -> ServerRecord:
        now = self._clock()
        self._seq = max(self._seq + 1, int(now * 1000))
        changes: dict[str, object] = {"seq": self._seq, "expires_at": now + self.ttl}
        if state is not None:
            changes["state"] = state
        return dataclasses.replace(self.make_record(), **changes)

    async def _provide_index(self, fingerprint: str) -> None:
        now = time.monotonic()
        for key in index_keys(fingerprint, now=self._clock(), peer_id_text=self.peer_id_text):
            if now - self._provided.get(key, -INDEX_REPROVIDE_SECONDS) >= INDEX_REPROVIDE_SECONDS:
                if await provide(self.dht, key) > 0:
                    self._provided[key] = now
        for key, sent in list(self._provided.items()):  # forget keys of past epochs
            if now - sent > 4 * INDEX_REPROVIDE_SECONDS + self.period:
                del self._provided[key]
