"""`make_lean`: yamux under a framed stream takes its free locks without scheduler passes, and still
moves every byte in order, with flow control, under concurrency and with a swarm key."""

from __future__ import annotations

import hashlib
import socket
import os
from collections.abc import Awaitable, Callable

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from petals_protocol.errors import PetalsError
from petals_protocol.p2p.host import connect, listen_multiaddrs, make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.locking import Eager
from petals_protocol.p2p.compat import INITIAL_RECEIVE_WINDOW, send_window_waits
from petals_protocol.p2p.compat.yamux import _tcp_stream, make_lean
from petals_protocol.p2p.streams import open_framed, open_stream

ECHO = TProtocol("/test/echo/1")
REPLY_THEN_RESET = TProtocol("/test/reply-then-reset/1")
LEAN_ECHO = TProtocol("/test/lean-echo/1")
FRAMED_ECHO = "/test/framed-echo/1"


class _Passes(trio.abc.Instrument):
    """Counts passes of the run loop (each one waits for I/O once, maybe with a zero timeout)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def _raw_echo(stream: INetStream) -> None:
    """A stock handler: the stream is never made lean."""
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:  # the client closed or reset: the test is over
        pass


async def _lean_echo(stream: INetStream) -> None:
    make_lean(stream)
    await _raw_echo(stream)


async def _framed_echo(stream: INetStream) -> None:
    try:
        async with open_framed(stream) as framed:
            async for frame in framed.frames():
                await framed.send_frame(frame)
    except PetalsError:  # the client reset mid-frame: the test is over with this stream
        pass


async def _reply_then_reset(stream: INetStream) -> None:
    """Answers the first frame, then resets at once: the reply and the RST leave back to back."""
    async with open_framed(stream) as framed:
        frame = await framed.receive_frame()
        await framed.send_frame(b"reply to " + frame)
        await framed.reset()


def _with_pair(body: Callable[[IHost, IHost], Awaitable[None]], *, psk: bytes | None = None) -> None:
    """Run `body(client, server)` with two connected hosts in this process."""

    async def main() -> None:
        server, client = make_host(ephemeral_identity(), psk=psk), make_host(ephemeral_identity(), psk=psk)
        server.set_stream_handler(ECHO, _raw_echo)
        server.set_stream_handler(LEAN_ECHO, _lean_echo)
        server.set_stream_handler(TProtocol(FRAMED_ECHO), _framed_echo)
        server.set_stream_handler(REPLY_THEN_RESET, _reply_then_reset)
        with trio.fail_after(60):
            async with running_host(server, ["/ip4/127.0.0.1/tcp/0"]), \
                    running_host(client, ["/ip4/127.0.0.1/tcp/0"]):
                await connect(client, listen_multiaddrs(server)[0])
                await body(client, server)

    trio.run(main)


async def _echo_passes(stream: INetStream, payload: bytes, rounds: int) -> float:
    """Scheduler passes per echo of `payload` on `stream` (a raw stream; the server echoes)."""
    passes = _Passes()
    trio.lowlevel.add_instrument(passes)
    try:
        for _ in range(rounds):
            await stream.write(payload)
            got = 0
            while got < len(payload):
                got += len(await stream.read(65536))
    finally:
        trio.lowlevel.remove_instrument(passes)
    return passes.count / rounds


def _noise_is_lean(stream: INetStream) -> bool:
    session = stream.muxed_stream.conn.secured_conn  # type: ignore[attr-defined]
    return "read" in vars(session) and "write" in vars(session)


def _assert_lean(stream: INetStream) -> None:
    muxed = stream.muxed_stream  # type: ignore[attr-defined]
    assert isinstance(muxed, YamuxStream)
    for owner, name in [(stream, "_state_lock"), (muxed, "window_lock"), (muxed, "close_lock"),
                        (muxed.rw_lock, "_writer_lock"), (muxed.conn, "streams_lock"), (muxed.conn, "_write_lock")]:
        assert isinstance(getattr(owner, name), Eager), name
    tcp = _tcp_stream(muxed.conn.secured_conn)
    assert tcp is not None and isinstance(tcp.read_lock, Eager) and isinstance(tcp.write_lock, Eager)
    assert "_write_frame" in vars(muxed.conn)
    assert "_auto_tune_and_send_window_update" in vars(muxed)


def test_lean_yamux_takes_far_fewer_scheduler_passes_per_message() -> None:
    """Stock yamux: ~26 run-loop passes per echo on the client side (measured in two processes).
    Here both peers share one loop, so passes of either side count (both stock, then both lean:
    32 and 10 when written), and the lean path must at least halve them."""
    result: dict[str, float] = {}

    async def body(client: IHost, server: IHost) -> None:
        peer = server.get_id()
        payload = os.urandom(4096)
        stock = await client.new_stream(peer, [ECHO])
        await _echo_passes(stock, payload, 10)  # warm up
        result["stock"] = await _echo_passes(stock, payload, 200)
        await stock.close()
        lean = await client.new_stream(peer, [LEAN_ECHO])  # the server makes its end lean too
        make_lean(lean)
        _assert_lean(lean)
        await _echo_passes(lean, payload, 10)
        result["lean"] = await _echo_passes(lean, payload, 200)
        await lean.close()

    _with_pair(body)
    assert result["lean"] <= result["stock"] / 2, result


def test_window_updates_wait_for_half_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stock py-libp2p answers every read with a WINDOW_UPDATE frame (measured: 2 per echo, one
    per side); lean streams credit the peer once half the receive window has been read, as go-yamux
    does, so the peer is never owed more than half a window."""
    sent = {"updates": 0}
    stock_send = YamuxStream.send_window_update

    async def counted(self: YamuxStream, increment: int, skip_lock: bool = False) -> None:
        sent["updates"] += increment > 0
        await stock_send(self, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    result: dict[str, int] = {}

    async def body(client: IHost, server: IHost) -> None:
        peer = server.get_id()
        payload = os.urandom(60_000)  # 300 echoes: 18 MB each way, several windows' worth
        for name, protocol in (("stock", ECHO), ("lean", LEAN_ECHO)):
            stream = await client.new_stream(peer, [protocol])
            if name == "lean":
                make_lean(stream)
            sent["updates"] = 0
            await _echo_passes(stream, payload, 300)
            result[name] = sent["updates"]
            if name == "lean":
                muxed = stream.muxed_stream  # type: ignore[attr-defined]
                buffered = len(muxed.conn.stream_buffers.get(muxed.stream_id, b""))
                owed = muxed.target_recv_window - (muxed.recv_window + buffered)
                assert 0 <= owed < muxed._grow_threshold(), (owed, muxed.target_recv_window)
            await stream.close()

    _with_pair(body)
    assert result["stock"] >= 2 * 300, result  # what stock does (if not, this test is stale)
    assert 0 < result["lean"] <= result["stock"] / 10, result


def test_framed_streams_are_lean_on_both_ends_and_move_bytes_intact_under_concurrency() -> None:
    """Eight framed streams at once, each echoing frames bigger than yamux's 256 KiB window (so
    window updates flow while the locks are contended) and small ones, in order."""
    sizes = [1, 4096, 700_000, 33, 1_500_000, 12]

    async def body(client: IHost, server: IHost) -> None:
        async def one(i: int, nursery: trio.Nursery) -> None:
            framed = await open_stream(client, server.get_id(), FRAMED_ECHO, nursery=nursery)
            _assert_lean(framed.stream)
            try:
                for size in sizes:
                    frame = hashlib.sha256(f"{i}/{size}".encode()).digest() * (size // 32 + 1)
                    frame = frame[:size]
                    await framed.send_frame(frame)
                    assert await framed.receive_frame() == frame
            finally:
                await framed.close()

        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as streams:
                for i in range(8):
                    streams.start_soon(one, i, nursery)
        # the server's accepted streams went through FramedStream too: its side of the connection
        # (found through the server host's connection to the client) is lean as well
        conns = server.get_network().connections.get(client.get_id())
        conn = conns[0] if isinstance(conns, list) else conns
        assert "_write_frame" in vars(conn.muxed_conn)
        assert isinstance(conn.muxed_conn.streams_lock, Eager)

    _with_pair(body)


@pytest.mark.parametrize("psk", [None, bytes(range(32))], ids=["noise", "noise+swarm-key"])
def test_the_tcp_locks_are_found_with_and_without_a_swarm_key(psk: bytes | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames of every size arrive intact; with plain Noise the DATA frames skip yamux's own frame
    handling (its `_read_data_body` is never reached), with a swarm key the stock path runs."""
    stock_bodies = {"reads": 0}
    stock_read_data_body = Yamux._read_data_body

    async def counted(self: Yamux, length: int) -> bytes:
        stock_bodies["reads"] += 1
        return await stock_read_data_body(self, length)

    monkeypatch.setattr(Yamux, "_read_data_body", counted)

    async def body(client: IHost, server: IHost) -> None:
        async with trio.open_nursery() as nursery:
            framed = await open_stream(client, server.get_id(), FRAMED_ECHO, nursery=nursery)
            _assert_lean(framed.stream)
            # the Noise session's reads and writes go straight to TCP only without the swarm
            # key's extra cipher layer, which keeps the stock path
            assert _noise_is_lean(framed.stream) == (psk is None)
            # One round trip first: the stream was opened without waiting for the peer
            # (negotiate.py), and the server's side of the connection turns lean only when its
            # handler wraps its first stream; frames racing ahead of that take the stock path.
            await framed.send_frame(b"warm")
            assert await framed.receive_frame() == b"warm"
            stock_bodies["reads"] = 0
            for frame in (b"ping", os.urandom(70_000), b"", os.urandom(200_000), b"pong"):
                await framed.send_frame(frame)
                assert await framed.receive_frame() == frame
            await framed.close()
            assert (stock_bodies["reads"] == 0) == (psk is None), stock_bodies

    _with_pair(body, psk=psk)


def test_both_sides_of_a_framed_stream_start_with_the_initial_receive_window() -> None:
    """The side that opened a stream reads multistream's answers itself (negotiate.py), so stock
    yamux would leave its receive window at 256 KiB: a large first reply would then wait a round
    trip per window on a long link. Both sides get INITIAL_RECEIVE_WINDOW at once instead."""
    async def body(client: IHost, server: IHost) -> None:
        async with trio.open_nursery() as nursery:
            framed = await open_stream(client, server.get_id(), FRAMED_ECHO, nursery=nursery)
            await framed.send_frame(b"ping")
            assert await framed.receive_frame() == b"ping"
            muxed = framed.stream.muxed_stream  # type: ignore[attr-defined]
            assert muxed.target_recv_window == INITIAL_RECEIVE_WINDOW  # our side's credit to the server
            assert muxed.send_window >= INITIAL_RECEIVE_WINDOW - 64  # the server's credit to us
            big = os.urandom(3 * 2**20)  # under either window: crosses without waiting for an update
            await framed.send_frame(big)
            assert await framed.receive_frame() == big
            assert send_window_waits(framed.stream) == 0
            await framed.close()

    _with_pair(body)


def test_a_reply_followed_by_a_reset_reaches_the_reader_first() -> None:
    """yamux drops a stream's unread data when it processes a RST; the lean reader hands DATA
    frames over without yielding, so it must let readers run before passing a RST up (a daemon's
    error reply followed by a reset, e.g. for a frame over the limit, must not be lost)."""
    from petals_protocol.p2p.streams import StreamClosed

    async def body(client: IHost, server: IHost) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                framed = await open_stream(client, server.get_id(), str(REPLY_THEN_RESET), nursery=nursery)
                await framed.send_frame(b"%d" % i)
                with trio.fail_after(10):
                    assert await framed.receive_frame() == b"reply to %d" % i
                    with pytest.raises(StreamClosed):
                        await framed.receive_frame()
                await framed.reset()

    _with_pair(body)


def test_other_muxers_and_plain_objects_are_left_alone() -> None:
    class NotAStream:
        muxed_stream = object()

    make_lean(NotAStream())  # no yamux under it: nothing to do, no error
    make_lean(object())


def test_send_window_waits_counts_writes_that_waited_for_the_peer_window() -> None:
    """A write larger than the window the peer granted must wait for its WINDOW_UPDATE: the
    counter the WAN benchmark reads to tell a window-bound transfer from a link-bound one."""
    from petals_protocol.p2p.compat import send_window_waits

    result: dict[str, int] = {}
    sink = TProtocol("/test/slow-sink/1")

    async def slow_sink(stream: INetStream) -> None:
        """Reads only after a pause, as a far or busy peer does: the writer runs out of window."""
        make_lean(stream)
        await trio.sleep(0.3)
        got = 0
        while got < result["size"]:
            got += len(await stream.read(65536))
        await stream.write(b"done")

    async def body(client: IHost, server: IHost) -> None:
        server.set_stream_handler(sink, slow_sink)
        stream = await client.new_stream(server.get_id(), [sink])
        make_lean(stream)
        result["fresh"] = send_window_waits(stream)
        result["size"] = 2 * stream.muxed_stream.send_window + 1  # type: ignore[attr-defined]
        await stream.write(os.urandom(result["size"]))
        assert await stream.read(4) == b"done"
        result["after"] = send_window_waits(stream)
        await stream.close()

    _with_pair(body)
    assert result["fresh"] == 0 and result["after"] > 0, result
    assert send_window_waits(object()) == 0


def test_a_write_cancelled_mid_frame_costs_its_stream_only() -> None:
    """A framed write cancelled part-way (a push past its deadline) must cost only its own stream.
    Stock, the half-written yamux frame (half a Noise message) cut the connection's byte stream,
    and every other stream of the connection was lost with it. Here the server stops reading its
    socket (small buffers at both ends) so that the client's write is stuck inside a frame when its
    deadline passes; the server reads again a little later."""

    async def body(client: IHost, server: IHost) -> None:
        peer = server.get_id()
        async with trio.open_nursery() as nursery:
            doomed = await open_stream(client, peer, FRAMED_ECHO, nursery=nursery)
            await doomed.send_frame(b"hello")
            assert await doomed.receive_frame() == b"hello"  # both ends are lean now
            conns = server.get_network().connections.get(client.get_id())
            conn = conns[0] if isinstance(conns, list) else conns
            noise = conn.muxed_conn.secured_conn.read.__self__  # the server's _LeanNoise
            gate = trio.Event()
            recv = noise._recv

            async def gated(n: int) -> bytes:
                await gate.wait()
                return await recv(n)

            noise._recv = gated
            noise._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tcp = _tcp_stream(doomed.stream.muxed_stream.conn.secured_conn)  # type: ignore[attr-defined]
            assert tcp is not None
            tcp.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

            async def read_again_later() -> None:
                await trio.sleep(0.4)
                gate.set()

            payload = os.urandom(8 << 20)
            nursery.start_soon(read_again_later)
            with trio.move_on_after(0.2) as cut:
                await doomed.send_frame(payload)
            assert cut.cancelled_caught and gate.is_set()  # held off until its frame was whole
            await doomed.reset()
            other = await open_stream(client, peer, FRAMED_ECHO, nursery=nursery)
            with trio.fail_after(10):
                await other.send_frame(b"the connection is whole")
                assert await other.receive_frame() == b"the connection is whole"
            await other.close()

    _with_pair(body)


def test_a_frame_that_cannot_be_written_closes_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame begun is finished before cancellation takes effect, but not forever: a connection
    that takes no bytes for FRAME_WRITE_LIMIT is closed (and the writer told), not left half-written."""
    from libp2p.network.connection.exceptions import RawConnError

    from petals_protocol.p2p.compat import yamux as lean

    monkeypatch.setattr(lean, "FRAME_WRITE_LIMIT", 0.2)

    class Stuck:
        closed = False
        written = b""

        async def write(self, data: bytes) -> None:
            self.written += data[:10]  # part of it, then the socket takes nothing more
            await trio.sleep_forever()

        async def close(self) -> None:
            self.closed = True

    class Conn:
        peer_id = "12D3KooWtest"

        def __init__(self) -> None:
            self._write_lock = trio.Lock()
            self.secured_conn = Stuck()

    async def main() -> None:
        conn = Conn()
        with trio.move_on_after(0.05) as scope:  # the writer's own deadline comes first: held off
            with pytest.raises(RawConnError, match="stalled"):
                await lean._write_frame(conn, b"x" * 100)  # type: ignore[arg-type]
        assert not scope.cancelled_caught and conn.secured_conn.closed
        late = Conn()
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await lean._write_frame(late, b"y" * 100)  # type: ignore[arg-type]
        assert cancelled.cancelled_caught and late.secured_conn.written == b""  # nothing begun

    trio.run(main)
