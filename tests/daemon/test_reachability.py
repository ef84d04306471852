"""The dial-back probe (petalsd/reachability.py): who a helper agrees to dial, and the verdict."""
from __future__ import annotations

import trio

from petals_protocol.p2p.host import listen_multiaddrs, make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petalsd.reachability import (
    DIALBACK_PROTOCOL,
    DialbackError,
    DialbackServer,
    ask_dialback,
    is_public_addr,
    judge,
)

ASKER = "12D3KooWHD4HU2gHUnJyQT3q8eQBMfhmzX9GSzxkxkrUDscgRsyh"
OTHER = "12D3KooWRtKc2P8ZZEog3BxnQ6ZQWyUyzJkmdpqjwjo4vG6JLm9f"


def test_helper_dials_only_the_asker_at_the_ip_it_came_from() -> None:
    server = DialbackServer()
    mine = f"/ip4/198.51.100.7/tcp/4001/p2p/{ASKER}"
    assert server.check_addr(mine, ASKER, "198.51.100.7") is None
    assert "asking peer" in server.check_addr(f"/ip4/198.51.100.7/tcp/4001/p2p/{OTHER}", ASKER, "198.51.100.7")
    assert "not the IP" in server.check_addr(f"/ip4/203.0.113.9/tcp/4001/p2p/{ASKER}", ASKER, "198.51.100.7")
    assert "relayed" in server.check_addr(f"/ip4/198.51.100.7/tcp/1/p2p/{OTHER}/p2p-circuit/p2p/{ASKER}", ASKER,
                                          "198.51.100.7")
    assert server.check_addr(f"/dns4/example.org/tcp/1/p2p/{ASKER}", ASKER, "198.51.100.7") is not None
    assert server.check_addr(12, ASKER, "198.51.100.7") is not None


def test_loopback_and_private_addresses_never_prove_public_reachability() -> None:
    ok = lambda addr: {"results": [{"addr": addr, "ok": True, "detail": ""}]}  # noqa: E731
    failed = lambda addr: {"results": [{"addr": addr, "ok": False, "detail": "refused"}]}  # noqa: E731
    loop, lan, public = (f"/ip4/{ip}/tcp/1/p2p/{ASKER}" for ip in ("127.0.0.1", "192.168.1.5", "8.8.8.8"))
    assert not is_public_addr(loop) and not is_public_addr(lan) and is_public_addr(public)
    assert judge([ok(loop), ok(loop)]) == "unknown"
    assert judge([ok(lan)]) == "unknown"
    assert judge([ok(public), ok(public)]) == "public"
    assert judge([ok(public), failed(public)]) == "unknown"  # two answered: one helper is not enough
    assert judge([failed(lan), failed(lan)]) == "private"
    assert judge([]) == "unknown"


def test_dialback_over_libp2p_and_rate_limit() -> None:
    """A real exchange on loopback: the helper dials the asker back from a fresh host; an address
    naming someone else is refused; a second request right away is rate-limited."""

    async def main() -> None:
        helper, asker = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        helper.set_stream_handler(DIALBACK_PROTOCOL, DialbackServer().handle)
        async with running_host(helper, ["/ip4/127.0.0.1/tcp/0"]), running_host(asker, ["/ip4/127.0.0.1/tcp/0"]):
            mine = listen_multiaddrs(asker)[0]
            port = int(mine.split("/tcp/")[1].split("/")[0])
            closed = f"/ip4/127.0.0.1/tcp/{port + 1 if port < 65535 else port - 1}/p2p/{asker.get_id()}"
            someone_else = mine.rsplit("/p2p/", 1)[0] + f"/p2p/{OTHER}"
            with trio.fail_after(30):
                reply = await ask_dialback(asker, listen_multiaddrs(helper)[0], [mine, closed, someone_else])
            results = {r["addr"]: r for r in reply["results"]}
            assert reply["observed_ip"] == "127.0.0.1"
            assert results[mine]["ok"], results
            assert not results[closed]["ok"] and results[closed]["detail"]
            assert not results[someone_else]["ok"] and "asking peer" in results[someone_else]["detail"]
            assert judge([reply]) == "unknown"  # reached, but only on loopback
            try:
                await ask_dialback(asker, listen_multiaddrs(helper)[0], [mine])
            except DialbackError as exc:
                assert "rate limited" in str(exc)
            else:
                raise AssertionError("a second request within the interval was answered")

    trio.run(main)


def test_dialback_inside_a_swarm_key_swarm() -> None:
    """In a private swarm the helper's throwaway host carries the swarm key, so a keyed asker is
    reached (without it every dial-back would fail and every daemon would look private)."""
    import os

    async def main() -> None:
        psk = os.urandom(32)
        helper, asker = make_host(ephemeral_identity(), psk=psk), make_host(ephemeral_identity(), psk=psk)
        helper.set_stream_handler(DIALBACK_PROTOCOL, DialbackServer(psk=psk).handle)
        async with running_host(helper, ["/ip4/127.0.0.1/tcp/0"]), running_host(asker, ["/ip4/127.0.0.1/tcp/0"]):
            mine = listen_multiaddrs(asker)[0]
            with trio.fail_after(30):
                reply = await ask_dialback(asker, listen_multiaddrs(helper)[0], [mine])
            assert reply["results"][0]["ok"], reply

    trio.run(main)


def test_hop_service_follows_the_verdict() -> None:
    """Public: the daemon serves hop and a peer reserves on it. A later probe says private: hop
    stops (STOP stays, so relayed connections to it still work), the reserved peer is disconnected
    and a new record is asked for. Inconclusive: nothing changes. Public again: hop is back."""
    from petals_protocol.p2p.relay import HOP_PROTOCOL, STOP_PROTOCOL, Reservations, run_relay_protocol
    from petalsd.reachability import NatTraversal

    async def main() -> None:
        relay, b = make_host(ephemeral_identity()), make_host(ephemeral_identity())
        verdicts_in, verdicts_out = trio.open_memory_channel[str](0)
        changes: list[str] = []

        async def none() -> list[str]:
            return []

        nat = NatTraversal(relay, "auto", lambda: listen_multiaddrs(relay), none, none,
                           lambda: changes.append(nat.reachability), probe_period=0)
        nat.probe = verdicts_out.receive  # type: ignore[method-assign] - the probe's verdicts, scripted
        handlers = relay.get_mux().handlers

        async def until(condition, what: str) -> None:
            with trio.move_on_after(15):
                while not condition():
                    await trio.sleep(0.05)
            assert condition(), f"not within 15 s: {what}"

        async with trio.open_nursery() as n, running_host(relay, ["/ip4/127.0.0.1/tcp/0"]), \
                running_host(b, ["/ip4/127.0.0.1/tcp/0"]):
            n.start_soon(verdicts_in.send, "public")
            await n.start(nat.run)
            assert nat.hop and nat.describe()["relay_service"] and HOP_PROTOCOL in handlers and changes == ["public"]

            async def the_relay() -> list[str]:
                return listen_multiaddrs(relay)[:1]

            await n.start(lambda task_status: run_relay_protocol(b, hop=False, task_status=task_status))
            reservations = Reservations(b, the_relay, lambda: None, want=1, check_period=0.2, retry_after=0.5)
            await n.start(reservations.run)
            assert reservations.relays() == [relay.get_id().to_base58()]

            await verdicts_in.send("private")
            await until(lambda: not nat.hop and changes[-1:] == ["private"], "hop stopped")
            assert HOP_PROTOCOL not in handlers and STOP_PROTOCOL in handlers
            assert not nat.describe()["relay_service"] and nat.reservations is not None
            # Disconnected, it notices; reserving again is refused (no hop service there any more).
            await until(lambda: not reservations.relays(), "the reserved peer noticed")
            await trio.sleep(1.0)  # a few checks and retries
            assert not reservations.relays()

            await verdicts_in.send("unknown")
            await verdicts_in.send("unknown")  # taken once the first one was applied
            assert nat.reachability == "private" and not nat.hop and changes[-1] == "private"

            await verdicts_in.send("public")
            await until(lambda: nat.hop and HOP_PROTOCOL in handlers, "hop back")
            assert changes[-1] == "public" and STOP_PROTOCOL in handlers
            await until(lambda: reservations.relays() == [relay.get_id().to_base58()], "reserved again")
            n.cancel_scope.cancel()

    trio.run(main)
