"""Placement is pure: choose the worst-served span, move only to improve, never open a gap."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petalsd.placement import block_throughputs, choose_span, default_num_blocks, should_move, uncovered_blocks

BLOCKS = 12


@dataclass(frozen=True)
class Span:
    peer_id: bytes
    start_block: int
    end_block: int
    throughput: float = 10.0
    state: str = "online"


def join(swarm: list[Span], name: str, n: int, throughput: float = 10.0) -> Span:
    start, end = choose_span(swarm, BLOCKS, n)
    me = Span(name.encode(), start, end, throughput)
    swarm.append(me)
    return me


def test_three_daemons_of_four_blocks_cover_a_twelve_block_model() -> None:
    swarm: list[Span] = []
    spans = [(join(swarm, name, 4).start_block, swarm[-1].end_block) for name in "abc"]
    assert spans == [(0, 4), (4, 8), (8, 12)]
    assert uncovered_blocks(swarm, BLOCKS) == []
    assert block_throughputs(swarm, BLOCKS) == [10.0] * BLOCKS


def test_choose_span_takes_the_weakest_window_first_gap_on_ties() -> None:
    swarm = [Span(b"a", 0, 6, 5.0), Span(b"b", 6, 12, 20.0)]
    assert choose_span(swarm, BLOCKS, 4) == (0, 4)
    assert choose_span([Span(b"a", 0, 3), Span(b"b", 5, 12)], BLOCKS, 2) == (3, 5)
    assert choose_span([], BLOCKS, 4) == (0, 4)
    assert choose_span([], BLOCKS, 40) == (0, 12)  # clamped to the model
    # offline and draining daemons do not count; joining ones do
    assert choose_span([Span(b"a", 0, 4, state="offline"), Span(b"b", 4, 12)], BLOCKS, 4) == (0, 4)
    assert choose_span([Span(b"a", 0, 4, state="joining"), Span(b"b", 8, 12)], BLOCKS, 4) == (4, 8)
    # a block covered only by a zero-throughput daemon still ranks above a gap
    assert choose_span([Span(b"a", 0, 4, 0.0), Span(b"b", 8, 12)], BLOCKS, 4) == (4, 8)
    with pytest.raises(ValueError):
        choose_span([], BLOCKS, 0)


def test_after_one_leaves_a_redundant_daemon_recovers_its_blocks_and_sole_holders_stay() -> None:
    swarm: list[Span] = []
    a, b, c = (join(swarm, name, 4) for name in "abc")
    d = join(swarm, "d", 4)
    assert (d.start_block, d.end_block) == (0, 4)  # ties -> first window
    swarm.remove(c)
    assert uncovered_blocks(swarm, BLOCKS) == [8, 9, 10, 11]
    assert should_move(swarm, b, BLOCKS, 0.75) is None  # sole holder of 4:8: moving would open a gap
    new = should_move(swarm, d, BLOCKS, 0.75)
    assert new == (8, 12)
    swarm[swarm.index(d)] = replace(d, start_block=new[0], end_block=new[1])
    assert uncovered_blocks(swarm, BLOCKS) == []
    for me in swarm:
        assert should_move(swarm, me, BLOCKS, 0.75) is None  # balanced: nobody moves again


def test_should_move_respects_balance_quality() -> None:
    # 0:6 is served at 10, 6:12 at 10+10+10: moving one of the 6:12 daemons doubles the minimum.
    swarm = [Span(b"a", 0, 6), Span(b"b", 6, 12), Span(b"c", 6, 12), Span(b"d", 6, 12)]
    assert should_move(swarm, swarm[3], BLOCKS, 0.75) == (0, 6)
    assert should_move(swarm, swarm[3], BLOCKS, 0.4) is None  # 10/20 = 0.5 is not below 0.4
    # a small gain is not worth reloading weights
    uneven = [Span(b"a", 0, 6, 10.0), Span(b"b", 6, 12, 10.0), Span(b"c", 6, 12, 1.0)]
    assert should_move(uneven, uneven[2], BLOCKS, 0.75) is None
    assert should_move(uneven, uneven[2], BLOCKS, 1.0) is None  # min stays 10 (at 6:12 without c)


def test_default_num_blocks_keeps_headroom() -> None:
    assert default_num_blocks(16 * 2**30, 2**30) == 12
    assert default_num_blocks(2 * 2**30, 2**30) == 1
    with pytest.raises(ValueError, match="one block needs"):
        default_num_blocks(2**30, 2**30)
    with pytest.raises(ValueError):
        default_num_blocks(2**30, 0)


spans = st.lists(
    st.tuples(st.integers(0, BLOCKS - 1), st.integers(1, 6), st.floats(0.0, 100.0), st.sampled_from(["online", "joining", "offline"])),
    min_size=1, max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(spans, st.integers(0, 7), st.floats(0.0, 1.5))
def test_moving_never_uncovers_a_covered_block_and_never_lowers_the_minimum(raw, which, quality) -> None:
    swarm = [Span(bytes([i]), s, min(s + n, BLOCKS), t, state) for i, (s, n, t, state) in enumerate(raw)]
    me = swarm[which % len(swarm)]
    new = should_move(swarm, me, BLOCKS, quality)
    if new is None:
        return
    assert new[1] - new[0] == me.end_block - me.start_block
    moved = [replace(s, start_block=new[0], end_block=new[1]) if s is me else s for s in swarm]
    assert set(uncovered_blocks(moved, BLOCKS)) <= set(uncovered_blocks(swarm, BLOCKS))
    assert uncovered_blocks(moved, BLOCKS) == []
    assert min(block_throughputs(moved, BLOCKS)) >= min(block_throughputs(swarm, BLOCKS))
