"""`make_lean(stream)`: py-libp2p's yamux and Noise, same bytes on the wire, far fewer scheduler passes per message.

Every message a petals peer sends or receives crosses py-libp2p's yamux and Noise layers, which take
a `trio.Lock` (or a one-slot `trio.Semaphore`) over and over for every message: the connection's
stream table and write lock, the stream's window, close and read/write locks, the TCP stream's
read and write locks, and the state lock of the `NetStream` on top. Trio makes every acquire a checkpoint, so each one, free or not, costs a
whole pass of the run loop (an epoll call and the run queue), and `_write_frame` adds one more
explicit checkpoint after each write. On loopback those passes are most of a message's round
trip, several times what raw TCP takes, and a token crosses three hops (the counts and timings:
BENCHMARKS.md, "Lean yamux and Noise").

What changes: those locks are wrapped in `Eager` (`protocol.p2p.locking`): a free lock is taken at
once, a busy one is waited for exactly as before (fairly, cancellably). Mutual exclusion, frame
order and flow control are yamux's own, untouched. The blocks they guard still yield: every
socket operation ends with a scheduler pass of its own (trio's `cancel_shielded_checkpoint` after
each successful send or receive), so no loop in yamux can spin without letting others run.
`_write_frame` skips the per-frame debug formatting (an f-string evaluated even with debug logging
off) and the extra checkpoint (the socket write just yielded), and writes a frame all or nothing:
stock, a writer cancelled mid-frame cuts the connection's byte stream for every stream on it
(`_write_frame` says how a WAN run found it).

Window updates: stock py-libp2p 0.8.1 answers *every* read with a WINDOW_UPDATE frame (its
"release on read" and "partial slack" rules), so each message costs its reader one more frame
encrypted and written before the data reaches it, and its sender one more wake-up to read that
frame. Lean streams credit the peer once half the receive window has been read, go-yamux's rule,
which py-libp2p's own window code implements for that case (`_release_window`): fewer frames
written and fewer wake-ups per message (figures: BENCHMARKS.md, "Lean yamux and Noise").

Noise and DATA frames: a plain Noise-over-TCP session (no swarm key) reads and writes its messages
straight on the TCP stream, skipping the msgio / RawConnection ladder, and hands plain DATA frames
to their stream itself instead of through `handle_incoming`'s per-frame code (`_LeanNoise`; same
socket calls, cipher states, bytes and exceptions, every other frame to yamux), without a
scheduler pass after every socket read: a shorter echo and less loop-thread CPU per decode token
(figures: BENCHMARKS.md, "Lean yamux and Noise").

Not done, on purpose: buffering the TCP stream's reads (Noise reads each message in two `recv`s;
a buffer saved passes per echo, BENCHMARKS.md). yamux drops a stream's unread data when it processes
a RST, and with a buffer a reply and the RST right behind it are processed back to back, before
the reader runs: a daemon's error reply followed by a reset (a frame over the limit) never reached
the client (tests/integration/test_bad_input.py caught it).

How: py-libp2p builds its `Yamux` itself (a muxer class passed to `new_host` is ignored for the
yamux protocol id), so `make_lean` adapts the objects under a stream instead, once per stream
(`FramedStream` calls it on every stream it wraps, opened or accepted) and idempotently: the
stream's own locks, its connection's (shared by all its streams) and the TCP stream's; and it
gives the connection object a `_write_frame` of its own. Wire-compatible with any yamux peer.
Written against libp2p 0.8.1 (pinned in pyproject.toml); the locks it wraps are found by name,
and a lock that is missing or of another type is left as it is, so a future release degrades to
stock speed, not to wrong behaviour (tests/p2p/test_lean_yamux.py checks that the
wrapping happened).
"""
from __future__ import annotations

import errno
import logging
import socket
import struct
from types import MethodType
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError, IOException
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise.io import MAX_NOISE_MESSAGE_LEN, MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_WINDOW_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)
from libp2p.stream_muxer.yamux.yamux import _yamux_data_read_timeout as yamux_data_read_timeout

from ..locking import Eager

__all__ = ["FRAME_WRITE_LIMIT", "keep_alive", "make_lean", "send_window_waits"]

logger = logging.getLogger(__name__)

# DATA frames handled back to back (data already in the socket) before the reader yields anyway.
_FRAMES_PER_YIELD = 8
# Bytes read from a socket that keeps having data before the reader yields anyway (a peer
# streaming a large frame must not hold the loop while it arrives).
_BYTES_PER_YIELD = 256 * 1024
#: The longest one yamux frame (64 KiB at most) may take to go into the socket once begun, holding
#: off its task's cancellation meanwhile (`_write_frame`): a home uplink at 1 Mbit/s takes half a
#: second, TCP's retransmission backoff a few more; past this the connection is taken for dead.
FRAME_WRITE_LIMIT = 10.0


class ReceiveWindowExceeded(RawConnError):
    """The peer sent a DATA frame larger than the receive window we granted it: go-yamux closes
    the session (ErrRecvWindowExceeded), and so do we (raised from a header read, yamux tears the
    connection down); stock py-libp2p only logs it and keeps the bytes, without bound."""

# How a connection's secured session reaches its TCP stream: SecureSession.conn ->
# NoiseTransportReadWriter.read_writer -> NoisePacketReadWriter.read_write_closer -> RawConnection
# (or, with a swarm key, PskConn._conn -> RawConnection) .stream -> TrioTCPStream.
_LINKS = ("conn", "read_writer", "read_write_closer", "_conn", "stream")
_MAX_DEPTH = 8


def _eager(owner: object, name: str) -> None:
    """Wrap `owner.name` in `Eager`. Safe even while a task holds or waits for the lock: the
    wrapper keeps no state of its own, so holders and waiters of the bare lock and of the wrapper
    exclude and queue behind one another (a task blocked reading the socket holds the TCP read lock
    whenever a stream is opened)."""
    lock = getattr(owner, name, None)
    if isinstance(lock, trio.Lock | trio.Semaphore):  # not: absent, of another kind, already wrapped
        setattr(owner, name, Eager(lock))


def _tcp_stream(conn: object) -> TrioTCPStream | None:
    """The TCP stream under a secured connection, or None if the chain is not the expected one."""
    obj: Any = conn
    for _ in range(_MAX_DEPTH):
        if isinstance(obj, TrioTCPStream):
            return obj
        obj = next((getattr(obj, link) for link in _LINKS if getattr(obj, link, None) is not None), None)
        if obj is None:
            return None
    return None


async def _release_window(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Credit the peer with the bytes read only once half the receive window has been read (the
    rule of go-yamux, whose window updates py-libp2p says it mirrors). Stock py-libp2p 0.8.1 sends a
    WINDOW_UPDATE after every read instead: one more frame written, encrypted and sent before each
    message reaches its reader, and one more frame the sender's loop wakes up for."""
    del bytes_read  # a read is credited through the window itself: what was read is no longer buffered
    buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
    if self.target_recv_window - (self.recv_window + buffered) >= self._grow_threshold():
        await YamuxStream._auto_tune_and_send_window_update(self)


async def _write_frame(self: Yamux, data: bytes) -> None:
    """`Yamux._write_frame` without its debug formatting and its extra checkpoint (the socket write
    has just yielded), and all or nothing.

    Stock, a task cancelled while its frame is part-way into the socket (a push past its deadline,
    a session closed mid-write) leaves half a frame, or half a Noise message, on the connection:
    the peer reads the next frames' bytes as the rest of it, and every stream of the connection is
    lost with it, not just the cancelled one. On a WAN that is no corner case: a 2 MiB prefill
    pushed over a link in slow start outlasted the push deadline, and the connection between the
    two daemons then carried nothing (DHT requests included) for minutes. So a frame, once begun,
    is finished under a shield (a frame is at most 64 KiB), and cancellation takes effect between
    frames, where the byte stream is whole. A frame that cannot be finished within
    `FRAME_WRITE_LIMIT` means a connection that is torn or dead either way: it is closed, so both
    ends see it fail at once instead of waiting on it."""
    await trio.lowlevel.checkpoint_if_cancelled()  # nothing written yet: cancel here, cleanly
    async with self._write_lock:
        # shielded from the writer's own cancellation, not from this scope's deadline
        with trio.CancelScope(shield=True, deadline=trio.current_time() + FRAME_WRITE_LIMIT) as late:
            await self.secured_conn.write(data)
        if late.cancelled_caught:
            logger.warning("peer=%s: a %d-byte yamux frame was not written within %.0f s; closing the "
                           "connection (its byte stream is cut mid-frame)", self.peer_id, len(data),
                           FRAME_WRITE_LIMIT)
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.secured_conn.close()
            raise RawConnError(f"frame write to {self.peer_id} stalled for {FRAME_WRITE_LIMIT:.0f} s; connection closed")


class _LeanNoise:
    """A Noise session's reads and writes straight on the TCP stream, and yamux DATA frames handed
    to their stream's buffer as they are read.

    Stock, a message read goes SecureSession -> NoiseTransportReadWriter -> NoisePacketReadWriter
    (msgio) -> read_exactly -> RawConnection -> TrioTCPStream twice over (the 2-byte length, then
    the ciphertext), a write down the same ladder, and `Yamux.handle_incoming` then spends a few
    hundred lines of per-frame code (header, flag names, debug strings, timeout scope) on every
    DATA frame: about fifty Python frames a message, which a daemon runs cold after every compute
    step. Here:

    - the same socket calls (one `receive_some` for the length, then the body; one `send_all` of
      length + ciphertext, under the TCP stream's own locks and error mapping), the same Noise
      cipher states, the same bytes on the wire, the same exceptions upwards
      (ConnectionClosedError, IncompleteReadError, RawConnError);
    - when yamux reads a frame header, a plain DATA frame (no flags) for an open stream is handled
      here as `handle_incoming` handles it (body appended to the stream's buffer under the
      connection's stream lock, receive window charged, reader woken; the body read bounded by
      yamux's own data-read timeout), and the next header is read; every other frame (SYN, ACK,
      FIN, RST, window updates, pings, go-away, unknown streams, oversized frames) is passed up to
      yamux untouched. Body reads are told apart from header reads by yamux's own
      `_read_data_body`, wrapped;
    - a socket read that finds data does not yield (trio's socket yields after every successful
      call, and a message takes two). Yields are kept where they matter: before a frame
      is passed up to yamux, a reader woken by data delivered since gets two passes to take it
      (yamux drops a stream's unread data when it processes a RST; stock gave readers those two
      passes through its socket reads), and every 8 frames handled without waiting for the socket.
      Fewer passes per round trip (BENCHMARKS.md, "Lean yamux and Noise").

    Only for the plain Noise-over-TCP layout; with a swarm key (an extra cipher layer) or any other
    layout the session is left as it is.
    """

    def __init__(self, session: SecureSession, noise: NoiseTransportReadWriter, tcp: TrioTCPStream) -> None:
        self.session = session
        self.noise = noise
        self.tcp = tcp
        self.conn: Yamux | None = None  # set by `deliver_data_to`
        self._buf = b""  # plaintext of the last message not yet read (after the stock buffer's)
        self._off = 0
        self._in_body = False  # yamux is reading a frame body (inside its _read_data_body)
        sock = getattr(getattr(tcp.stream, "socket", None), "_sock", None)
        self._sock: socket.socket | None = sock if isinstance(sock, socket.socket) else None
        self._frames_unyielded = 0  # frames handled since this task last yielded (fairness)
        self._bytes_unyielded = 0  # bytes read since this task last yielded (fairness)
        # Data handed to a stream (by us or by yamux) whose reader may not have run yet, and the
        # yields since: a RST processed before the reader runs would drop that data.
        self._delivered = False
        self._yields_since_delivery = 0

    def deliver_data_to(self, conn: Yamux) -> None:
        self.conn = conn
        stock = conn._read_data_body

        async def read_data_body(length: int) -> bytes:
            self._in_body = True
            try:
                return await stock(length)
            finally:
                self._in_body = False

        conn._read_data_body = read_data_body  # type: ignore[method-assign]

    async def _recv(self, n: int) -> bytes:
        """Up to `n` bytes from the socket, b"" at its end: `TrioTCPStream.read` (the same errors:
        ConnectionClosedError when the peer broke the connection, b"" once closed here), except that
        a read that finds data does not yield (trio's socket yields after every successful call).
        Yields happen where ordering needs them (`_next_header`) and whenever the socket is empty."""
        sock = self._sock
        if sock is None:
            return await self.tcp.read(n)
        while True:
            try:
                data = sock.recv(n)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    return b""  # closed here (trio: ClosedResourceError, which TrioTCPStream reads as EOF)
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}", transport="tcp") from exc
            else:
                self._bytes_unyielded += len(data)
                if self._bytes_unyielded > _BYTES_PER_YIELD:
                    await trio.lowlevel.checkpoint()
                    self._bytes_unyielded = 0
                    self._yields_since_delivery += 1
                return data
            self._frames_unyielded = 0
            self._bytes_unyielded = 0
            self._yields_since_delivery += 1
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                return b""

    async def _receive_exactly(self, n: int) -> bytes:
        parts: list[bytes] = []  # pieces joined once at the end, not copied per piece
        got = 0
        while got < n:
            try:
                chunk = await self._recv(n - got)
            except ConnectionClosedError:
                raise
            except (IOException, ConnectionResetError) as error:  # as RawConnection.read
                raise RawConnError from error
            if not chunk:
                raise IncompleteReadError(f"Connection closed during read operation: expected {n} bytes but "
                                          f"received {got} bytes", expected_bytes=n, received_bytes=got)
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _take(self, n: int) -> bytes:
        """Up to `n` bytes already decrypted: the stock buffer's first (a stock read in flight when
        the session was made lean may have left some there), then ours."""
        data = self.session._drain(n)
        if not data and self._off < len(self._buf):
            data = self._buf[self._off:self._off + n]
            self._off += len(data)
        return data

    async def _plain(self, n: int) -> bytes:
        """Up to `n` bytes of plaintext, reading one Noise message if nothing is buffered."""
        data = self._take(n)
        if data:
            return data
        length = int.from_bytes(await self._receive_exactly(2), "big")
        msg = self.noise.decrypt(await self._receive_exactly(length))
        if len(msg) > n:
            self._buf, self._off = msg, n
            return msg[:n]
        return msg

    async def _plain_exactly(self, n: int) -> bytes:
        data = await self._plain(n)
        if len(data) == n:
            return data
        parts, got = [data], len(data)  # a frame body over many Noise messages: joined once
        while got < n:
            part = await self._plain(n - got)
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    async def read(self, n: int | None = None) -> bytes:
        """Up to `n` bytes of plaintext (callers loop with `read_exactly`, as yamux does)."""
        if n == 0:
            return b""
        if n is None:
            return await self._plain(MAX_NOISE_MESSAGE_LEN)
        if n == HEADER_SIZE and self.conn is not None and not self._in_body:
            return await self._next_header(self.conn)
        return await self._plain(n)

    async def _next_header(self, conn: Yamux) -> bytes:
        """The next frame header yamux should see, after delivering plain DATA frames ourselves."""
        while True:
            header = await self._plain_exactly(HEADER_SIZE)
            version, typ, flags, stream_id, length = struct.unpack(YAMUX_HEADER_FORMAT, header)
            if typ == TYPE_DATA:
                _check_window(conn, stream_id, length)
            if version or typ != TYPE_DATA or flags or not 0 < length <= MAX_WINDOW_SIZE \
                    or stream_id not in conn.streams or conn.event_shutting_down.is_set():
                # This one may be a RST, which makes yamux drop the stream's unread data: a reader
                # woken by data delivered just before must run first. It runs in the batch after
                # its wake-up, which is also the earliest this task can resume after a yield
                # (trio runs a batch in random order), so two yields are needed, as stock's two
                # socket reads per frame gave.
                while self._delivered and self._yields_since_delivery < 2:
                    await trio.lowlevel.checkpoint()
                    self._yields_since_delivery += 1
                self._delivered = typ == TYPE_DATA and length > 0  # yamux delivers it
                self._yields_since_delivery = 0
                return header
            if self._frames_unyielded >= _FRAMES_PER_YIELD:  # a peer streaming fast: others run too
                await trio.lowlevel.checkpoint()
                self._frames_unyielded = 0
                self._yields_since_delivery += 1
            with trio.fail_after(yamux_data_read_timeout()):
                body = await self._plain_exactly(length)
            async with conn.streams_lock:  # what Yamux.handle_incoming does with a DATA frame's body
                stream = conn.streams.get(stream_id)
                if stream is None:
                    continue  # the stream went away meanwhile: yamux drops such data too
                conn.stream_buffers[stream_id].extend(body)
                stream.recv_window -= len(body)  # never below 0: _check_window refused the header
                conn.stream_events[stream_id].set()
                if stream.closed:
                    conn._finalize_stream_locked(stream, fully_closed=True)
                self._frames_unyielded += 1
                self._delivered = True
                self._yields_since_delivery = 0

    async def write(self, data: bytes) -> None:
        if len(data) > MAX_PLAINTEXT_LENGTH:  # several Noise messages: the stock path chunks them
            await self.noise.write_msg(data)
            return
        encrypted = self.noise.encrypt(data)
        try:
            await self.tcp.write(len(encrypted).to_bytes(2, "big") + encrypted)
        except ConnectionClosedError:
            raise
        except (IOException, ConnectionResetError) as error:  # as RawConnection.write
            raise RawConnError from error


def _check_window(conn: Yamux, stream_id: int, length: int) -> None:
    """A DATA frame must fit the receive window granted for its stream. A peer that ignores it is
    cut off, as go-yamux does; stock py-libp2p only logs it and buffers the bytes anyway, so one
    peer could make us hold any amount. A stream not (or no longer) in the table may have had its
    window grown before it ended (data sent before our reset reached the peer): the largest
    window any stream gets bounds it."""
    stream = conn.streams.get(stream_id)
    window = stream.recv_window if stream is not None else MAX_WINDOW_SIZE
    if length > window:
        logger.warning("peer=%s stream %d: a %d-byte DATA frame exceeds the %d-byte receive window; "
                       "closing the connection", conn.peer_id, stream_id, length, window)
        raise ReceiveWindowExceeded(f"peer exceeded the receive window of stream {stream_id} "
                                    f"({length} > {window} bytes)")


def _lean_noise(conn: Yamux) -> None:
    """Give a yamux connection's plain Noise-over-TCP session `_LeanNoise`; leave any other alone."""
    session = conn.secured_conn
    noise = getattr(session, "conn", None)
    packets = getattr(noise, "read_writer", None)
    raw = getattr(packets, "read_write_closer", None)
    if type(session) is not SecureSession or type(noise) is not NoiseTransportReadWriter \
            or type(raw) is not RawConnection or not isinstance(raw.stream, TrioTCPStream):
        return
    lean = _LeanNoise(session, noise, raw.stream)
    lean.deliver_data_to(conn)
    session.read = lean.read  # type: ignore[method-assign]
    session.write = lean.write  # type: ignore[method-assign]


def _lean_connection(conn: Yamux) -> None:
    if "_write_frame" in vars(conn):
        return  # done for an earlier stream of this connection
    _eager(conn, "streams_lock")
    _eager(conn, "_write_lock")
    tcp = _tcp_stream(conn.secured_conn)
    if tcp is not None:
        _eager(tcp, "read_lock")
        _eager(tcp, "write_lock")
    _lean_noise(conn)
    conn._write_frame = MethodType(_write_frame, conn)  # type: ignore[method-assign]


def keep_alive(conn: object, dead_after: float, idle: int, interval: int) -> bool:
    """TCP keepalives and a user timeout on the TCP socket under a libp2p connection (`INetConn`):
    probes after `idle` s without traffic, every `interval` s, and the connection is given up once
    sent data or probes have gone unacknowledged for `dead_after` s. False if the connection has no
    TCP socket of its own (a relayed one: its relay's connection has these options)."""
    tcp = _tcp_stream(getattr(getattr(conn, "muxed_conn", None), "secured_conn", None))
    sock = getattr(getattr(tcp, "stream", None), "socket", None)
    if sock is None:
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, round((dead_after - idle) / interval)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))
    return True


def make_lean(stream: object) -> None:
    """Make the yamux objects under a libp2p stream (`INetStream`) lean; other muxers are left be."""
    muxed = getattr(stream, "muxed_stream", None)
    if not isinstance(muxed, YamuxStream):
        return
    _eager(stream, "_state_lock")  # NetStream checks its state under it on every read and write
    for name in ("window_lock", "close_lock"):
        _eager(muxed, name)
    muxed._auto_tune_and_send_window_update = MethodType(_release_window, muxed)  # type: ignore[method-assign]
    rw_lock = getattr(muxed, "rw_lock", None)
    for name in ("_readers_lock", "_writer_lock"):
        _eager(rw_lock, name)
    if isinstance(muxed.conn, Yamux):
        _lean_connection(muxed.conn)


async def open_receive_window(stream: object, size: int) -> None:
    """Credit the peer at once with `size` bytes of receive window on this stream (if it has less).

    Stock py-libp2p starts a yamux stream at 256 KiB and doubles the window only as reads come
    (one doubling per window update within four round trips). The side that accepts a stream reads
    multistream-select's messages through that stock path and so starts with megabytes; the side
    that opened it reads the answers itself (negotiate.py) and would stay at 256 KiB, so a large
    first reply (a prefill's hidden states, to a client) would wait a round trip for each window's
    worth on a long link."""
    muxed = getattr(stream, "muxed_stream", None)
    if not isinstance(muxed, YamuxStream):
        return
    async with muxed.window_lock:
        grow = size - muxed.target_recv_window
        if grow <= 0:
            return
        muxed.target_recv_window = size
        muxed.recv_window += grow
    await muxed.send_window_update(grow)  # outside the lock, as py-libp2p requires


def send_window_waits(stream: object) -> int:
    """How many times writes on a libp2p stream found the peer's receive window used up and had to
    wait for a WINDOW_UPDATE (py-libp2p counts them on every yamux stream): the evidence that a
    transfer was bound by the window rather than the link. 0 for other muxers."""
    muxed = getattr(stream, "muxed_stream", None)
    return int(getattr(muxed, "_zero_window_waits", 0)) if isinstance(muxed, YamuxStream) else 0
