"""make_host and friends: addresses, dialing, typed errors, private swarms, Noise only."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest
import trio
from libp2p import new_host
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

from petals_protocol.p2p.host import (
    DialError,
    ListenError,
    SwarmKeyError,
    connect,
    listen_multiaddrs,
    load_swarm_key,
    make_host,
    quiet_libp2p_logs,
    running_host,
)
from petals_protocol.p2p.identity import ephemeral_identity, peer_id
from petals_protocol.p2p.streams import open_framed, open_stream

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
PING = "/petals-test/ping/1"


async def _echo(stream) -> None:
    async with open_framed(stream) as framed:
        await framed.send_frame(await framed.receive_frame())


def _can_talk(server_psk: bytes | None, client_psk: bytes | None) -> bool:
    """True if a client with `client_psk` connects to a server with `server_psk` and gets an echo."""

    async def main() -> bool:
        with trio.fail_after(20):
            return await talk()

    async def talk() -> bool:
        server = make_host(ephemeral_identity(), psk=server_psk)
        client = make_host(ephemeral_identity(), psk=client_psk)
        server.set_stream_handler(PING, _echo)
        async with running_host(server, LOOPBACK), running_host(client, LOOPBACK):
            try:
                peer = await connect(client, listen_multiaddrs(server)[0], timeout=1.5)
            except DialError:
                return False
            async with trio.open_nursery() as nursery:
                framed = await open_stream(client, peer, PING, nursery=nursery, timeout=3)
                await framed.send_frame(b"ping")
                assert await framed.receive_frame() == b"ping"
                await framed.close()
            return True

    return trio.run(main)


def test_listen_on_port_zero_reports_full_dialable_addresses() -> None:
    async def main() -> None:
        key_pair = ephemeral_identity()
        host = make_host(key_pair)
        async with running_host(host, LOOPBACK):
            (addr,) = listen_multiaddrs(host)
            maddr = Multiaddr(addr)
            port = int(maddr.value_for_protocol("tcp"))
            assert port != 0
            assert addr == f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id(key_pair)}"
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # something really listens there

    trio.run(main)


def test_connect_is_fast_and_idempotent() -> None:
    async def main() -> None:
        server, client = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        async with running_host(server, LOOPBACK), running_host(client, LOOPBACK):
            addr = listen_multiaddrs(server)[0]
            started = time.perf_counter()
            peer = await connect(client, addr)
            elapsed = time.perf_counter() - started
            assert peer == server.get_id()
            # ~15 ms measured; 250 ms would mean the happy-eyeballs delay is back (bug 1).
            assert elapsed < 0.2, f"connect took {elapsed * 1000:.0f} ms"
            await connect(client, addr)  # already connected: returns at once
            assert client.get_connected_peers() == [peer]

    trio.run(main)


def test_dial_errors_are_typed() -> None:
    async def main() -> None:
        client, other = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        async with running_host(client, LOOPBACK), running_host(other, LOOPBACK):
            with pytest.raises(DialError, match="not a valid peer multiaddr"):
                await connect(client, "/ip4/127.0.0.1/tcp/1")  # no /p2p/ part
            with pytest.raises(DialError, match="not a valid peer multiaddr"):
                await connect(client, "not a multiaddr")

            relay = peer_id(ephemeral_identity())
            relayed = f"/ip4/127.0.0.1/tcp/1/p2p/{relay}/p2p-circuit/p2p/{other.get_id()}"
            with pytest.raises(DialError) as caught:  # dialled through the relay, which is not there
                await connect(client, relayed, timeout=5)
            assert caught.value.addr == relayed and caught.value.peer == str(other.get_id())

            with socket.socket() as closed:  # a port nobody listens on
                closed.bind(("127.0.0.1", 0))
                dead_port = closed.getsockname()[1]
            dead = f"/ip4/127.0.0.1/tcp/{dead_port}/p2p/{peer_id(ephemeral_identity())}"
            with pytest.raises(DialError) as caught:
                await connect(client, dead, timeout=5)
            assert caught.value.addr == dead and caught.value.peer is not None

            # The right address with the wrong peer id: Noise proves who answers.
            port = Multiaddr(listen_multiaddrs(other)[0]).value_for_protocol("tcp")
            impostor = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id(ephemeral_identity())}"
            with pytest.raises(DialError):
                await connect(client, impostor, timeout=5)

    trio.run(main)


def test_dial_to_a_silent_listener_times_out() -> None:
    async def main() -> None:
        client = make_host(ephemeral_identity())
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with running_host(client, LOOPBACK), trio.open_nursery() as nursery:

            async def accept_and_ignore(stream: trio.SocketStream) -> None:
                await trio.sleep_forever()

            nursery.start_soon(trio.serve_listeners, accept_and_ignore, listeners)
            addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id(ephemeral_identity())}"
            started = trio.current_time()
            with pytest.raises(DialError, match="timed out after 0.5 s"):
                await connect(client, addr, timeout=0.5)
            assert trio.current_time() - started < 2
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_port_in_use_is_a_listen_error() -> None:
    async def main() -> None:
        first, second = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        async with running_host(first, LOOPBACK):
            port = Multiaddr(listen_multiaddrs(first)[0]).value_for_protocol("tcp")
            taken = f"/ip4/127.0.0.1/tcp/{port}"
            with pytest.raises(ListenError, match="address already in use") as caught:
                async with running_host(second, [taken]):
                    pass
            assert caught.value.addr == taken
            with pytest.raises(ListenError, match="not a valid multiaddr"):
                async with running_host(second, ["/nonsense"]):
                    pass

    trio.run(main)


def test_same_swarm_key_talks_different_or_missing_key_does_not() -> None:
    key_a, key_b = os.urandom(32), os.urandom(32)
    assert _can_talk(key_a, key_a)
    assert not _can_talk(key_a, key_b)
    assert not _can_talk(key_a, None)
    assert not _can_talk(None, key_a)


def test_plaintext_dialer_is_refused() -> None:
    async def main() -> None:
        server = make_host(ephemeral_identity())
        server.set_stream_handler(PING, _echo)
        key_pair = ephemeral_identity()
        plaintext = new_host(key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)})
        async with running_host(server, LOOPBACK), running_host(plaintext, LOOPBACK):
            with pytest.raises(DialError):
                await connect(plaintext, listen_multiaddrs(server)[0], timeout=5)
            assert server.get_connected_peers() == []

    trio.run(main)


def test_swarm_key_file_format(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "swarm.key"
    path.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{key.hex()}\n")
    assert load_swarm_key(path) == key
    path.write_text(f"/key/swarm/psk/1.0.0/\r\n/base16/\r\n{key.hex().upper()}")  # CRLF, upper case
    assert load_swarm_key(path) == key

    bad = {
        "missing header": f"{key.hex()}\n",
        "base64 encoding": f"/key/swarm/psk/1.0.0/\n/base64/\n{key.hex()}\n",
        "short key": f"/key/swarm/psk/1.0.0/\n/base16/\n{key.hex()[:62]}\n",
        "not hex": "/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32 + "\n",
    }
    for name, content in bad.items():
        path.write_text(content)
        with pytest.raises(SwarmKeyError) as caught:
            load_swarm_key(path)
        assert caught.value.path == path, name
    with pytest.raises(SwarmKeyError, match="cannot read"):
        load_swarm_key(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="32 bytes"):
        make_host(ephemeral_identity(), psk=b"short")


def test_quiet_libp2p_logs_levels_and_truncation() -> None:
    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    quiet_libp2p_logs(logging.WARNING)
    quiet_libp2p_logs(logging.WARNING)  # idempotent: records are forwarded once, not twice
    root, dht = logging.getLogger("libp2p"), logging.getLogger("libp2p.kad_dht")
    assert root.level == logging.WARNING and dht.level == logging.ERROR
    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        logging.getLogger("libp2p.kad_dht.kad_dht").warning("answered a routine RPC")
        logging.getLogger("libp2p.network.swarm").info("chatty detail")
        logging.getLogger("libp2p.network.swarm").warning("record %s", "ab" * 100_000)
    finally:
        logging.getLogger().removeHandler(collect)
    (long_line,) = collect.messages  # the routine DHT warning and the INFO line were dropped
    assert len(long_line) < 1000 and long_line.endswith("[200007 chars]")


def test_every_connection_gets_keepalives_and_a_user_timeout() -> None:
    """Both ends, dialled and accepted: a connection that stops acknowledging is given up after
    DEAD_CONNECTION_AFTER, not after TCP's fifteen minutes (the WAN lab cuts one live connection:
    tests/system/test_wan.py). On the stock libp2p path, TCP's defaults stay."""
    from petals_protocol.p2p import compat
    from petals_protocol.p2p.compat.yamux import _tcp_stream

    def options(host, peer) -> tuple[int, int, int, int] | None:
        conns = host.get_network().connections.get(peer.get_id())
        if not conns:
            return None
        conn = conns[0] if isinstance(conns, list) else conns
        sock = _tcp_stream(conn.muxed_conn.secured_conn).stream.socket
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))

    expected = ((1, compat.KEEPALIVE_IDLE, compat.KEEPALIVE_INTERVAL, int(compat.DEAD_CONNECTION_AFTER * 1000))
                if compat.INTERNALS else None)

    async def main() -> None:
        dialler, listener = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        with trio.fail_after(30):
            async with running_host(listener, LOOPBACK), running_host(dialler, LOOPBACK):
                await connect(dialler, listen_multiaddrs(listener)[0])
                if expected is None:  # stock: no keepalive, no user timeout
                    await trio.sleep(0.1)
                    got = [options(dialler, listener), options(listener, dialler)]
                    assert all(o is not None and o[0] == 0 and o[3] == 0 for o in got), got
                    return
                while options(listener, dialler) != expected:  # its notifee may run a moment later
                    await trio.sleep(0.01)
                assert options(dialler, listener) == expected

    trio.run(main)
