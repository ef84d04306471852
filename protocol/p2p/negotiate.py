"""Opening a stream in one round trip: multistream-select with the proposal sent ahead.

py-libp2p's `host.new_stream` negotiates in two round trips: it sends the multistream header and
waits for the peer's, then proposes the protocol and waits for the echo. On a WAN every round trip
is tens of milliseconds on the path of whatever opens a stream: a fresh inference session's hops,
a push link, a DHT query, a relay reservation. The multistream-select specification lets the
initiator send its proposal right behind the header, as go-libp2p does; both answers then come
back together. Listeners read each message length-prefixed and exactly (py-libp2p's and
go-libp2p's alike), so the pipelined proposal waits in the stream until they look for it.

Everything used here is py-libp2p's public API (the network's unnegotiated `new_stream`, the
multistream communicator and its constants, `set_protocol`).
"""
from __future__ import annotations

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator


class NegotiationFailed(Exception):
    """The peer does not speak multistream-select as expected, or refused the protocol."""


async def new_stream(host: IHost, peer_id: ID, protocol: str) -> INetStream:
    """A stream to `peer_id` (dialled if not connected) speaking `protocol`, negotiated in one
    round trip. Raises NegotiationFailed if the peer refuses it; libp2p's errors for a failed dial."""
    stream = await host.get_network().new_stream(peer_id)
    try:
        communicator = MultiselectCommunicator(stream)
        await communicator.write(MULTISELECT_PROTOCOL_ID)
        await communicator.write(protocol)  # without waiting for the header's answer
        header = await communicator.read()
        if header != MULTISELECT_PROTOCOL_ID:
            raise NegotiationFailed(f"peer {peer_id} answered the multistream header with {header[:80]!r}")
        answer = await communicator.read()
        if answer != protocol:
            refused = answer == PROTOCOL_NOT_FOUND_MSG
            raise NegotiationFailed(f"peer {peer_id} {'does not serve' if refused else 'answered'} "
                                    f"{protocol}{'' if refused else f' with {answer[:80]!r}'}")
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await stream.reset()
            except Exception:  # the stream may already be gone with its connection
                pass
        raise
    stream.set_protocol(TProtocol(protocol))
    return stream
