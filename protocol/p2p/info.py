"""One info request and its round trip: how clients and daemons measure the latency to a daemon.

Clients rank daemons by it (client/swarm.py, client/routing.py) and daemons measure the daemons
after their span with it (petalsd/neighbours.py); one way of measuring keeps the two comparable.
What is timed is one request and its reply on a stream already open and negotiated, which is what
a step costs on a session's stream: neither the dial nor the stream's opening (multistream-select
takes round trips of its own; a session pays them once) is a per-step cost. Timing the opening
too made a 50 ms round trip of the WAN lab measure 170-210 ms (BENCHMARKS.md).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from ..ids import INFO_PROTOCOL
from ..messages import InfoRequest, InfoResponse
from .host import connect_any
from .streams import open_stream

__all__ = ["timed_info"]


async def timed_info(host: IHost, addrs: Sequence[str], *, nursery: trio.Nursery,
                     samples: int = 1) -> tuple[ID, object, float]:
    """(peer id, reply, round-trip seconds) of an InfoRequest to the peer at `addrs` (direct
    addresses first, then relayed ones), timed on a stream that has already carried one: the
    fastest of `samples` such requests, since on a busy machine one sample can carry a scheduling
    delay larger than the differences routing weighs (an answer that is not InfoResponse is
    returned untimed, as infinity). Network errors propagate (streams.NETWORK_ERRORS); bound it
    with a cancel scope."""
    peer_id = await connect_any(host, addrs)
    stream = await open_stream(host, peer_id, INFO_PROTOCOL, nursery=nursery)
    try:
        await stream.send(InfoRequest())
        reply = await stream.receive()  # the stream is open and negotiated now
        fastest = math.inf
        for _ in range(samples):
            if not isinstance(reply, InfoResponse):
                return peer_id, reply, math.inf
            begin = time.perf_counter()
            await stream.send(InfoRequest())
            reply = await stream.receive()
            fastest = min(fastest, time.perf_counter() - begin)
        return peer_id, reply, fastest
    finally:
        await stream.aclose()
