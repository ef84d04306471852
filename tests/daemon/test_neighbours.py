"""NextDaemons: which daemons a daemon measures (those serving the block after its span, a bounded
few) and what it publishes (the median of its recent samples). The measuring itself runs against
real daemons in tests/integration/test_next_legs.py."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from pathlib import Path

from petals_protocol.records import MAX_NEXT_RTTS

from petalsd.neighbours import SAMPLES, NextDaemons

sys.path.insert(0, str(Path(__file__).parents[1] / "protocol"))
from protocol_samples import sample_messages, sample_record  # noqa: E402


def record(seed: int, start: int, end: int, **changes):
    base = sample_record(time.time(), seed=bytes([seed]) * 32)
    return dataclasses.replace(base, start_block=start, end_block=end, **changes)


def test_measures_only_online_daemons_serving_the_next_block_and_at_most_a_few():
    me = record(1, 0, 4)
    nexts = [record(10 + i, 4, 8, throughput=float(i + 1)) for i in range(MAX_NEXT_RTTS + 3)]
    others = [me, record(2, 0, 4), record(3, 5, 8), record(4, 2, 4), record(5, 4, 8, state="offline"),
              record(6, 4, 8, expires_at=time.time() - 1)]
    daemons = NextDaemons(host=None, peer_id=me.peer_id, period=1.0)  # type: ignore[arg-type]
    daemons.learn(others + nexts, span_end=4)
    # The fastest announced first when there are more than it measures.
    assert set(daemons._targets) == {r.peer_id for r in nexts[-MAX_NEXT_RTTS:]}
    assert all(addr.endswith("/p2p/" + nexts[-1].peer_id_text) for addr in daemons._targets[nexts[-1].peer_id])
    daemons.learn(others, span_end=8)  # our span ends the model: nobody after it
    assert daemons._targets == {}


def test_publishes_the_smallest_recent_sample_and_forgets_departed_daemons():
    me, a, b = record(1, 0, 4), record(2, 4, 8), record(3, 4, 6)
    daemons = NextDaemons(host=None, peer_id=me.peer_id, period=1.0)  # type: ignore[arg-type]
    assert daemons.measured() is None
    daemons.learn([a, b], span_end=4)
    assert daemons._new_targets.is_set()  # new daemons are measured at once, not a period later
    samples = daemons._samples.setdefault(a.peer_id, deque(maxlen=SAMPLES))
    samples.append(0.01)  # an old sample, about to leave the window
    for rtt in (0.4, 0.03, 0.3, 0.2)[:SAMPLES - 1]:  # most behind a prefill's bytes, one on a quiet link
        samples.append(rtt)
    assert daemons.measured() == ((a.peer_id, 0.01),)
    samples.append(0.5)  # the oldest leaves: the quiet sample is what is published
    assert daemons.measured() == ((a.peer_id, 0.03),)
    daemons.learn([b], span_end=4)  # `a` left (or moved): no stale leg is published
    assert daemons.measured() is None


def test_a_next_daemon_that_fails_the_measurement_does_not_take_this_one_down():
    """Measuring with real hosts: an answer, a peer that closes the info stream unanswered, and
    an address nobody listens on. The failures are None samples, never exceptions (an exception
    here would end the daemon's nursery)."""
    import trio
    from libp2p.custom_types import TProtocol

    from petals_protocol.ids import INFO_PROTOCOL
    from petals_protocol.messages import InfoRequest
    from petals_protocol.p2p.host import listen_multiaddrs, make_host, running_host
    from petals_protocol.p2p.identity import ephemeral_identity
    from petals_protocol.p2p.streams import open_framed

    from petals_protocol.messages import InfoResponse

    info = next(m for m in sample_messages() if isinstance(m, InfoResponse))
    results: dict[str, object] = {}

    async def answering(stream) -> None:
        async with open_framed(stream) as channel:
            async for msg in channel:
                assert isinstance(msg, InfoRequest)
                await channel.send(info)

    async def hanging_up(stream) -> None:
        await stream.reset()

    async def main() -> None:
        good, rude, me = (make_host(ephemeral_identity()) for _ in range(3))
        good.set_stream_handler(TProtocol(INFO_PROTOCOL), answering)
        rude.set_stream_handler(TProtocol(INFO_PROTOCOL), hanging_up)
        listen = ["/ip4/127.0.0.1/tcp/0"]
        with trio.fail_after(60):
            async with running_host(good, listen), running_host(rude, listen), running_host(me, listen), \
                    trio.open_nursery() as nursery:
                daemons = NextDaemons(host=me, peer_id=b"me", period=1.0, timeout=5.0)
                results["good"] = await daemons.measure((listen_multiaddrs(good)[0],), nursery)
                results["rude"] = await daemons.measure((listen_multiaddrs(rude)[0],), nursery)
                stranger = make_host(ephemeral_identity()).get_id()  # never started
                closed = f"/ip4/127.0.0.1/tcp/1/p2p/{stranger}"  # nobody listens on port 1
                results["nobody"] = await daemons.measure((closed,), nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert isinstance(results["good"], float) and 0 < results["good"] < 5.0, results
    assert results["rude"] is None and results["nobody"] is None, results
