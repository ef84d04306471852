"""One info request and its round trip: how clients and daemons measure the latency to a daemon.

Clients rank daemons by it (client/swarm.py, client/routing.py) and daemons measure the daemons
after their span with it (petalsd/neighbours.py); one way of measuring keeps the two comparable.
The clock starts once the peer is connected (the dial is not a per-step cost) and includes the
stream's opening, as every session's does.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from ..ids import INFO_PROTOCOL
from ..messages import InfoRequest
from .host import connect_any
from .streams import open_stream

__all__ = ["timed_info"]


async def timed_info(host: IHost, addrs: Sequence[str], *, nursery: trio.Nursery) -> tuple[ID, object, float]:
    """(peer id, reply, round-trip seconds) of one InfoRequest to the peer at `addrs` (direct
    addresses first, then relayed ones). Network errors propagate (streams.NETWORK_ERRORS);
    bound it with a cancel scope."""
    peer_id = await connect_any(host, addrs)
    begin = time.perf_counter()
    stream = await open_stream(host, peer_id, INFO_PROTOCOL, nursery=nursery)
    try:
        await stream.send(InfoRequest())
        reply = await stream.receive()
        return peer_id, reply, time.perf_counter() - begin
    finally:
        await stream.aclose()
