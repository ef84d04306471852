"""When to stop waiting for more work before running a batch: the policy both batchers share.

A batcher (the daemon's decode batcher, the client's head batcher) gains when concurrent sessions'
steps run as one batched computation: the weights are read once for all of them. Steps do not
arrive together, though: sessions drift apart by the time each spends elsewhere in the chain. So
a step waits a little for the other sessions that are *expected* (active within ``recent_s``)
before its batch runs. How long is the question this module answers:

- never, when no other session is expected: a lone session runs at once, on the exact
  per-session path, so batching costs a single user nothing;
- only for the sessions whose next step is due within the window (each session's last arrival
  plus its last interval between steps): sessions in another phase of the chain are not waited
  for: two groups of sessions each waiting the whole window for the other would stretch every
  round by it (an 8-session run before this rule fell far below the other repeats with the cores
  half idle, BENCHMARKS.md, "Gather window"; such a split is the suspected cause, not a traced one);
- at most ``max_window_s``, and at most ``job_factor`` times the recent duration of a batch job
  (an exponential moving average). A batch of many rows costs about as much as one row (the work
  is reading weights), so waiting up to a couple of jobs' time for stragglers is repaid as soon as
  they join, while a session that stopped without closing (or is slow) costs the others a bounded
  delay that scales with the model (``job_factor`` jobs' time), not the whole ``max_window_s``.

All due sessions go into one batch. Splitting them into two half-size "convoys", so that
two stages of the chain compute at once, was tried on the 271M model (3 daemons, 8 sessions, 2
cores): each half cost nearly as much as the whole (two batches computing at once share the
memory bandwidth) and the daemons used more CPU per token, for a lower aggregate than with one
batch (figures: BENCHMARKS.md, "Gather window").

Pure bookkeeping, no clock of its own and no I/O (callers pass ``now``), so the daemon's trio
batcher and the client's threaded one share it and tests can drive it step by step. Not
thread-safe: callers hold their own lock.
"""
from __future__ import annotations

import weakref
from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class GatherPolicy:
    """Tracks when each session steps and how long batch jobs take; says whom to wait for, how long."""

    max_window_s: float = 0.05
    job_factor: float = 2.0
    recent_s: float = 1.0
    ema_weight: float = 0.2  # of the newest job duration in the moving average
    # session -> (last arrival, interval before it or None). A session is forgotten when it is
    # garbage-collected or forgotten (closed), and ignored once quiet for recent_s.
    _seen: weakref.WeakKeyDictionary[object, tuple[float, float | None]] = field(
        default_factory=weakref.WeakKeyDictionary)
    job_seconds: float | None = None  # moving average of batch job durations; None before the first

    def __post_init__(self) -> None:
        if self.max_window_s < 0 or self.job_factor < 0 or self.recent_s <= 0 or not 0 < self.ema_weight <= 1:
            raise ValueError(f"invalid gather policy {self}")

    def arrived(self, session: object, now: float) -> None:
        """A step of `session` (any weak-referenceable object standing for it) arrived at `now`."""
        previous = self._seen.get(session)
        interval = now - previous[0] if previous is not None and now - previous[0] <= self.recent_s else None
        self._seen[session] = (now, interval)

    def forget(self, session: object) -> None:
        """`session` ended: stop expecting its steps (it would otherwise count until recent_s)."""
        self._seen.pop(session, None)

    def active(self, now: float) -> int:
        """Sessions that stepped within `recent_s` of `now`."""
        horizon = now - self.recent_s
        return sum(1 for last, _ in list(self._seen.values()) if last >= horizon)

    def job_done(self, seconds: float) -> None:
        """A batch job ran for `seconds` (fold it into the moving average)."""
        if self.job_seconds is None:
            self.job_seconds = seconds
        else:
            self.job_seconds += self.ema_weight * (seconds - self.job_seconds)

    def window(self, now: float) -> float:
        """Seconds a step arriving at `now` may wait for others (0: run at once)."""
        if self.active(now) <= 1 or self.job_seconds is None:
            return 0.0  # alone, or nothing measured yet: never delay on a guess
        return min(self.max_window_s, self.job_factor * self.job_seconds)

    def want(self, now: float, pending: Collection[object]) -> tuple[int, float]:
        """How many sessions' steps to gather before running, and for at most how long: those
        already `pending`, plus the active sessions whose next step is due within the window
        (last arrival + their last interval; a session with no interval yet counts). Sessions in
        another phase of the chain (due later than the window) are not waited for: waiting
        would only stretch every round by the window."""
        window = self.window(now)
        if window <= 0:
            return len(pending), 0.0
        horizon = now - self.recent_s
        due = sum(1 for session, (last, interval) in list(self._seen.items())
                  if session not in pending and last >= horizon and (interval is None or last + interval <= now + window))
        return len(pending) + due, window
