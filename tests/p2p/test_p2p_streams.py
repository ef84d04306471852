"""FramedStream between this process and a real peer process over Noise + yamux on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import pytest
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from peer_main import CLOSE, ECHO, OVERSIZE, SLEEP, SLEEPY, SMALL, SMALL_MAX_FRAME

from petals_protocol.errors import ErrorCode, FrameTooLarge, MalformedMessage
from petals_protocol.messages import ErrorReply, ForwardRequest, InfoRequest
from petals_protocol.p2p.host import make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.streams import FramedStream, StreamClosed, StreamOpenError, open_framed, open_stream
from petals_protocol.tensors import TensorPayload

FINGERPRINT = "ab" * 16
# 10 x 1 MiB: well above what yamux lets a writer send to a reader that does not read (3-4 MiB
# measured), and below the pump's queue (DEFAULT_MAX_BUFFERED_FRAMES = 16 frames).
UNREAD_FRAMES = 10


def forward_request(nbytes: int) -> ForwardRequest:
    """A request carrying `nbytes` of float32 activations (random, so nothing compresses or aliases)."""
    hidden = TensorPayload("float32", (1, 1, nbytes // 4), os.urandom(nbytes))
    return ForwardRequest(os.urandom(16), FINGERPRINT, 0, 4, hidden)


def test_request_response(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, ECHO, nursery=nursery)
        assert framed.peer_id == str(peer) and framed.protocol == ECHO
        for message in (InfoRequest(), forward_request(4096), ErrorReply(ErrorCode.BUSY, "full", None, os.urandom(16))):
            await framed.send(message)
            assert await framed.receive() == message
        await framed.close()
        with pytest.raises(StreamClosed):
            await framed.receive()

    run_client(remote_peer.addr, body)


def test_send_many_writes_several_messages_that_arrive_one_by_one(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, ECHO, nursery=nursery)
        messages = [forward_request(1024 * (i + 1)) for i in range(8)] + [InfoRequest()]
        await framed.send_many(messages)
        assert [await framed.receive() for _ in messages] == messages
        await framed.close()

    run_client(remote_peer.addr, body)


def test_fifty_concurrent_streams_do_not_cross_talk(remote_peer, run_client: Callable[..., None]) -> None:
    async def one_stream(host: IHost, peer: ID, nursery: trio.Nursery, done: list[int]) -> None:
        async with trio.open_nursery() as own:
            framed = await open_stream(host, peer, ECHO, nursery=own)
            for _ in range(5):
                request = forward_request(256)
                await framed.send(request)
                assert await framed.receive() == request
            await framed.close()
        done.append(1)

    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        done: list[int] = []
        async with trio.open_nursery() as streams:
            for _ in range(50):
                streams.start_soon(one_stream, host, peer, nursery, done)
        assert len(done) == 50

    run_client(remote_peer.addr, body)


def test_20_mib_message_round_trips(remote_peer, run_client: Callable[..., None]) -> None:
    # read_exactly in libp2p gives up after 100 partial reads (~6.5 MB): bug 3.
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, ECHO, nursery=nursery)
        request = forward_request(20 * 2**20)
        await framed.send(request)
        assert await framed.receive() == request
        await framed.close()

    run_client(remote_peer.addr, body)


def test_peer_not_consuming_for_7_s_keeps_the_stream(remote_peer, run_client: Callable[..., None]) -> None:
    # The remote handler does not call receive() for 7 s; its pump must keep draining yamux, or
    # our writes would time out after 5 s and the stream would be reset (bug 2). Measured: a
    # stream whose reader does not read stalls its writer after 3-4 MiB; we send 10 MiB.
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, SLEEPY, nursery=nursery)
        requests = [forward_request(2**20) for _ in range(UNREAD_FRAMES)]
        started = time.monotonic()
        for request in requests:
            await framed.send(request)
        assert time.monotonic() - started < 4.0, "writes stalled: the remote pump is not draining"
        for request in requests:
            assert await framed.receive() == request
        assert time.monotonic() - started >= SLEEP - 0.5
        await framed.close()

    run_client(remote_peer.addr, body, timeout=SLEEP + 20)


def test_local_consumer_pausing_keeps_the_stream(remote_peer, run_client: Callable[..., None]) -> None:
    # The same from our side: we do not consume replies for 6 s while the peer sends 10 MiB.
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, ECHO, nursery=nursery)
        requests = [forward_request(2**20) for _ in range(UNREAD_FRAMES)]
        for request in requests:
            await framed.send(request)
        await trio.sleep(6.0)
        for request in requests:
            assert await framed.receive() == request
        await framed.send(InfoRequest())  # the stream is still alive in both directions
        assert await framed.receive() == InfoRequest()
        await framed.close()

    run_client(remote_peer.addr, body, timeout=30)


def test_oversize_frame_from_peer_is_a_typed_error(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, OVERSIZE, nursery=nursery)
        with pytest.raises(FrameTooLarge):
            await framed.receive()
        with pytest.raises(StreamClosed):  # reported once; afterwards the stream is just dead
            await framed.receive()
        await framed.close()

    run_client(remote_peer.addr, body)


def test_oversize_frame_to_peer_gets_the_stream_reset(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, SMALL, nursery=nursery)
        small = forward_request(SMALL_MAX_FRAME // 2)
        await framed.send(small)
        assert await framed.receive() == small
        await framed.send(forward_request(4 * SMALL_MAX_FRAME))
        with trio.fail_after(5):
            with pytest.raises(StreamClosed) as caught:
                await framed.receive()
        assert not caught.value.clean
        await framed.close()

    run_client(remote_peer.addr, body)


def test_sending_above_our_own_limit_is_refused_locally(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, ECHO, nursery=nursery, max_frame_size=1024)
        with pytest.raises(FrameTooLarge):
            await framed.send(forward_request(2048))
        with pytest.raises(FrameTooLarge):  # one message over the limit: none of them is written
            await framed.send_many([InfoRequest(), forward_request(2048)])
        await framed.send(InfoRequest())  # nothing was written: the stream is intact
        assert await framed.receive() == InfoRequest()
        await framed.close()

    run_client(remote_peer.addr, body)


def test_malformed_message_leaves_the_stream_usable(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, ECHO, nursery=nursery)
        await framed.send_frame(b"\xc1 not msgpack")
        with pytest.raises(MalformedMessage):
            await framed.receive()
        await framed.send(InfoRequest())
        assert await framed.receive() == InfoRequest()
        await framed.close()

    run_client(remote_peer.addr, body)


def test_peer_closing_ends_the_stream_cleanly(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, CLOSE, nursery=nursery)
        await framed.send(InfoRequest())
        received = [message async for message in framed]  # iteration ends at the peer's FIN
        assert received == [InfoRequest()]
        with trio.fail_after(1):
            with pytest.raises(StreamClosed) as caught:
                await framed.receive()
        assert caught.value.clean
        await framed.close()

    run_client(remote_peer.addr, body)


def test_killed_peer_is_noticed_promptly(fresh_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        framed = await open_stream(host, peer, ECHO, nursery=nursery)
        await framed.send(InfoRequest())
        assert await framed.receive() == InfoRequest()
        fresh_peer.proc.kill()
        killed = time.monotonic()
        with trio.fail_after(2):
            with pytest.raises(StreamClosed):
                await framed.receive()
        assert time.monotonic() - killed < 1.0
        with pytest.raises(StreamClosed):
            await framed.send(InfoRequest())
        await framed.close()

    run_client(fresh_peer.addr, body)


def test_unsupported_protocol_is_a_stream_open_error(remote_peer, run_client: Callable[..., None]) -> None:
    async def body(host: IHost, peer: ID, nursery: trio.Nursery) -> None:
        # Opened without waiting for the peer's answer (negotiate.py): the refusal comes with the
        # first receive, whatever was sent meanwhile
        refused = await open_stream(host, peer, "/petals-test/nobody-serves-this/1", nursery=nursery, timeout=5)
        with contextlib.suppress(StreamClosed):
            await refused.send(InfoRequest())
        with pytest.raises(StreamOpenError) as caught:
            await refused.receive()
        await refused.close()
        assert caught.value.peer == str(peer)
        assert "does not serve /petals-test/nobody-serves-this/1" in str(caught.value)
        # The refused stream was reset, the connection stays usable
        framed = await open_stream(host, peer, ECHO, nursery=nursery)
        await framed.send(InfoRequest())
        assert await framed.receive() == InfoRequest()
        await framed.close()

    run_client(remote_peer.addr, body)


def test_close_wakes_a_blocked_receiver_and_cancellation_is_clean() -> None:
    ended: list[StreamClosed] = []

    async def handler(stream) -> None:  # never answers; sees the client's FIN as a clean close
        try:
            async with open_framed(stream) as framed:
                await framed.receive()
        except StreamClosed as exc:  # raised bare from the block, not as an ExceptionGroup
            ended.append(exc)

    async def main() -> None:
        server, client = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        server.set_stream_handler("/petals-test/silent/1", handler)
        async with running_host(server, ["/ip4/127.0.0.1/tcp/0"]), running_host(client, ["/ip4/127.0.0.1/tcp/0"]):
            client.get_peerstore().add_addrs(server.get_id(), server.get_addrs(), 60)
            async with trio.open_nursery() as nursery:
                framed = await open_stream(client, server.get_id(), "/petals-test/silent/1", nursery=nursery)
                outcome: list[BaseException] = []

                async def blocked() -> None:
                    try:
                        await framed.receive()
                    except StreamClosed as exc:
                        outcome.append(exc)

                nursery.start_soon(blocked)
                await trio.sleep(0.05)
                await framed.close()
                await trio.sleep(0.05)
                assert len(outcome) == 1 and "closed locally" in str(outcome[0])

                # A cancelled pump (its nursery is cancelled) ends receive() with StreamClosed too.
                async with trio.open_nursery() as inner:
                    other = await open_stream(client, server.get_id(), "/petals-test/silent/1", nursery=inner)
                    inner.cancel_scope.cancel()
                with pytest.raises(StreamClosed):
                    await other.receive()
                await other.close()
            await trio.sleep(0.1)
            assert len(ended) == 2 and all(exc.clean for exc in ended)

    trio.run(main)


def test_receive_without_pump_is_a_usage_error() -> None:
    class NoStream:
        def get_protocol(self) -> None:
            return None

    framed = FramedStream(NoStream())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="pump"):
        trio.run(framed.receive)

