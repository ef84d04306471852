"""Opening a stream without waiting for multistream-select (petals_protocol/p2p/negotiate.py).

The real-peer paths (a served protocol, a refused one, a go-libp2p relay) are covered by
test_p2p_streams.py and the NAT lab; here a scripted stream checks the order of events that saves
the round trips (the proposal goes out with the header, before anything is read), and the
sans-IO reader of the answers that a lazily opened stream finds in front of its data.
"""
from __future__ import annotations

import pytest
import trio
from libp2p.utils import encode_delim

from petals_protocol.p2p.negotiate import Answers, NegotiationFailed, new_stream, proposal

HEADER = "/multistream/1.0.0"
PROTOCOL = "/petals/inference/1"


def answers(*messages: str) -> bytes:
    return b"".join(encode_delim(m.encode()) for m in messages)


class ScriptedStream:
    """Answers only once the proposal is in, as a peer across a long link would."""

    def __init__(self, *messages: str) -> None:
        self.written: list[bytes] = []
        self.unread = answers(*messages)
        self.protocol: str | None = None
        self.was_reset = False

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def read(self, n: int = -1) -> bytes:
        assert self.written == [proposal(PROTOCOL)], "read before the proposal was sent: two round trips"
        n = len(self.unread) if n < 0 else n
        chunk, self.unread = self.unread[:n], self.unread[n:]
        return chunk

    def set_protocol(self, protocol: str) -> None:
        self.protocol = protocol

    async def reset(self) -> None:
        self.was_reset = True


class FakeHost:
    def __init__(self, stream: ScriptedStream) -> None:
        self.stream = stream

    def get_network(self) -> FakeHost:
        return self

    async def new_stream(self, peer_id: object) -> ScriptedStream:
        return self.stream


def test_header_and_proposal_go_out_in_one_write_then_both_answers_are_read() -> None:
    stream = ScriptedStream(HEADER, PROTOCOL)
    assert proposal(PROTOCOL) == answers(HEADER, PROTOCOL)
    assert trio.run(new_stream, FakeHost(stream), "peer", PROTOCOL) is stream
    assert stream.protocol == PROTOCOL and not stream.was_reset and stream.unread == b""


def test_a_lazy_open_writes_the_proposal_and_reads_nothing() -> None:
    stream = ScriptedStream("never read")
    opened = trio.run(lambda: new_stream(FakeHost(stream), "peer", PROTOCOL, lazy=True))
    assert opened is stream and stream.written == [proposal(PROTOCOL)] and stream.protocol == PROTOCOL


REFUSALS = [
    ((HEADER, "na"), f"does not serve {PROTOCOL}"),
    ((HEADER, "/other/1"), "answered /petals/inference/1 with '/other/1'"),
    (("/multistream/2.0.0", PROTOCOL), "answered the multistream header with '/multistream/2.0.0'"),
]


@pytest.mark.parametrize("messages, reason", REFUSALS)
def test_a_refusal_or_a_wrong_answer_resets_the_stream(messages: tuple[str, str], reason: str) -> None:
    stream = ScriptedStream(*messages)
    with pytest.raises(NegotiationFailed) as caught:
        trio.run(new_stream, FakeHost(stream), "peer", PROTOCOL)
    assert reason in str(caught.value)
    assert stream.was_reset and stream.protocol is None


def test_answers_in_front_of_data_arriving_byte_by_byte() -> None:
    reader = Answers("peer", PROTOCOL)
    wire = answers(HEADER, PROTOCOL) + b"first frame"
    fed = [reader.feed(wire[i:i + 1]) for i in range(len(answers(HEADER, PROTOCOL)))]
    assert fed[:-1] == [None] * (len(fed) - 1) and fed[-1] == b""  # complete, nothing behind yet
    fresh = Answers("peer", PROTOCOL)
    assert fresh.feed(wire) == b"first frame"  # all in one read: the data behind comes back


@pytest.mark.parametrize("messages, reason", REFUSALS)
def test_answers_refusing_the_protocol(messages: tuple[str, str], reason: str) -> None:
    with pytest.raises(NegotiationFailed, match="peer peer") as caught:
        Answers("peer", PROTOCOL).feed(answers(*messages) + b"\x00garbage")
    assert reason in str(caught.value)


def test_answers_cut_short_or_malformed() -> None:
    half = Answers("peer", PROTOCOL)
    assert half.feed(answers(HEADER)) is None
    with pytest.raises(NegotiationFailed, match="closed the stream before answering /petals/inference/1"):
        half.eof()
    with pytest.raises(NegotiationFailed, match="during multistream negotiation"):
        Answers("peer", PROTOCOL).eof()
    with pytest.raises(NegotiationFailed, match="without its newline"):
        Answers("peer", PROTOCOL).feed(b"\x03abc")
    with pytest.raises(NegotiationFailed, match="of 0 bytes"):
        Answers("peer", PROTOCOL).feed(b"\x00")
    with pytest.raises(NegotiationFailed, match="of 4096 bytes"):  # no waiting for 4 KiB of "answer"
        Answers("peer", PROTOCOL).feed(b"\x80\x20")
    with pytest.raises(NegotiationFailed, match="bad multistream length"):
        Answers("peer", PROTOCOL).feed(b"\xff" * 6)
