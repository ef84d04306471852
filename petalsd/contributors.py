"""Who serves the swarm: the peers a busy daemon computes for first ("points for priority").

A peer is a contributor while a signed record of it is live in the swarm (not expired, not
offline): the daemon's own look-ups of the model's records (`learn`, every members period) bring
them, each already checked against the peer id it names (petals_protocol.records). A client has no
record of its own; a daemon's record may name up to a few client peer ids its operator runs
(`--own-clients`), and those count while that record is live. The peer a job is charged to is the
one that opened the session or sent the request, as authenticated by the connection's Noise
handshake, so nobody can borrow a contributor's priority without its key.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from petals_protocol.records import ServerRecord
from petals_protocol.signing import peer_id_to_text

#: Peer ids shown in /v1/status (the count is always complete).
SHOWN = 16


class Contributors:
    """Live contributors by peer id (text), from the swarm's signed records."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}  # peer id -> expiry of the record that vouches for it

    def learn(self, records: Iterable[ServerRecord]) -> None:
        """Replace what we know with `records` (the swarm's current ones); expired ones never count."""
        until: dict[str, float] = {}
        for record in records:
            if record.state == "offline":
                continue
            for peer in (record.peer_id, *(record.clients or ())):
                text = peer_id_to_text(peer)
                until[text] = max(until.get(text, 0.0), record.expires_at)
        self._until = until

    def __call__(self, peer: str) -> bool:
        """Whether `peer` serves the swarm (or is a client a serving daemon names) right now."""
        return self._until.get(peer, 0.0) > self.clock()

    def describe(self) -> dict[str, Any]:
        now = self.clock()
        live = sorted(peer for peer, until in self._until.items() if until > now)
        return {"count": len(live), "peers": live[:SHOWN]}
