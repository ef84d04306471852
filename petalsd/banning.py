"""Cutting off a peer that used up its strikes (petalsd/limits.py): close its connections now,
and every new one from it as soon as it is up, until its ban ends.

A flood refused stream by stream still costs the daemon a stream negotiation per stream; a
closed connection costs the flooder a new dial and Noise handshake before it can try again, and
that connection is closed at once. Closing happens in one task the daemon's nursery owns (the
libp2p notifee only queues the peer; closing from inside the notifee would run in the swarm's
own connection setup).
"""
from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import INetConn, INetwork

from petals_protocol.p2p.host import NetworkEvents

from .limits import PeerGate

log = logging.getLogger("petalsd.banning")

#: Peers waiting to be cut off; a flooder reconnecting faster than we close is dropped from the
#: queue, not buffered without bound (its next connection queues it again).
QUEUE_SIZE = 256


class _CutOnConnect(NetworkEvents):
    def __init__(self, gate: PeerGate, queue: trio.MemorySendChannel[str]) -> None:
        self.gate = gate
        self.queue = queue

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = str(conn.muxed_conn.peer_id)
        if self.gate.banned(peer):
            try:
                self.queue.send_nowait(peer)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass



class Banning:
    """`cut(peer)` closes a banned peer's connections; `run()` (in the daemon's nursery) does the
    closing, and closes new connections of banned peers as they arrive."""

    def __init__(self, host: Any, gate: PeerGate) -> None:
        self.host = host
        self.gate = gate
        self._send, self._receive = trio.open_memory_channel[str](QUEUE_SIZE)

    def cut(self, peer: str) -> None:
        try:
            self._send.send_nowait(peer)
        except trio.WouldBlock:
            pass

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        network = self.host.get_network()
        notifee = _CutOnConnect(self.gate, self._send)
        network.register_notifee(notifee)
        try:
            task_status.started()
            async for peer in self._receive:
                await self._close(network, peer)
        finally:
            network.remove_notifee(notifee)

    async def _close(self, network: Any, peer: str) -> None:
        for peer_id, conns in list(network.get_connections_map().items()):
            if str(peer_id) != peer:
                continue
            # Forget where it listens: libp2p re-dials peers it knows addresses of when their
            # connection drops, which would bring the banned peer straight back.
            self.host.get_peerstore().clear_addrs(peer_id)
            for conn in list(conns):
                log.info("closing connection of banned peer=%s", peer)
                with trio.move_on_after(2.0):
                    try:
                        await conn.close()
                    except Exception as exc:  # noqa: BLE001 - a connection already half gone
                        log.debug("closing banned peer=%s: %r", peer, exc)
