"""Opening a stream without waiting: multistream-select with the proposal sent ahead.

py-libp2p's `host.new_stream` negotiates in two round trips: it sends the multistream header and
waits for the peer's, then proposes the protocol and waits for the echo. On a WAN every round trip
is tens of milliseconds on the path of whatever opens a stream: a fresh inference session's hops,
a push link's first step, a DHT query, a relay reservation. The multistream-select specification
lets the initiator send its proposal right behind the header, as go-libp2p does; listeners read
each message length-prefixed and exactly (py-libp2p's and go-libp2p's alike), so the proposal,
and anything written after it, waits in the stream until they look for it.

Two ways to use it:
- `new_stream(..., lazy=False)`: header and proposal in one write, then both answers read: one
  round trip (for protocols whose reader is libp2p's own: DHT, relay, punching);
- `new_stream(..., lazy=True)`: header and proposal written, nothing read: the caller sends its
  first message at once and checks the answers in front of the reply with `Answers` (what
  `FramedStream` does): no round trip of its own. A peer that refuses the protocol answers "na"
  and then resets the stream (it reads our first message as a bad proposal); the reader learns it
  from `Answers` as NegotiationFailed.

Everything used here is py-libp2p's public API (the network's unnegotiated `new_stream`, the
multistream communicator, its constants and varint length prefixes, `set_protocol`).
"""
from __future__ import annotations

from typing import NoReturn

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.utils import encode_delim
from libp2p.utils.varint import decode_varint_with_size

#: Longest multistream answer accepted (protocol ids are short; anything longer is not an answer).
MAX_ANSWER = 1024


class NegotiationFailed(Exception):
    """The peer does not speak multistream-select as expected, or refused the protocol."""


def proposal(protocol: str) -> bytes:
    """The header and the proposal, as one write."""
    return encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol.encode())


def check(peer: object, protocol: str, header: str, answer: str) -> None:
    """NegotiationFailed unless the peer answered our header and echoed `protocol`."""
    if header != MULTISELECT_PROTOCOL_ID:
        raise NegotiationFailed(f"peer {peer} answered the multistream header with {header[:80]!r}")
    if answer != protocol:
        if answer == PROTOCOL_NOT_FOUND_MSG:
            raise NegotiationFailed(f"peer {peer} does not serve {protocol}")
        raise NegotiationFailed(f"peer {peer} answered {protocol} with {answer[:80]!r}")


class Answers:
    """The peer's two answers in front of a lazily opened stream's data (sans-IO): `feed` bytes as
    they are read; it returns the bytes after the answers once both are in (None until then)."""

    def __init__(self, peer: object, protocol: str) -> None:
        self.peer, self.protocol = peer, protocol
        self._buffer = b""
        self._answers: list[str] = []

    def feed(self, data: bytes) -> bytes | None:
        self._buffer += data
        while len(self._answers) < 2:
            message = self._next()
            if message is None:
                return None
            self._answers.append(message)
        check(self.peer, self.protocol, *self._answers)
        rest, self._buffer = self._buffer, b""
        return rest

    def eof(self) -> NoReturn:
        """The stream ended before both answers: say how far the negotiation got."""
        if self._answers == [MULTISELECT_PROTOCOL_ID]:
            raise NegotiationFailed(f"peer {self.peer} closed the stream before answering {self.protocol}")
        raise NegotiationFailed(f"peer {self.peer} closed the stream during multistream negotiation")

    def _next(self) -> str | None:
        # An answer of MAX_ANSWER bytes or fewer has a length of at most two bytes.
        length, size = decode_varint_with_size(self._buffer[:3])
        if size == 0 or (self._buffer[size - 1] & 0x80 and size < 3):
            return None  # its length is not all in yet
        if self._buffer[size - 1] & 0x80:
            raise NegotiationFailed(f"peer {self.peer} sent a bad multistream length")
        if not 0 < length <= MAX_ANSWER:
            raise NegotiationFailed(f"peer {self.peer} sent a multistream message of {length} bytes")
        if len(self._buffer) < size + length:
            return None
        message, self._buffer = self._buffer[size:size + length], self._buffer[size + length:]
        if not message.endswith(b"\n"):
            raise NegotiationFailed(f"peer {self.peer} sent a multistream message without its newline")
        return message[:-1].decode(errors="replace")


async def new_stream(host: IHost, peer_id: ID, protocol: str, *, lazy: bool = False) -> INetStream:
    """A stream to `peer_id` (dialled if not connected) speaking `protocol` (see the module
    docstring for `lazy`). NegotiationFailed if the peer refuses it; libp2p's errors for a dial."""
    stream = await host.get_network().new_stream(peer_id)
    try:
        await stream.write(proposal(protocol))
        if not lazy:
            communicator = MultiselectCommunicator(stream)
            check(peer_id, protocol, await communicator.read(), await communicator.read())
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await stream.reset()
            except Exception:  # the stream may already be gone with its connection
                pass
        raise
    stream.set_protocol(TProtocol(protocol))
    return stream
