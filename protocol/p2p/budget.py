"""`ByteBudget`: how many bytes of unread frames peers may make us hold, per peer and in total.

Each `FramedStream` pump holds what it has read but its consumer has not taken yet (a partial
frame in the decoder, whole frames in the queue). One stream is bounded by its frame size and
queue length; a peer with many streams, or many peers at once, are bounded here: every byte a
pump reads is charged to its peer before it is buffered, and refunded when the consumer takes
the frame (or the stream ends). A charge past either limit fails, and the pump ends that stream
(the peer hears `busy`). O(1) per read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ByteBudget"]


@dataclass
class ByteBudget:
    per_peer: int
    total: int
    used: int = 0
    _by_peer: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # charges refused, for status

    def charge(self, peer: str, nbytes: int) -> bool:
        """Take `nbytes` for `peer`; False (and nothing taken) if a limit would be passed."""
        held = self._by_peer.get(peer, 0)
        if held + nbytes > self.per_peer or self.used + nbytes > self.total:
            self.refused += 1
            return False
        self._by_peer[peer] = held + nbytes
        self.used += nbytes
        return True

    def refund(self, peer: str, nbytes: int) -> None:
        held = self._by_peer.get(peer, 0) - nbytes
        if held > 0:
            self._by_peer[peer] = held
        else:
            self._by_peer.pop(peer, None)
        self.used = max(0, self.used - nbytes)

    def held_by(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)
