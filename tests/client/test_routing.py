"""Route choice: cheapest chain, bans, cache room, clear errors naming the gaps."""
from dataclasses import replace

import pytest

from petals_client.routing import NoRoute, ServerInfo, choose_route, describe_route, uncovered_blocks


def server(name: str, start: int, end: int, *, thr: float = 10.0, rtt: float = 0.005,
           cache: int = 10_000, state: str = "online") -> ServerInfo:
    return ServerInfo(peer_id=f"peer-{name}", addrs=(), start=start, end=end, throughput=thr,
                      cache_tokens_free=cache, state=state, public_name=name, rtt=rtt)


def names(route):
    return [(h.server.public_name, h.start, h.end) for h in route]


def test_covers_all_blocks_with_the_fewest_expensive_hops():
    servers = [server("a", 0, 4), server("b", 4, 8), server("c", 0, 8, thr=4.0)]
    # a+b: 2 x 5 ms + 8/10 s = 0.81; c alone: 5 ms + 8/4 = 2.005
    assert names(choose_route(servers, 0, 8)) == [("a", 0, 4), ("b", 4, 8)]


def test_fast_whole_model_daemon_beats_two_hops():
    servers = [server("a", 0, 4), server("b", 4, 8), server("c", 0, 8, thr=100.0)]
    assert names(choose_route(servers, 0, 8)) == [("c", 0, 8)]


def test_overlapping_spans_enter_mid_span():
    servers = [server("a", 0, 6), server("b", 3, 8)]
    assert names(choose_route(servers, 0, 8)) == [("a", 0, 6), ("b", 6, 8)]


def test_sub_range_for_recovery():
    servers = [server("a", 0, 8), server("b", 2, 5)]
    route = choose_route(servers, 2, 5, banned={"peer-b"})
    assert names(route) == [("a", 2, 5)]


def test_banned_and_offline_daemons_are_avoided():
    servers = [server("a", 0, 4), server("a2", 0, 4, thr=1.0), server("b", 4, 8), server("x", 0, 8, state="offline")]
    assert names(choose_route(servers, 0, 8, banned={"peer-a"})) == [("a2", 0, 4), ("b", 4, 8)]


def test_daemon_without_cache_room_is_a_last_resort():
    servers = [server("full", 0, 8, thr=100.0, cache=10), server("a", 0, 4), server("b", 4, 8)]
    assert names(choose_route(servers, 0, 8, cache_tokens_needed=512)) == [("a", 0, 4), ("b", 4, 8)]
    assert names(choose_route(servers[:1], 0, 8, cache_tokens_needed=512)) == [("full", 0, 8)]


def test_gap_is_named_with_a_hint():
    servers = [server("a", 0, 3), server("b", 5, 8)]
    with pytest.raises(NoRoute) as info:
        choose_route(servers, 0, 8)
    assert info.value.uncovered == [(3, 5)]
    assert "3:5" in str(info.value) and "petalsd" in str(info.value)


def test_gap_caused_by_bans_says_so():
    with pytest.raises(NoRoute) as info:
        choose_route([server("a", 0, 8)], 0, 8, banned={"peer-a"})
    assert "banned" in str(info.value)


def test_uncovered_blocks_and_description():
    assert uncovered_blocks([server("a", 1, 2), server("b", 4, 6)], 0, 6) == [(0, 1), (2, 4)]
    assert describe_route(choose_route([server("a", 0, 2)], 0, 2)) == "0:2 via a"


def test_a_direct_daemon_wins_over_a_relayed_one_that_measured_a_little_faster():
    import dataclasses

    direct = server("direct", 0, 6, rtt=0.012)
    relayed = dataclasses.replace(server("relayed", 0, 6, rtt=0.008), using_relay=True)
    assert names(choose_route([relayed, direct], 0, 6)) == [("direct", 0, 6)]
    much_faster = dataclasses.replace(relayed, rtt=0.001, throughput=1000.0)
    assert names(choose_route([much_faster, direct], 0, 6)) == [("relayed", 0, 6)]


def test_daemon_measured_next_leg_decides_between_equal_client_rtts():
    """With push, a step goes a -> b daemon to daemon: the leg `a` measured (its record's
    next_rtts) counts, not the client's round trip to b, which is the same for both chains here."""
    b, b2 = server("b", 4, 8, rtt=0.05), server("b2", 4, 8, rtt=0.05)
    slow_next = replace(server("a", 0, 4, rtt=0.05), next_rtts=(("peer-b", 0.2), ("peer-b2", 0.15)))
    fast_next = replace(server("a2", 0, 4, rtt=0.05), next_rtts=(("peer-b", 0.01),))
    assert names(choose_route([slow_next, fast_next, b, b2], 0, 8)) == [("a2", 0, 4), ("b", 4, 8)]
    # Each first hop picks its own best next daemon: without a2, a's shorter leg (to b2) wins.
    assert names(choose_route([slow_next, b, b2], 0, 8)) == [("a", 0, 4), ("b2", 4, 8)]
    # The client drives every hop without push: daemon-to-daemon legs do not matter, and the
    # first daemon of the list wins the tie.
    assert names(choose_route([slow_next, fast_next, b, b2], 0, 8, push=False))[0] == ("a", 0, 4)


def test_unmeasured_legs_fall_back_to_the_client_rtt():
    """A record without next_rtts (an older daemon) or without this peer: the client's round trip."""
    a = replace(server("a", 0, 4), next_rtts=(("peer-other", 0.001),))
    near, far = server("near", 4, 8, rtt=0.01), server("far", 4, 8, rtt=0.3)
    assert names(choose_route([a, far, near], 0, 8)) == [("a", 0, 4), ("near", 4, 8)]

