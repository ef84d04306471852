"""A deliberately low-level petals client for attacking a running daemon in tests.

The real client (petals_client) never sends bad input, so tests of the daemon's input handling
speak the wire directly: a libp2p host of their own, one `FramedStream` per protocol stream, and
access to the raw libp2p stream underneath for bytes that are not frames at all.

Every call is bounded by a trio timeout so that a daemon that hangs instead of answering fails
the test quickly instead of stalling the suite.
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from petals_protocol.errors import ErrorCode, PetalsError
from petals_protocol.framing import DEFAULT_MAX_FRAME_SIZE
from petals_protocol.ids import INFERENCE_PROTOCOL, INFO_PROTOCOL
from petals_protocol.messages import (
    ErrorReply,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    Message,
    OpenSession,
    SessionOpened,
    StepResult,
)
from petals_protocol.p2p.host import connect, make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.streams import FramedStream, StreamClosed, open_stream
from petals_protocol.tensors import TensorPayload, from_torch

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Every reply from a daemon on loopback takes milliseconds; a few seconds means it hung.
REPLY_TIMEOUT = 15.0


def new_id() -> bytes:
    """A fresh 16-byte session/request id, as a client would choose it."""
    return os.urandom(16)


def pack(obj: Any) -> bytes:
    """msgpack `obj` the way messages are packed (bytes stay bytes), for hand-built bad messages."""
    return msgpack.packb(obj, use_bin_type=True)


def hidden_payload(batch: int, tokens: int, hidden_size: int, *, dtype: torch.dtype | None = None,
                   seed: int = 0) -> TensorPayload:
    """Hidden states of the given shape with reproducible values (float32 unless `dtype`)."""
    import torch  # lazily: the hold-session helper process starts faster without it

    gen = torch.Generator().manual_seed(seed)
    return from_torch(torch.randn(batch, tokens, hidden_size, generator=gen).to(dtype or torch.float32))


@dataclass
class RawClient:
    """A running libp2p host that opens petals streams to daemons and hands them over unfiltered."""

    host: IHost
    nursery: trio.Nursery

    async def open(self, addr: str, protocol: str, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> FramedStream:
        peer: ID = await connect(self.host, addr)
        return await open_stream(self.host, peer, protocol, nursery=self.nursery, max_frame_size=max_frame_size)

    async def info(self, addr: str) -> InfoResponse:
        """Ask over /petals/info/1 (also the cheapest proof that a daemon still serves)."""
        stream = await self.open(addr, INFO_PROTOCOL)
        try:
            reply = await request(stream, InfoRequest())
        finally:
            await stream.close()
        assert isinstance(reply, InfoResponse), reply
        return reply

    async def open_session(self, addr: str, open_msg: OpenSession) -> FramedStream:
        """An inference stream with `open_msg` accepted (asserts SessionOpened)."""
        stream = await self.open(addr, INFERENCE_PROTOCOL)
        reply = await request(stream, open_msg)
        assert isinstance(reply, SessionOpened), reply
        assert reply.session_id == open_msg.session_id
        return stream


@asynccontextmanager
async def raw_client() -> AsyncIterator[RawClient]:
    """A RawClient whose host listens on a free loopback port; everything stops on exit."""
    host = make_host(ephemeral_identity())
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]), trio.open_nursery() as nursery:
        yield RawClient(host, nursery)
        nursery.cancel_scope.cancel()


def run_raw(body: Callable[[RawClient], Awaitable[T]], *, timeout: float = 60.0) -> T:
    """Run `await body(client)` on a fresh trio loop with a fresh RawClient (sync test code)."""

    async def main() -> T:
        with trio.fail_after(timeout):
            async with raw_client() as client:
                return await body(client)

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        # The nurseries wrap a failed assertion in nested groups; show the test its own error.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def receive(stream: FramedStream, timeout: float = REPLY_TIMEOUT) -> Message:
    with trio.fail_after(timeout):
        return await stream.receive()


async def request(stream: FramedStream, msg: Message, timeout: float = REPLY_TIMEOUT) -> Message:
    await stream.send(msg)
    return await receive(stream, timeout)


async def expect_error(stream: FramedStream, code: ErrorCode, *, timeout: float = REPLY_TIMEOUT) -> ErrorReply:
    """The next message must be an ErrorReply with `code` and a message a person can read."""
    reply = await receive(stream, timeout)
    assert isinstance(reply, ErrorReply), f"expected ErrorReply({code.value}), got {reply!r}"
    assert reply.code == code, f"expected {code.value}, got {reply.code.value}: {reply.message}"
    assert_readable(reply.message)
    return reply


def assert_readable(message: str) -> None:
    """A human-readable error: a sentence of printable text, not a repr of bytes or a traceback."""
    assert 10 <= len(message) <= 1000, message
    assert message.isprintable(), message
    assert "Traceback" not in message and "\\x" not in message, message
    assert sum(ch.isalpha() for ch in message) >= 8, message


async def expect_end(stream: FramedStream, timeout: float = REPLY_TIMEOUT) -> tuple[list[Message], StreamClosed]:
    """Read until the daemon ends the stream; return what it sent before, and how it ended
    (`.clean`: a FIN, not a reset)."""
    received: list[Message] = []
    with trio.fail_after(timeout):
        while True:
            try:
                received.append(await stream.receive())
            except StreamClosed as end:
                return received, end
            except PetalsError as exc:  # the daemon answered with a bad frame: a daemon bug
                raise AssertionError(f"daemon sent an undecodable frame: {exc}") from exc


async def step(stream: FramedStream, session_id: bytes, step_no: int, position: int,
               hidden: TensorPayload) -> Message:
    return await request(stream, InferenceStep(session_id=session_id, step=step_no, position=position,
                                               hidden=hidden, hypo_ids=None))


async def step_ok(stream: FramedStream, session_id: bytes, step_no: int, position: int,
                  hidden: TensorPayload) -> StepResult:
    reply = await step(stream, session_id, step_no, position, hidden)
    assert isinstance(reply, StepResult), reply
    assert reply.step == step_no and reply.position == position
    return reply


# ------------------------------------------------------------------- a client to SIGKILL

async def _hold_session(addr: str, fingerprint: str, start: int, end: int, hidden_size: int) -> None:
    """Open a session, run one step, print "holding <session id hex>", then wait to be killed."""
    async with raw_client() as client:
        opened = OpenSession(session_id=new_id(), model_fingerprint=fingerprint, start_block=start,
                             end_block=end, max_length=16, batch_size=1)
        stream = await client.open_session(addr, opened)
        zeros = TensorPayload("float32", (1, 2, hidden_size), bytes(4 * 2 * hidden_size))
        await step_ok(stream, opened.session_id, 0, 0, zeros)
        print(f"holding {opened.session_id.hex()}", flush=True)
        await trio.sleep_forever()


def main(argv: list[str]) -> None:
    """`python rawclient.py hold-session ADDR FINGERPRINT START END HIDDEN_SIZE`: a client process
    that holds an inference session until it is killed (for tests of vanishing clients)."""
    if len(argv) != 6 or argv[0] != "hold-session":
        raise SystemExit("usage: rawclient.py hold-session ADDR FINGERPRINT START END HIDDEN_SIZE")
    trio.run(_hold_session, argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
