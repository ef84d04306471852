"""Which blocks a daemon serves when it chooses itself (`--num-blocks N`): pure functions, no I/O.

The rule is Petals': the swarm is only as fast as its slowest block, so a daemon takes the N
contiguous blocks that are served worst, and later moves only when that raises the swarm's
minimum per-block throughput enough to be worth reloading weights.

"Served throughput" of a block = the sum of `throughput` over the daemons that cover it and are
`online` or `joining` (a joining daemon is loading those blocks: counting it keeps two newcomers
from piling into the same gap). A block nobody covers ranks below any covered one, even one
covered only by zero-throughput daemons.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = [
    "SERVING_STATES",
    "MEMORY_HEADROOM",
    "SpanHolder",
    "block_throughputs",
    "uncovered_blocks",
    "choose_span",
    "should_move",
    "default_num_blocks",
]

SERVING_STATES = frozenset({"online", "joining"})
#: Fraction of memory left for everything but weights: activations, KV caches, allocator slack.
MEMORY_HEADROOM = 0.25


class SpanHolder(Protocol):
    """What placement needs of a record: petals_protocol.records.ServerRecord satisfies it."""

    @property
    def peer_id(self) -> bytes: ...
    @property
    def start_block(self) -> int: ...
    @property
    def end_block(self) -> int: ...
    @property
    def throughput(self) -> float: ...
    @property
    def state(self) -> str: ...


_Coverage = list[tuple[int, float]]  # per block: (number of serving daemons, summed throughput)


def _coverage(records: Iterable[SpanHolder], num_blocks_total: int, *, exclude: bytes | None = None) -> _Coverage:
    cover: _Coverage = [(0, 0.0)] * num_blocks_total
    for record in records:
        if record.state not in SERVING_STATES or record.peer_id == exclude:
            continue
        for block in range(max(record.start_block, 0), min(record.end_block, num_blocks_total)):
            count, total = cover[block]
            cover[block] = (count + 1, total + max(record.throughput, 0.0))
    return cover


def block_throughputs(records: Iterable[SpanHolder], num_blocks_total: int) -> list[float]:
    """Served throughput of every block of the model."""
    return [total for _count, total in _coverage(records, num_blocks_total)]


def uncovered_blocks(records: Iterable[SpanHolder], num_blocks_total: int) -> list[int]:
    """Blocks no online or joining daemon covers."""
    return [block for block, (count, _t) in enumerate(_coverage(records, num_blocks_total)) if count == 0]


def _rank(cover: _Coverage, block: int) -> tuple[bool, float]:
    count, total = cover[block]
    return (count > 0, total)


def _best_start(cover: _Coverage, n: int) -> int:
    """Start of the window whose sorted per-block ranks are lexicographically smallest (Petals'
    `_choose_best_start`): the weakest block first, then the next weakest; ties -> first window."""
    windows = ((sorted(_rank(cover, b) for b in range(start, start + n)), start) for start in range(len(cover) - n + 1))
    return min(windows)[1]


def _check(num_blocks_total: int, n: int) -> int:
    if num_blocks_total < 1:
        raise ValueError(f"the model must have at least one block, got {num_blocks_total}")
    if n < 1:
        raise ValueError(f"a daemon serves at least one block, got {n}")
    return min(n, num_blocks_total)


def choose_span(records: Iterable[SpanHolder], num_blocks_total: int, n: int) -> tuple[int, int]:
    """The n contiguous blocks (clamped to the model) that the swarm serves worst, as (start, end)."""
    n = _check(num_blocks_total, n)
    start = _best_start(_coverage(records, num_blocks_total), n)
    return start, start + n


def should_move(
    records: Sequence[SpanHolder], me: SpanHolder, num_blocks_total: int, balance_quality: float
) -> tuple[int, int] | None:
    """Where to move my span of the same length, or None to stay.

    Simulates the swarm without me, puts me where `choose_span` would, and moves only if
    (1) no block covered now would become uncovered (moving never opens a gap), and
    (2) the swarm's minimum per-block throughput improves past the threshold:
        old_min < balance_quality * new_min  (Petals' `initial / new < balance_quality`).
    So 0.75 wants the weakest block ~1.33x faster after the move; a value near 0 never moves and
    1.0 moves on any strict improvement. Closing a gap (old minimum 0) always qualifies.
    `records` may or may not include my own record (matched by peer id; `me` is what counts).
    """
    length = _check(num_blocks_total, me.end_block - me.start_block)
    others = [r for r in records if r.peer_id != me.peer_id]
    before = _coverage([*others, me], num_blocks_total)
    without_me = _coverage(others, num_blocks_total)
    start = _best_start(without_me, length)
    if start == me.start_block:
        return None
    after = list(without_me)
    if me.state in SERVING_STATES:
        for block in range(start, start + length):
            count, total = after[block]
            after[block] = (count + 1, total + max(me.throughput, 0.0))
    if any(before[b][0] > 0 and after[b][0] == 0 for b in range(num_blocks_total)):
        return None
    if min(count for count, _t in after) == 0:
        return None  # a gap remains wherever I go: stay rather than reload for nothing
    old_min = min(total for _c, total in before) if min(count for count, _t in before) > 0 else 0.0
    new_min = min(total for _c, total in after)
    if new_min <= old_min or not old_min < balance_quality * new_min:
        return None
    return start, start + length


def default_num_blocks(memory_bytes: int, block_bytes: int, *, headroom: float = MEMORY_HEADROOM) -> int:
    """How many blocks fit in `memory_bytes`, keeping `headroom` of it free; at least 1.

    Raises ValueError when not even one block fits (the operator must pick a smaller dtype or a
    machine with more memory, not start a daemon that will be killed by the OOM killer).
    """
    if block_bytes <= 0:
        raise ValueError(f"block size must be positive, got {block_bytes}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    fits = int(memory_bytes * (1 - headroom)) // block_bytes
    if fits < 1:
        raise ValueError(
            f"one block needs {block_bytes / 2**20:.0f} MiB but only {memory_bytes * (1 - headroom) / 2**20:.0f} MiB "
            f"of {memory_bytes / 2**20:.0f} MiB may be used"
        )
    return fits
