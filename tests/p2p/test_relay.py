"""Circuit Relay v2 glue (petals_protocol.p2p.relay): relayed dials, reservations kept across a lost relay."""

from __future__ import annotations

import trio
import trio.testing

from petals_protocol.p2p.host import DialError, connect, connect_any, listen_multiaddrs, make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.relay import (
    Reservations,
    circuit_addr,
    is_circuit,
    relay_connections,
    relay_peer_of,
    run_relay_protocol,
)
from petals_protocol.p2p.streams import StreamClosed, open_framed, open_stream

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = "/petals-test/echo/1"


async def _echo(stream) -> None:
    try:
        async with open_framed(stream) as framed:
            while True:
                await framed.send_frame(await framed.receive_frame())
    except StreamClosed:
        pass  # nothing may escape a handler: libp2p would take the host down


def test_circuit_address_helpers() -> None:
    addr = circuit_addr("/ip4/1.2.3.4/tcp/5/p2p/RELAY", "PEER")
    assert addr == "/ip4/1.2.3.4/tcp/5/p2p/RELAY/p2p-circuit/p2p/PEER"
    assert is_circuit(addr) and relay_peer_of(addr) == "RELAY"
    assert not is_circuit("/ip4/1.2.3.4/tcp/5/p2p/PEER") and relay_peer_of("/ip4/1.2.3.4/tcp/5/p2p/PEER") is None


def test_dial_through_relay_and_rereserve_when_the_relay_goes_away() -> None:
    """B reserves on two relays and announces both circuit addresses; C reaches B through one
    (a relayed connection: B listens nowhere C could dial); when that relay stops, B notices and
    its addresses change, and C reaches B through the other relay."""

    async def main() -> None:
        relay1, relay2 = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        b, c = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        b.set_stream_handler(ECHO, _echo)
        changes: list[list[str]] = []
        async with trio.open_nursery() as outer, running_host(relay2, LOOPBACK), running_host(b, LOOPBACK), \
                running_host(c, LOOPBACK):
            hop2 = await outer.start(lambda task_status: run_relay_protocol(relay2, hop=True, task_status=task_status))
            relay1_scope = trio.CancelScope()
            relay1_up, relay1_down = trio.Event(), trio.Event()

            async def run_relay1() -> None:
                with relay1_scope:
                    async with running_host(relay1, LOOPBACK), trio.open_nursery() as n:
                        await n.start(lambda task_status: run_relay_protocol(relay1, hop=True, task_status=task_status))
                        relay1_up.set()
                        await trio.sleep_forever()
                relay1_down.set()

            outer.start_soon(run_relay1)
            await relay1_up.wait()
            relay_addrs = [listen_multiaddrs(relay1)[0], listen_multiaddrs(relay2)[0]]

            async def candidates() -> list[str]:
                return list(relay_addrs)

            reservations = Reservations(b, candidates, lambda: changes.append(reservations.circuit_addrs()),
                                        want=2, check_period=0.2)
            await outer.start(lambda task_status: run_relay_protocol(b, hop=False, task_status=task_status))
            await outer.start(reservations.run)
            circuits = reservations.circuit_addrs()
            assert len(circuits) == 2 and all(is_circuit(a) for a in circuits), circuits
            assert changes, "on_change was not called after reserving"

            # C dials B through relay 1 only (connect_any on circuits tries them in order).
            via1 = circuit_addr(relay_addrs[0], b.get_id().to_base58())
            peer = await connect(c, via1)
            assert peer == b.get_id()
            stream = await open_stream(c, peer, ECHO, nursery=outer)
            await stream.send_frame(b"through the relay")
            assert await stream.receive_frame() == b"through the relay"
            # On relay 1 the circuit's streams (HOP from C, STOP to B) keep both connections; relay 2
            # keeps B's connection for the reservation alone: idle sweeping leaves them open.
            assert {b.get_id().to_base58(), c.get_id().to_base58()} <= relay_connections(relay1)
            assert b.get_id().to_base58() in relay_connections(relay2, hop2)
            assert c.get_id().to_base58() not in relay_connections(relay2, hop2)
            await stream.aclose()

            relay1_scope.cancel()
            await relay1_down.wait()
            via2 = circuit_addr(relay_addrs[1], b.get_id().to_base58())
            with trio.fail_after(15):  # noticed, re-reserving there failed, and announced
                while changes[-1] != [via2]:
                    await trio.sleep(0.1)
            assert reservations.relays() == [relay2.get_id().to_base58()]
            # The old connection went with the relay: a new dial goes through relay 2.
            with trio.fail_after(15):
                while c.get_network().get_connections(b.get_id()):
                    await trio.sleep(0.1)
            peer = await connect_any(c, [via1, *reservations.circuit_addrs()], timeout=5)
            stream = await open_stream(c, peer, ECHO, nursery=outer)
            await stream.send_frame(b"again")
            assert await stream.receive_frame() == b"again"
            await stream.aclose()
            outer.cancel_scope.cancel()

    trio.run(main)


def test_a_relay_without_reservation_gives_a_dial_error() -> None:
    async def main() -> None:
        relay, c = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        nobody = make_host(ephemeral_identity()).get_id().to_base58()
        async with trio.open_nursery() as n, running_host(relay, LOOPBACK), running_host(c, LOOPBACK):
            await n.start(lambda task_status: run_relay_protocol(relay, hop=True, task_status=task_status))
            addr = circuit_addr(listen_multiaddrs(relay)[0], nobody)
            try:
                await connect(c, addr, timeout=10)
            except DialError as exc:
                assert exc.addr == addr
            else:
                raise AssertionError("a dial to a peer without a reservation succeeded")
            n.cancel_scope.cancel()

    trio.run(main)


def test_token_bucket_paces_to_its_rate() -> None:
    """Virtual time: a burst passes at once, then N bytes take (N - burst) / rate seconds, shared
    fairly by tasks drawing on one bucket."""
    from petals_protocol.p2p.relay import TokenBucket

    async def main() -> None:
        bucket = TokenBucket(1000.0)
        start = trio.current_time()
        await bucket.take(int(bucket.burst))
        assert trio.current_time() == start
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(bucket.take, 500)
        assert abs(trio.current_time() - start - 2.0) < 1e-6

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


SINK = "/petals-test/sink/1"
RATE = 256 * 1024
SENT = 1024 * 1024


async def _sink(stream) -> None:
    """Reads SENT bytes, then answers with the byte count."""
    try:
        got = 0
        while got < SENT:
            data = await stream.read(65536)
            if not data:
                break
            got += len(data)
        await stream.write(str(got).encode())
    except Exception:  # noqa: BLE001 - nothing may escape a handler
        pass


async def _send_through(c, peer, nbytes: int) -> float:
    """Seconds to move `nbytes` from `c` to `peer`'s sink and hear back that all arrived."""
    stream = await c.new_stream(peer, [SINK])
    start = trio.current_time()
    chunk = b"x" * 65536
    for _ in range(nbytes // len(chunk)):
        await stream.write(chunk)
    reply = await stream.read(64)
    took = trio.current_time() - start
    await stream.close()
    assert int(reply) == nbytes
    return took


def test_relayed_bandwidth_caps_per_circuit_and_global() -> None:
    """A relay with a per-circuit cap: one relayed transfer takes at least (N - burst) / cap. One
    with a global cap: two circuits at once share it, 2N bytes take at least (2N - burst) / cap.
    The relay counts what it relayed. (Without a cap the same transfer runs far faster: printed.)"""
    from petals_protocol.p2p.relay import BURST_SECONDS, RelayLimitsConfig, RelayThrottle

    async def relayed(limits: RelayLimitsConfig, senders: int) -> tuple[float, int, int]:
        throttle = RelayThrottle(limits.max_bandwidth, limits.circuit_bandwidth)
        relay, b = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        askers = [make_host(ephemeral_identity()) for _ in range(senders)]
        b.set_stream_handler(SINK, _sink)
        took: list[float] = []
        async with trio.open_nursery() as n, running_host(relay, LOOPBACK), running_host(b, LOOPBACK):
            await n.start(lambda task_status: run_relay_protocol(
                relay, hop=True, limits=limits, throttle=throttle, task_status=task_status))
            await n.start(lambda task_status: run_relay_protocol(b, hop=False, task_status=task_status))

            async def the_relay() -> list[str]:
                return listen_multiaddrs(relay)[:1]

            await n.start(Reservations(b, the_relay, lambda: None, want=1).run)
            via = circuit_addr(listen_multiaddrs(relay)[0], b.get_id().to_base58())

            async def send(c) -> None:
                async with running_host(c, LOOPBACK):
                    with trio.fail_after(120):
                        peer = await connect(c, via)
                        took.append(await _send_through(c, peer, SENT))

            start = trio.current_time()
            async with trio.open_nursery() as senders_nursery:
                for c in askers:
                    senders_nursery.start_soon(send, c)
            elapsed = trio.current_time() - start
            n.cancel_scope.cancel()
        return elapsed, len(took), throttle.relayed_bytes

    burst = RATE * BURST_SECONDS
    free, _, _ = trio.run(relayed, RelayLimitsConfig(), 1)
    per_circuit, done, counted = trio.run(relayed, RelayLimitsConfig(circuit_bandwidth=RATE), 1)
    # Paced, not stalled: well under three times the time the cap allows.
    assert done == 1 and (SENT - burst) / RATE <= per_circuit < 3 * SENT / RATE, per_circuit
    assert counted >= SENT
    both, done, counted = trio.run(relayed, RelayLimitsConfig(max_bandwidth=RATE), 2)
    assert done == 2 and (2 * SENT - burst) / RATE <= both < 3 * 2 * SENT / RATE, both
    assert counted >= 2 * SENT
    print(f"\n{SENT} B relayed: uncapped {free:.2f} s; circuit cap {RATE} B/s {per_circuit:.2f} s "
          f"(floor {(SENT - burst) / RATE:.2f}); 2 circuits, global cap {RATE} B/s {both:.2f} s "
          f"(floor {(2 * SENT - burst) / RATE:.2f})")
