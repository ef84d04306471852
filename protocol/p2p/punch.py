"""TCP hole punching: turn a relayed connection between two peers behind NAT into a direct one.

py-libp2p's DCUtR exchanges addresses and then calls `host.connect`, whose TCP dial leaves from
an ephemeral port, so the NAT mapping it creates is not the one the other side dials, and a
simultaneous open would find both sides acting as the Noise initiator. This module does the
equivalent with what TCP punching needs (docs/py-libp2p.md):
- `/petals/punch/1`, over the relayed connection: the asking peer sends its public IP and the
  port it will dial from, the other answers with its own;
- both bind that port with SO_REUSEADDR/SO_REUSEPORT and dial each other's public address at
  once, again and again for `PUNCH_TIMEOUT` seconds: each outgoing SYN opens the sender's NAT
  for the other's SYN (TCP simultaneous open), which works through NATs that keep the source
  port (Linux masquerading does when the port is free) and filter by established state. A NAT
  that answers the first, unsolicited SYN with a reset instead of dropping it makes this a race
  (each retry must cross the other side's SYN in flight); one that drops it, as home routers'
  firewalls do, lets the kernel's own SYN retransmission complete the simultaneous open;
- the socket is upgraded to a libp2p connection with fixed roles (the asker is the Noise
  initiator), so no simultaneous-open negotiation is needed; the peer id is checked by Noise
  (with the swarm key applied on the asker's side too: `relay.protect_outbound`).
Where the NAT rewrites ports (symmetric NAT) the punch times out and the relay stays in use.
The public IP comes from the dial-back probe (the IP helpers saw).
"""
from __future__ import annotations

import logging
import socket
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from ..errors import PetalsError
from ..framing import FrameDecoder, encode_frame
from .negotiate import new_stream
from .relay import protect_outbound

__all__ = ["PUNCH_PROTOCOL", "PunchError", "PunchService", "punch_tcp"]

log = logging.getLogger("petals_protocol.p2p.punch")

PUNCH_PROTOCOL = "/petals/punch/1"
PUNCH_TIMEOUT = 10.0
_ATTEMPT = 3.0  # one connect attempt: the kernel resends a dropped SYN within it; a refused one is retried
_MAX_MESSAGE = 1024
#: A peer may ask us to punch at most once per this many seconds (each punch dials an address
#: the peer names for PUNCH_TIMEOUT seconds).
MIN_INTERVAL_PER_PEER = 30.0


class PunchError(PetalsError):
    """A hole punch that did not produce a direct connection (the relay stays in use)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


async def punch_tcp(local_port: int, peer_ip: str, peer_port: int, timeout: float = PUNCH_TIMEOUT) -> trio.SocketStream:
    """A TCP connection from `local_port` to peer_ip:peer_port, by simultaneous open: dial until
    the other side's dial has opened our NAT (or `timeout`; PunchError)."""
    with trio.move_on_after(timeout):
        while True:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(("0.0.0.0", local_port))
            try:
                with trio.move_on_after(_ATTEMPT):
                    await sock.connect((peer_ip, peer_port))
                    return trio.SocketStream(sock)
            except OSError:
                pass
            sock.close()
            await trio.sleep(0.02)
    raise PunchError(f"no TCP connection to {peer_ip}:{peer_port} from port {local_port} in {timeout:g} s")


async def _read(stream: Any) -> dict[str, Any]:
    decoder = FrameDecoder(_MAX_MESSAGE)
    while (frame := decoder.next_frame()) is None:
        data = await stream.read(_MAX_MESSAGE)
        if not data:
            raise PunchError("punch stream closed early")
        decoder.feed(data)
    message = msgpack.unpackb(frame, raw=False)
    if not isinstance(message, dict) or not isinstance(message.get("ip"), str) \
            or not isinstance(message.get("port"), int) or not 0 < message["port"] < 65536:
        raise PunchError(f"bad punch message {message!r:.100}")
    return message


async def _write(stream: Any, ip: str, port: int) -> None:
    await stream.write(encode_frame(msgpack.packb({"ip": ip, "port": port}), _MAX_MESSAGE))


class PunchService:
    """Both halves of `/petals/punch/1` on one host. `public_ip()` says which IP others see us
    at (None: we cannot take part, the request is refused)."""

    def __init__(self, host: IHost, public_ip: Any) -> None:
        self.host = host
        self.public_ip = public_ip
        self.punched = 0  # direct connections made by punching (either side)
        self.peers: set[str] = set()  # peers we hold a punched connection with (or did)
        self._last: dict[str, float] = {}

    async def handle(self, stream: Any) -> None:
        """The answering side: reply with our address, punch, upgrade as the Noise responder."""
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(PUNCH_TIMEOUT + 5):
                theirs = await _read(stream)
                now = trio.current_time()
                if now - self._last.get(str(peer), -MIN_INTERVAL_PER_PEER) < MIN_INTERVAL_PER_PEER:
                    raise PunchError("rate limited")
                self._last[str(peer)] = now
                ip = self.public_ip()
                if ip is None:
                    raise PunchError("our public IP is unknown")
                port = _free_port()
                await _write(stream, ip, port)
                log.info("hole punch asked by peer=%s: %s:%d <-> %s:%d", peer, ip, port, theirs["ip"], theirs["port"])
                tcp = await punch_tcp(port, theirs["ip"], theirs["port"])
                raw = RawConnection(TrioTCPStream(tcp), initiator=False)
                muxed = await self.host.upgrade_inbound_connection(
                    raw, Multiaddr(f"/ip4/{theirs['ip']}/tcp/{theirs['port']}"))
                if muxed.peer_id != peer:
                    await muxed.close()
                    raise PunchError(f"punched connection authenticated {muxed.peer_id}, expected {peer}")
            self.punched += 1
            self.peers.add(str(peer))
            log.info("hole punched peer=%s at %s:%d (answering)", peer, theirs["ip"], theirs["port"])
        except Exception as exc:  # noqa: BLE001 - a handler must not take the host down
            log.info("hole punch with peer=%s failed: %s", peer, exc)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def punch(self, peer: ID) -> Any:
        """The asking side, over an open (relayed) connection to `peer`: the new direct
        connection (now in the swarm beside the relayed one), or PunchError."""
        ip = self.public_ip()
        if ip is None:
            raise PunchError("our public IP is unknown")
        port = _free_port()
        try:
            with trio.fail_after(PUNCH_TIMEOUT + 5):
                stream = await new_stream(self.host, peer, PUNCH_PROTOCOL)
                try:
                    await _write(stream, ip, port)
                    theirs = await _read(stream)
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
                log.info("hole punching peer=%s: %s:%d <-> %s:%d", peer, ip, port, theirs["ip"], theirs["port"])
                tcp = await punch_tcp(port, theirs["ip"], theirs["port"])
                raw = RawConnection(TrioTCPStream(tcp), initiator=True)
                conn = await self.host.upgrade_outbound_connection(protect_outbound(self.host, raw), peer)
        except PunchError:
            raise
        except Exception as exc:  # noqa: BLE001 - libp2p's zoo: resets, handshake failures, timeouts
            raise PunchError(f"hole punch with {peer}: {exc}") from exc
        self.punched += 1
        self.peers.add(str(peer))
        log.info("hole punched peer=%s at %s:%d", peer, theirs["ip"], theirs["port"])
        return conn
