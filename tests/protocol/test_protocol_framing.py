"""Length-prefixed framing: splits at every byte, size limits from the header alone, EOF rules."""

from __future__ import annotations

import struct
import time

import pytest

from petals_protocol import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, FrameTooLarge, MalformedMessage, encode_frame

PAYLOADS = [b"", b"x", b"hello world", bytes(range(256)) * 3, b"\x00\x00\x00\x05"]


def drain(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_encode_frame_layout() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert DEFAULT_MAX_FRAME_SIZE == 64 * 2**20


def test_encode_frame_refuses_oversized_payload() -> None:
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(b"x" * 11, max_frame_size=10)
    assert info.value.code.value == "too_large"
    assert encode_frame(b"x" * 10, max_frame_size=10)[4:] == b"x" * 10


def test_whole_stream_at_once() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(p) for p in PAYLOADS))
    assert drain(decoder) == PAYLOADS
    assert decoder.buffered == 0


def test_split_at_every_byte_boundary() -> None:
    stream = b"".join(encode_frame(p) for p in PAYLOADS)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.feed(stream[:cut])
        got = drain(decoder)
        decoder.feed(stream[cut:])
        got += drain(decoder)
        assert got == PAYLOADS, cut
        decoder.eof()


def test_byte_by_byte_feed() -> None:
    stream = b"".join(encode_frame(p) for p in PAYLOADS)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got += drain(decoder)
    assert got == PAYLOADS


def test_oversized_header_rejected_before_body_is_buffered() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.feed(struct.pack(">I", 1001))
    assert decoder.buffered == 4  # nothing but the header was needed to decide
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    with pytest.raises(FrameTooLarge):  # sticky: the stream cannot be resynchronised
        decoder.next_frame()


def test_max_header_value_rejected_with_default_limit() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_frame_at_exact_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=5)
    decoder.feed(encode_frame(b"12345", max_frame_size=5))
    assert decoder.next_frame() == b"12345"


def test_partial_frame_returns_none_until_complete() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is None
    decoder.feed(b"\x00\x02a")
    assert decoder.next_frame() is None
    assert decoder.buffered == 5
    decoder.feed(b"b")
    assert decoder.next_frame() == b"ab"


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x09abc"])
def test_eof_with_partial_frame_is_truncation(tail: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"whole") + tail)
    with pytest.raises(MalformedMessage, match="truncated frame"):
        decoder.eof()
    # complete frames before the truncation are still delivered, then the truncation is reported
    assert decoder.next_frame() == b"whole"
    with pytest.raises(MalformedMessage, match="truncated frame"):
        decoder.next_frame()


def test_eof_after_whole_frames_is_clean() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"a") + encode_frame(b"b"))
    decoder.eof()
    assert drain(decoder) == [b"a", b"b"]
    with pytest.raises(RuntimeError):
        decoder.feed(b"more")


def test_eof_reports_oversized_header() -> None:
    decoder = FrameDecoder(max_frame_size=3)
    decoder.feed(b"\x00\x00\x00\x04abcd")
    with pytest.raises(FrameTooLarge):
        decoder.close()


def test_many_tiny_frames_take_linear_time() -> None:
    """200k empty frames fed at once: quadratic re-slicing would take minutes, offsets take well under 1 s."""
    count = 200_000
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00" * count)
    start = time.perf_counter()
    assert sum(1 for _ in iter(decoder.next_frame, None)) == count
    assert time.perf_counter() - start < 2.0
    assert decoder.buffered == 0


def test_large_frame_fed_in_small_chunks_is_linear() -> None:
    payload = bytes(4 * 2**20)
    stream = encode_frame(payload)
    decoder = FrameDecoder()
    start = time.perf_counter()
    for i in range(0, len(stream), 1024):
        decoder.feed(stream[i : i + 1024])
        if i + 1024 < len(stream):
            assert decoder.next_frame() is None
    assert decoder.next_frame() == payload
    assert time.perf_counter() - start < 2.0


def test_invalid_limits() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=2**32)
    with pytest.raises(TypeError):
        FrameDecoder(max_frame_size=True)  # type: ignore[arg-type]
