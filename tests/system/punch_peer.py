"""One peer of tests/system/test_punch.py, run inside a namespace of the NAT lab.

    punch_peer.py relay LISTEN                      a Circuit Relay v2 hop; prints "ready ADDR"
    punch_peer.py target LISTEN PUBLIC_IP RELAY     reserves on RELAY, answers echo and punch
                                                    requests; prints "ready CIRCUIT_ADDR"
    punch_peer.py asker LISTEN PUBLIC_IP TARGET     dials TARGET through the relay, echoes, punches,
                                                    closes the relayed connection, waits for a line on
                                                    stdin (the relay is killed meanwhile), echoes again;
                                                    prints "RESULT {json}"
"""
from __future__ import annotations

import json
import sys

import trio

from petals_protocol.p2p.host import connect, listen_multiaddrs, make_host, parse_peer_multiaddr, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.punch import PUNCH_PROTOCOL, PunchService
from petals_protocol.p2p.relay import Reservations, run_relay_protocol
from petals_protocol.p2p.streams import StreamClosed, open_framed, open_stream

ECHO = "/petals-test/echo/1"


async def echo(stream) -> None:
    try:
        async with open_framed(stream) as framed:
            while True:
                await framed.send_frame(await framed.receive_frame())
    except StreamClosed:
        pass


async def round_trip(host, peer, nursery, text: bytes) -> bool:
    with trio.fail_after(15):
        stream = await open_stream(host, peer, ECHO, nursery=nursery)
        await stream.send_frame(text)
        ok = await stream.receive_frame() == text
        await stream.aclose()
    return ok


async def main(role: str, listen: str, *rest: str) -> None:
    host = make_host(ephemeral_identity())
    async with running_host(host, [listen]), trio.open_nursery() as nursery:
        if role == "relay":
            await nursery.start(lambda task_status: run_relay_protocol(host, hop=True, task_status=task_status))
            print("ready", listen_multiaddrs(host)[0], flush=True)
            await trio.sleep_forever()
        public_ip = rest[0]
        punch = PunchService(host, lambda: public_ip)
        await nursery.start(lambda task_status: run_relay_protocol(host, hop=False, task_status=task_status))
        if role == "target":
            host.set_stream_handler(ECHO, echo)
            host.set_stream_handler(PUNCH_PROTOCOL, punch.handle)

            async def relays() -> list[str]:
                return [rest[1]]

            reservations = Reservations(host, relays, lambda: None, want=1)
            await nursery.start(reservations.run)
            print("ready", reservations.circuit_addrs()[0], flush=True)
            await trio.sleep_forever()
        target = rest[1]
        result: dict = {}
        peer = await connect(host, target)
        result["relayed_echo"] = await round_trip(host, peer, nursery, b"via the relay")
        direct = await punch.punch(peer)
        result["punched_remote"] = list(direct.muxed_conn.get_remote_address() or ())
        for conn in list(host.get_network().get_connections(peer)):
            if conn is not direct:
                await conn.close()
        result["connections_left"] = len(host.get_network().get_connections(peer))
        print("punched", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)  # the test kills the relay meanwhile
        result["direct_echo"] = await round_trip(host, peer, nursery, b"no relay any more")
        print("RESULT " + json.dumps(result), flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:])
