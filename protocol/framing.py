"""Length-prefixed frames: a 4-byte big-endian unsigned length, then that many payload bytes.

Sans-IO: `encode_frame` turns a payload into bytes to write; `FrameDecoder` is fed whatever the
transport delivered and hands back whole payloads. The caller owns the socket/stream.

Bounds (what a hostile peer can make us do):
- Memory: a header announcing more than `max_frame_size` is rejected as soon as its 4 bytes
  arrive, before any of the body is buffered. A caller that extracts every complete frame after
  each `feed` therefore holds at most `max_frame_size + 4` bytes plus one fed chunk.
- Time: linear in the bytes fed. We never re-slice the buffer from the front per frame (which is
  quadratic for a stream of tiny frames); we advance an offset and compact the buffer only when
  the consumed prefix is at least half of it, so each byte is moved O(1) times amortized
  (the same idea as h11's _receivebuffer).
"""

from __future__ import annotations

import struct

from .errors import FrameTooLarge, MalformedMessage

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FRAME_HEADER_SIZE", "encode_frame", "FrameDecoder"]

_HEADER = struct.Struct(">I")
FRAME_HEADER_SIZE = _HEADER.size
# 64 MiB: room for a 4k-token x 4096-hidden fp32 activation batch, small enough that one bad
# header cannot make a daemon allocate gigabytes.
DEFAULT_MAX_FRAME_SIZE = 64 * 2**20
_MAX_ENCODABLE = 2**32 - 1  # what 4 header bytes can express

# Compacting a nearly empty buffer is pointless; below this many consumed bytes we leave it.
_COMPACT_MIN = 64 * 1024


def _check_limit(max_frame_size: int) -> int:
    if isinstance(max_frame_size, bool) or not isinstance(max_frame_size, int):
        raise TypeError(f"max_frame_size must be an int, not {type(max_frame_size).__name__}")
    if not 0 <= max_frame_size <= _MAX_ENCODABLE:
        raise ValueError(f"max_frame_size must be in [0, 2**32 - 1], got {max_frame_size}")
    return max_frame_size


def encode_frame(payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Prefix `payload` with its length; raise FrameTooLarge rather than send what the peer rejects."""
    _check_limit(max_frame_size)
    if len(payload) > max_frame_size:
        raise FrameTooLarge(f"refusing to send a {len(payload)}-byte frame (max {max_frame_size})")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser: `feed(data)` bytes in, `next_frame()` payloads out (None = need data).

    After `eof()`, complete frames still come out of `next_frame()`; a partial frame left in the
    buffer raises MalformedMessage("truncated frame ..."). A FrameTooLarge is sticky: the stream
    cannot be resynchronised, so every later `next_frame()` raises it again.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = _check_limit(max_frame_size)
        self._buf = bytearray()
        self._start = 0  # offset of the first unconsumed byte in _buf
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._start

    @property
    def at_eof(self) -> bool:
        return self._eof

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the transport (any chunking: frames may be split anywhere)."""
        if self._eof:
            raise RuntimeError("FrameDecoder.feed() after eof()")
        self._buf += data

    def _frame_length(self, at: int) -> int:
        (length,) = _HEADER.unpack_from(self._buf, at)
        if length > self.max_frame_size:
            raise FrameTooLarge(f"peer announced a {length}-byte frame (max {self.max_frame_size})")
        return length

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None until enough bytes have been fed."""
        if self.buffered < FRAME_HEADER_SIZE:
            return self._at_end()
        length = self._frame_length(self._start)
        body = self._start + FRAME_HEADER_SIZE
        if len(self._buf) - body < length:
            return self._at_end()
        payload = bytes(self._buf[body : body + length])
        self._start = body + length
        self._maybe_compact()
        return payload

    def pending(self, prefix: int) -> tuple[int, bytes] | None:
        """(length, first bytes) of the next frame once its header has arrived but not all of it:
        lets a receiver judge a large frame by its start before buffering the rest. None when no
        header is pending."""
        if self.buffered < FRAME_HEADER_SIZE:
            return None
        length = self._frame_length(self._start)
        body = self._start + FRAME_HEADER_SIZE
        return length, bytes(self._buf[body : body + min(prefix, length)])

    def _at_end(self) -> None:
        if self._eof and self.buffered:
            raise MalformedMessage(f"truncated frame: stream ended with {self.buffered} bytes of a partial frame")
        return None

    def _maybe_compact(self) -> None:
        if self._start == len(self._buf):
            self._buf.clear()
            self._start = 0
        elif self._start >= _COMPACT_MIN and self._start * 2 >= len(self._buf):
            del self._buf[: self._start]
            self._start = 0

    def eof(self) -> None:
        """Mark the end of input. Raises MalformedMessage now if the buffer ends in a partial frame.

        Complete frames that are still buffered remain available from `next_frame()`.
        """
        self._eof = True
        at = self._start
        while len(self._buf) - at >= FRAME_HEADER_SIZE:
            at += FRAME_HEADER_SIZE + self._frame_length(at)
        if at < len(self._buf):
            raise MalformedMessage(f"truncated frame: stream ended inside a frame header ({len(self._buf) - at} bytes)")
        if at > len(self._buf):
            raise MalformedMessage(f"truncated frame: stream ended {at - len(self._buf)} bytes before the frame's end")

    close = eof
