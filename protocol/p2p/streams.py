"""`FramedStream`: typed petals messages over one long-lived libp2p stream, always drained.

Two py-libp2p bugs shape this module (docs/py-libp2p.md):
- Bug 2: a yamux sender waits at most 5 s for a window update, then resets the stream. A reader
  that pauses (the consumer is busy, e.g. awaiting torch in a worker thread) would get its peer's
  stream killed. So every FramedStream has a *pump* task that reads continuously and queues whole
  frames in a bounded trio memory channel; the application reads from the queue at its own pace.
- Bug 3: `libp2p.io.utils.read_exactly` gives up after 100 partial reads (messages over ~6.5 MB
  fail). The pump asks yamux for "up to 1 MiB" per read and feeds a sans-IO FrameDecoder, so a
  frame of any allowed size arrives in as many reads as it takes.

Structured concurrency: the pump runs in a nursery the caller owns, either explicitly
(`await nursery.start(framed.pump)`, what `open_stream(..., nursery=)` does) or through the
`open_framed(stream)` context manager, which owns a nursery for the life of its block.

Bounds: at most `max_buffered_frames` frames wait in the queue (plus one in the decoder), so a
peer can make us hold about `(max_buffered_frames + 1) * max_frame_size` bytes. When the queue is
full the pump stops reading: that is backpressure, and a peer that keeps pushing while we do not
consume gets its own stream reset by libp2p after 5 s. Request/response protocols never queue
more than a few frames.

Per-message cost: one msgpack encode, one header+payload concatenation, one stream write (one
yamux frame per 64 KiB, each Noise-encrypted); on receive one copy out of the decoder buffer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio
from libp2p.abc import IHost, INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from ..errors import ErrorCode, PetalsError, ProtocolError
from ..framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, FrameDecoder, encode_frame
from .budget import ByteBudget
from .locking import held
from .compat import make_lean, open_receive_window
from .negotiate import Answers, NegotiationFailed, new_stream
from ..messages import TAG_PREFIX_SIZE, Message, decode_message, encode_message, peek_tag

#: `admit(length, tag)`: judges a large frame from its header and tag (None: not a message's
#: start) before its body is buffered; raises ProtocolError to refuse it (the stream then ends).
Admit = Callable[[int, str | None], None]

__all__ = [
    "DEFAULT_MAX_BUFFERED_FRAMES",
    "DEFAULT_OPEN_TIMEOUT",
    "SLOWEST_LINK_BPS",
    "transfer_allowance",
    "StreamClosed",
    "StreamOpenError",
    "FramedStream",
    "open_framed",
    "open_stream",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BUFFERED_FRAMES = 16
# new_stream and a loopback dial take milliseconds (BENCHMARKS.md, "Connection set-up"); a few
# seconds covers a distant or loaded peer, and a dead one is found out before a client's step
# budget is gone.
DEFAULT_OPEN_TIMEOUT = 10.0
# Ask yamux for up to this much per read. It returns whatever is buffered (never waits to fill
# it), so a large value only means fewer calls when a big frame is streaming in.
_READ_CHUNK = 1 << 20
# Frames up to this size are buffered without asking `admit` (cheap to hold, and most are this small).
_ADMIT_FROM = 64 * 1024
# Payloads from this size up are decoded in a worker thread: msgpack-decoding tens of MiB on the
# loop would hold up every other peer's messages meanwhile.
_DECODE_IN_THREAD_FROM = 1 << 20
# Closing politely (sending our FIN) must not hang a cancelled caller; after this we give up.
_CLOSE_TIMEOUT = 1.0
# Errors the libp2p stream stack raises when the stream or its connection is gone. Raw transport
# errors sometimes escape as trio's resource errors.
_STREAM_GONE = (BaseLibp2pError, trio.ClosedResourceError, trio.BrokenResourceError, OSError)
#: The one set of errors after which another daemon, or a re-opened stream, may succeed (a peer
#: that went away, refused with a typed error, timed out, or a socket that failed): clients retry
#: or reroute on these, and let anything else (a bug) propagate.
NETWORK_ERRORS = (PetalsError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: The slowest link the default deadlines leave time for, in bits/s (a home ADSL uplink). A step's
#: activations are kilobytes for a token and megabytes for a prompt: a 512-token prompt of a
#: 4096-wide model is 8 MiB in fp32, over a minute at this rate and seconds on a 10 Mbit/s uplink
#: or a fast link in TCP slow start. A flat deadline either cut such messages off (a push, a
#: client's step) or let a hung peer hold a token for as long.
SLOWEST_LINK_BPS = 1e6


def transfer_allowance(nbytes: int, legs: int = 1) -> float:
    """Seconds a deadline adds for `nbytes` crossing `legs` links one after another at
    SLOWEST_LINK_BPS: what a message's size costs, on top of what the wait is for otherwise."""
    return legs * nbytes * 8 / SLOWEST_LINK_BPS


class StreamClosed(PetalsError):
    """The stream ended: the peer closed it (`clean`), reset it, the connection died, or we closed it.

    Not the caller's input fault; retry on a new stream or another peer.
    """

    def __init__(self, peer: str | None, protocol: str | None, reason: str, *, clean: bool = False) -> None:
        where = " ".join(part for part in (protocol, f"with {peer}" if peer else None) if part)
        super().__init__(f"stream {where} closed: {reason}" if where else f"stream closed: {reason}")
        self.peer = peer
        self.protocol = protocol
        self.reason = reason
        self.clean = clean


class StreamOpenError(PetalsError):
    """Could not open a stream: no connection/dial failed, protocol not supported, or timed out."""

    def __init__(self, peer: str, protocol: str, reason: str) -> None:
        super().__init__(f"cannot open {protocol} with {peer}: {reason}")
        self.peer = peer
        self.protocol = protocol
        self.reason = reason


class Channel(Protocol):
    """What daemon handlers and client sessions speak to: typed messages to and from one peer.
    `FramedStream` is the real one; tests drive handlers and sessions with in-memory fakes."""

    peer_id: str | None

    async def send(self, msg: object) -> None: ...

    async def receive(self) -> object: ...

    async def aclose(self) -> None: ...


class FramedStream:
    """Send and receive `Message`s (length-prefixed msgpack frames) on one libp2p stream.

    Usage (handler side):

        async def handle(stream: INetStream) -> None:
            async with open_framed(stream) as framed:
                async for request in framed:       # ends when the peer closes cleanly
                    await framed.send(reply_to(request))

    `send` may be called from several tasks: each message goes out in one write under a lock,
    so frames never interleave. `receive` is meant for one consumer task at a time.

    Lifetime: `pump()` must run (in a nursery) for `receive` to make progress. `close()` stops the
    pump, wakes a blocked `receive` with StreamClosed, and sends our FIN; `reset()` aborts instead.
    If the pump is cancelled (its nursery is cancelled), `receive` raises StreamClosed and the
    stream stays open until `close()`/`reset()`: closing is the owner's job, as with any resource.
    """

    def __init__(
        self,
        stream: INetStream,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffered_frames: int = DEFAULT_MAX_BUFFERED_FRAMES,
        budget: ByteBudget | None = None,
        admit: Admit | None = None,
        answers: Answers | None = None,
    ) -> None:
        make_lean(stream)  # far fewer scheduler passes per message in yamux (see compat/yamux.py)
        self.stream = stream
        self.max_frame_size = max_frame_size
        self.peer_id: str | None = _peer_of(stream)
        self.protocol: str | None = _protocol_of(stream)
        self._decoder = FrameDecoder(max_frame_size)  # validates max_frame_size
        self._send_lock = trio.Lock()
        self._frames_in: trio.MemorySendChannel[bytes]
        self._frames_out: trio.MemoryReceiveChannel[bytes]
        self._frames_in, self._frames_out = trio.open_memory_channel(max_buffered_frames)
        self._pump_scope: trio.CancelScope | None = None
        self._pump_started = False
        self._end: PetalsError | None = None  # why the pump stopped, raised once the queue is empty
        self._end_reported = False
        self._closed = False
        self._poisoned = False  # a bad frame was read: the stream ends with a reset, never a FIN
        # Bytes read but not yet taken by the consumer are charged to the peer in `budget`.
        self._budget = budget
        self._budget_peer = self.peer_id or "?"
        self._charged = 0
        self._pump_done = False
        self._admit = admit
        self._frames_read = 0
        self._admitted = -1  # index of the last frame `admit` passed
        self._answers = answers  # set: the stream was opened without waiting (`_read_answers`)

    # -- receiving ---------------------------------------------------------------------------

    async def pump(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Read frames from the stream into the queue until EOF, reset, a bad frame or close().

        Never raises for anything the peer does: the outcome is delivered to `receive()` (after
        the frames queued before it). Compatible with `nursery.start`. Runs at most once.
        """
        if self._pump_started:
            raise RuntimeError("FramedStream.pump() is already running or has run")
        self._pump_started = True
        try:
            with trio.CancelScope() as scope:
                self._pump_scope = scope
                task_status.started()
                async with self._frames_in:
                    with contextlib.suppress(*_STREAM_GONE):  # a dead stream: the reads below say so
                        await open_receive_window(self.stream)
                    self._end = await self._read_frames()
        finally:
            self._pump_done = True
            self._settle()
        if self._end is None:
            self._end = self._closed_error("closed locally" if self._closed else "reader stopped (cancelled)")

    async def _read_frames(self) -> PetalsError:
        """The pump's loop; returns why it ended (cancellation propagates out of it)."""
        decoder = self._decoder
        pending = b""  # bytes read before the loop (behind the multistream answers)
        if self._answers is not None:
            try:
                pending = await self._read_answers(self._answers)
            except NegotiationFailed as exc:
                self._poisoned = True
                return StreamOpenError(self._budget_peer, self.protocol or "?", str(exc))
        while True:
            if pending:
                data, pending = pending, b""
            else:
                try:
                    data = await self.stream.read(_READ_CHUNK)
                except StreamEOF:
                    data = b""
                except _STREAM_GONE as exc:
                    return self._closed_error(_reason(exc, "reset or connection lost"), cause=exc)
            try:
                if not data:
                    decoder.eof()  # raises MalformedMessage if the peer stopped mid-frame
                else:
                    self._charge(len(data))
                    decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    self._frames_read += 1
                    await self._frames_in.send(frame)
                if self._admit is not None and self._admitted != self._frames_read:
                    self._judge(decoder)
            except ProtocolError as exc:
                # The byte stream cannot be resynchronised after a bad frame: stop reading and mark
                # the stream poisoned. The consumer hears of it next and may still *send* (e.g. an
                # ErrorReply saying `too_large`); its close() then resets instead of sending a FIN,
                # so the peer never mistakes the end for a clean one.
                self._poisoned = True
                return exc
            if not data:
                return self._ending()

    async def _read_answers(self, answers: Answers) -> bytes:
        """A stream opened without waiting (negotiate.py): the peer's multistream answers come in
        front of its first frame. Returns the bytes read behind them; NegotiationFailed if it
        refused the protocol or the stream ended first (a refusing peer resets after its "na")."""
        while True:
            try:
                data = await self.stream.read(_READ_CHUNK)
            except (StreamEOF, *_STREAM_GONE):
                data = b""
            if not data:
                answers.eof()
            rest = answers.feed(data)
            if rest is not None:
                return rest

    def _charge(self, nbytes: int) -> None:
        if self._budget is None:
            return
        if not self._budget.charge(self._budget_peer, nbytes):
            raise ProtocolError(ErrorCode.BUSY, f"this peer's unread frames would pass this daemon's buffer "
                                                f"limits ({self._budget.per_peer} bytes per peer, "
                                                f"{self._budget.total} in all); send less at once")
        self._charged += nbytes

    def _refund(self, nbytes: int) -> None:
        if self._budget is not None and nbytes:
            self._budget.refund(self._budget_peer, nbytes)
            self._charged -= nbytes

    def _settle(self) -> None:
        """Once the pump has stopped and the consumer is done, nothing of this stream is held."""
        if self._pump_done and self._closed:
            self._refund(self._charged)

    def _judge(self, decoder: FrameDecoder) -> None:
        """Ask `admit` about the pending frame once its header and tag have arrived (large ones only)."""
        pending = decoder.pending(TAG_PREFIX_SIZE)
        if pending is None:
            return
        length, prefix = pending
        if length <= _ADMIT_FROM:
            self._admitted = self._frames_read
        elif len(prefix) >= TAG_PREFIX_SIZE:
            assert self._admit is not None
            self._admit(length, peek_tag(prefix))
            self._admitted = self._frames_read

    def _ending(self) -> StreamClosed:
        """Why the stream hit EOF. py-libp2p reports a peer's reset and a dead connection as EOF
        too; only a FIN with the connection alive is a clean close (ending `async for`)."""
        muxed = getattr(self.stream, "muxed_stream", None)
        if getattr(muxed, "reset_received", False):
            return self._closed_error("reset by peer")
        conn = getattr(self.stream, "muxed_conn", None)
        shutting_down = getattr(conn, "event_shutting_down", None)
        if shutting_down is not None and shutting_down.is_set():
            return self._closed_error("connection lost")
        return self._closed_error("closed by peer", clean=True)

    async def receive(self) -> Message:
        """The next message. Raises StreamClosed when the stream has ended (see `clean`),
        ProtocolError subclasses for a bad frame (FrameTooLarge: the stream is then dead) or a
        frame that is not a valid message (MalformedMessage/BadTensor: the stream stays usable).
        """
        payload = await self.receive_frame()
        if len(payload) >= _DECODE_IN_THREAD_FROM:
            return await trio.to_thread.run_sync(decode_message, payload)
        return decode_message(payload)

    async def receive_frame(self) -> bytes:
        """The next frame's payload, undecoded (for relaying or benchmarks)."""
        if not self._pump_started:
            raise RuntimeError("FramedStream.receive() needs the pump running: nursery.start(framed.pump)")
        try:
            payload = await self._frames_out.receive()
            self._refund(len(payload) + FRAME_HEADER_SIZE)
            return payload
        except trio.EndOfChannel:
            raise self._take_end() from None
        except trio.ClosedResourceError:
            raise self._closed_error("closed locally") from None

    def _take_end(self) -> PetalsError:
        end = self._end if self._end is not None else self._closed_error("reader stopped")
        if self._end_reported and isinstance(end, ProtocolError):
            # Report a bad frame once; afterwards the stream is simply dead.
            return self._closed_error(f"after a protocol error ({end})")
        self._end_reported = True
        return end

    def __aiter__(self) -> AsyncIterator[Message]:
        """Messages until the peer closes cleanly; other endings raise as in `receive`."""
        return (decode_message(payload) async for payload in self.frames())

    async def frames(self) -> AsyncIterator[bytes]:
        """Frame payloads, undecoded, until the peer closes cleanly (for relaying, echo, benchmarks)."""
        while True:
            try:
                payload = await self.receive_frame()
            except StreamClosed as exc:
                if exc.clean:
                    return
                raise
            yield payload

    # -- sending -----------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send one message. FrameTooLarge if it exceeds `max_frame_size`; StreamClosed if the
        stream is gone (including a peer that stopped reading for 5 s: libp2p resets then).
        Cancellation mid-write leaves a partial frame on the wire: the stream must then be reset.
        """
        await self.send_frame(encode_message(message))

    async def send_frame(self, payload: bytes) -> None:
        """Send one already-encoded payload as a frame."""
        await self._write(encode_frame(payload, self.max_frame_size))

    async def send_many(self, messages: Sequence[Message]) -> None:
        """Send several messages in one stream write. Each write costs a yamux frame, a Noise
        encryption and a syscall on our side and as much again on the reader's, whatever its
        size: a daemon forwarding the steps of a batch to the next daemon sends them this way.
        Every message is checked against `max_frame_size` before anything is written."""
        await self._write(b"".join(encode_frame(encode_message(m), self.max_frame_size) for m in messages))

    async def _write(self, data: bytes) -> None:
        if self._closed:
            raise self._closed_error("closed locally")
        async with held(self._send_lock):
            try:
                await self.stream.write(data)
            except _STREAM_GONE as exc:
                raise self._closed_error(_reason(exc, "reset or connection lost"), cause=exc) from exc

    # -- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop reading, wake a blocked `receive` (StreamClosed), send our FIN (a reset after a bad
        frame was read). Idempotent.

        Safe under cancellation: sending the FIN is shielded for at most 1 s; a cancelled caller
        still gets Cancelled afterwards.
        """
        if self._closed:
            return
        self._stop_reading()
        if self._poisoned:
            await self._abort()
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                await self.stream.close()
            except _STREAM_GONE as exc:
                logger.debug("closing %s: %s", self, exc)

    async def reset(self) -> None:
        """Abort the stream in both directions (the peer sees a reset). Idempotent."""
        if self._closed:
            return
        self._stop_reading()
        await self._abort()

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> FramedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _stop_reading(self) -> None:
        self._closed = True
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        self._frames_out.close()
        self._settle()

    async def _abort(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                await self.stream.reset()
            except _STREAM_GONE as exc:
                logger.debug("resetting %s: %s", self, exc)

    # -- helpers -----------------------------------------------------------------------------

    def _closed_error(self, reason: str, *, clean: bool = False, cause: BaseException | None = None) -> StreamClosed:
        error = StreamClosed(self.peer_id, self.protocol, reason, clean=clean)
        error.__cause__ = cause
        return error

    def __repr__(self) -> str:
        return f"<FramedStream {self.protocol} peer={self.peer_id}>"


@asynccontextmanager
async def open_framed(
    stream: INetStream,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_buffered_frames: int = DEFAULT_MAX_BUFFERED_FRAMES,
    budget: ByteBudget | None = None,
    admit: Admit | None = None,
) -> AsyncIterator[FramedStream]:
    """Wrap `stream`, run its pump for the life of the block, close the stream on exit.

    On exit (normal, error or cancellation) the pump is stopped and our FIN is sent (or the stream
    is reset if the block raised), so nothing outlives the block. An exception from the block
    propagates as itself, not wrapped in an ExceptionGroup.
    """
    framed = FramedStream(stream, max_frame_size=max_frame_size, max_buffered_frames=max_buffered_frames,
                          budget=budget, admit=admit)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(framed.pump)
            try:
                yield framed
            except BaseException:
                await framed.reset()
                raise
            finally:
                await framed.close()
    except BaseExceptionGroup as group:
        # The pump never raises, so a group holds only the block's own exception: re-raise it
        # bare, so that `except StreamClosed:` around this block works as it reads.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def open_stream(
    host: IHost,
    peer_id: ID,
    protocol: str,
    *,
    nursery: trio.Nursery,
    timeout: float = DEFAULT_OPEN_TIMEOUT,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_buffered_frames: int = DEFAULT_MAX_BUFFERED_FRAMES,
) -> FramedStream:
    """Open a `protocol` stream to `peer_id` (dialing a known address if not connected) and start
    its pump in `nursery`, which must outlive the stream. Close it with `await framed.close()`.

    The stream is usable at once: the protocol is proposed without waiting for the peer's answer
    (negotiate.py), so the first message goes out in the same round trip. Raises StreamOpenError
    if the dial fails or after `timeout` seconds; a peer that refuses the protocol makes the
    first `receive()` raise StreamOpenError.
    """
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await new_stream(host, peer_id, protocol, lazy=True)
        except Exception as exc:  # dial failures come in many libp2p types
            raise StreamOpenError(str(peer_id), protocol, _reason(exc, "failed")) from exc
    if scope.cancelled_caught:
        raise StreamOpenError(str(peer_id), protocol, f"timed out after {timeout:g} s")
    framed = FramedStream(stream, max_frame_size=max_frame_size, max_buffered_frames=max_buffered_frames,
                          answers=Answers(peer_id, protocol))
    await nursery.start(framed.pump)
    return framed


def _reason(exc: BaseException, default: str) -> str:
    """libp2p exceptions often have empty messages and the cause one or two levels down."""
    current: BaseException | None = exc
    for _ in range(4):
        if current is None:
            break
        if str(current):
            return f"{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return f"{type(exc).__name__} ({default})"


def _peer_of(stream: INetStream) -> str | None:
    conn = getattr(stream, "muxed_conn", None)
    peer = getattr(conn, "peer_id", None)
    return str(peer) if peer is not None else None


def _protocol_of(stream: INetStream) -> str | None:
    protocol = stream.get_protocol()
    return str(protocol) if protocol is not None else None
