"""Opening a stream in one round trip (petals_protocol/p2p/negotiate.py), against a scripted peer.

The real-peer paths (a served protocol, a refused one, a go-libp2p relay) are covered by
test_p2p_streams.py and the NAT lab; here a fake stream checks the order of events that makes it
one round trip: both multistream messages are written before anything is read.
"""
from __future__ import annotations

import pytest
import trio
from libp2p.utils import encode_delim

from petals_protocol.p2p.negotiate import NegotiationFailed, new_stream

HEADER = "/multistream/1.0.0"
PROTOCOL = "/petals/inference/1"


class ScriptedStream:
    """Answers only once both messages are in, as a peer across a long link would."""

    def __init__(self, answers: list[str]) -> None:
        self.written: list[bytes] = []
        self.unread = b"".join(encode_delim(a.encode()) for a in answers)
        self.protocol: str | None = None
        self.was_reset = False

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def read(self, n: int = -1) -> bytes:
        assert len(self.written) == 2, "read before the proposal was sent: two round trips"
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


def test_the_proposal_goes_out_with_the_header_and_the_stream_speaks_it() -> None:
    stream = ScriptedStream([HEADER, PROTOCOL])
    assert trio.run(new_stream, FakeHost(stream), "peer", PROTOCOL) is stream
    assert stream.written == [encode_delim(HEADER.encode()), encode_delim(PROTOCOL.encode())]
    assert stream.protocol == PROTOCOL and not stream.was_reset


@pytest.mark.parametrize("answers, message", [
    ([HEADER, "na"], f"does not serve {PROTOCOL}"),
    ([HEADER, "/other/1"], "answered /petals/inference/1 with '/other/1'"),
    (["/multistream/2.0.0", PROTOCOL], "answered the multistream header with '/multistream/2.0.0'"),
])
def test_a_refusal_or_a_wrong_answer_resets_the_stream(answers: list[str], message: str) -> None:
    stream = ScriptedStream(answers)
    with pytest.raises(NegotiationFailed) as caught:
        trio.run(new_stream, FakeHost(stream), "peer", PROTOCOL)
    assert message in str(caught.value)
    assert stream.was_reset and stream.protocol is None
