"""Continuous batching: decode steps of concurrent sessions run as one forward in the worker.

Without it, 8 sessions stepping at once cost 8 separate [1, 1, H] forwards per token: every linear
layer's weights are read from memory 8 times. The batcher queues each decode step and lets the
first worker job that starts take every queued step (up to ``max_rows`` sequences) and run them as
one batched forward (``petals_protocol.models.batched``). Steps therefore gather for as long as the
worker is busy with something else, plus, when other sessions were active in the last
``recent_s`` seconds, a wait for them of at most ``job_factor`` recent batch jobs' time and
``max_window_s`` (``petals_protocol.models.gathering``; a lone session never waits). The wait is
what keeps sessions together: without it, sessions that drift a few ms apart elsewhere in the
chain (the client computes each session's head on its own) reach the worker one by one and run
one by one (with a short fixed wait, most of an 8-session run's jobs held a single step; figures:
BENCHMARKS.md, "Gather window").

How it fits on the FIFO ``ComputeWorker``: every step still submits one job of its own, so queued
steps always have a job that will take them; a job whose step was already taken by an earlier
batch returns at once. The queue is shared with worker threads, hence a ``threading.Lock``.

Cancellation: a step cancelled while still queued is removed and its cache is untouched; a step
cancelled once a batch has taken it behaves like a cancelled per-session step (the compute finishes,
the cache advances, the result is dropped), and the other sessions of that batch get their results.

Parity: batched linear layers round differently from per-session ones on CPU (see
``petals_protocol.models.batched``), so batching is off by default (``BatchingConfig.enabled``).
When off, or for prefill, beam reorders of non-Llama families, or a lone step, a step goes through
``Span.forward`` exactly as before.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from petals_protocol.models.batched import DecodeItem, batched_decode, can_batch, check_item
from petals_protocol.models.gathering import GatherPolicy
from petals_protocol.models.span import SpanCache, SpanUsageError
from petals_protocol.tensors import TensorPayload, as_activation_dtype, from_torch, to_torch

from .adapters import run_with
from .compute import ComputeWorker


@dataclass(frozen=True)
class BatchingConfig:
    """How the daemon batches decode steps (``--batching on|off``; off by default, see module doc)."""

    enabled: bool = False
    max_rows: int = 8  # sequences in one batched forward
    max_window_s: float = 0.05  # the longest a step waits for other recently active sessions
    job_factor: float = 2.0  # ... and at most this many recent batch jobs' duration
    recent_s: float = 1.0  # a session that stepped this recently is expected to step again

    def gather_policy(self) -> GatherPolicy:
        return GatherPolicy(max_window_s=self.max_window_s, job_factor=self.job_factor, recent_s=self.recent_s)


def prepare_cache(cache: SpanCache, position: int | None, hypo_ids: torch.Tensor | None) -> None:
    """Roll the cache back to ``position`` and apply a beam reorder, as a session step requires."""
    if position is not None and position < cache.length:
        cache.crop(position)
    if hypo_ids is not None:
        cache.reorder(hypo_ids)


def run_single_step(span: Any, cache: SpanCache, hidden: torch.Tensor | TensorPayload, start: int | None,
                    end: int | None, position: int | None, hypo_ids: torch.Tensor | None,
                    prompts: torch.Tensor | None = None) -> TensorPayload:
    """The per-session path (worker thread): one session's step through ``Span.forward``, its
    input made a tensor and its output serialized there too (off the event loop, like a batch's),
    in the dtype its input came in (a compressed step is answered compressed, tensors.CODECS)."""
    reply_dtype = hidden.dtype if isinstance(hidden, TensorPayload) else None
    hidden = as_tensor(hidden, span)
    prepare_cache(cache, position, hypo_ids)
    try:
        return reply(span.forward(hidden, cache, start, end, prompts), reply_dtype)
    except Exception:
        restore_cache(cache)
        raise


def as_tensor(hidden: torch.Tensor | TensorPayload, span: Any) -> torch.Tensor:
    """(Worker thread.) A step's input as a tensor in the span's dtype: one received from a peer is
    still its wire payload until here, so that a large prefill is not copied on the event loop (and
    a compressed one, tensors.CODECS, is widened here too)."""
    if isinstance(hidden, TensorPayload):
        return to_torch(hidden, device=span.device).to(span.dtype)
    return hidden


def reply(output: torch.Tensor, dtype: str | None) -> TensorPayload:
    """(Worker thread.) A step's output as the payload sent on: in `dtype` (its input's on the wire),
    packed once."""
    return serialized(from_torch(output if dtype is None else as_activation_dtype(output, dtype)))


def serialized(output: TensorPayload) -> TensorPayload:
    """(Worker thread.) Pack a step's output into msgpack here, once: the handler sends these same
    bytes to the next daemon (push) and to the client, and the event loop only splices them."""
    output.packed()
    return output


def restore_cache(cache: SpanCache) -> None:
    """After a step failed midway (a torch error in block k): the blocks before k have appended the
    step's tokens, the rest have not, and ``cache.length`` still counts only whole steps. Cut every
    layer back to that length, so the session goes on (or is replayed) from a consistent cache."""
    cache.crop(cache.length)


@dataclass(eq=False)
class _Step:
    """One queued decode step and, once a batch ran it, its outcome."""

    cache: SpanCache
    hidden: torch.Tensor | TensorPayload  # a tensor once the worker has taken the step
    start: int | None
    end: int | None
    position: int | None
    hypo_ids: torch.Tensor | None
    reply_dtype: str | None = None  # the dtype its input came in, on the wire (None: a tensor given)
    done: trio.Event = field(default_factory=trio.Event)
    # Cancelled when the step's result is delivered: its task stops waiting (for the gather window
    # or for a worker turn of its own, which would only find the step taken) and returns at once.
    waiting: trio.CancelScope = field(default_factory=trio.CancelScope)
    taken: bool = False
    result: TensorPayload | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])


class Batcher:
    """Where a daemon runs every session step: alone (``run_single_step``, one compute job) or,
    when ``config.enabled``, merged with other sessions' concurrent decode steps.

    ``await batcher.step(cache, hidden, start, end, position=..., hypo_ids=..., peer=...)``: the
    step's output as a wire payload (serialized on the worker thread), the same errors
    (``SpanUsageError``) either way, ``position`` rolls the cache back, ``hypo_ids`` reorders it.
    """

    def __init__(self, worker: ComputeWorker, span: Any, config: BatchingConfig | None = None) -> None:
        self.worker = worker
        self.span = span
        self.config = config or BatchingConfig()
        self._lock = threading.Lock()  # guards _pending and _Step.taken (worker threads take steps)
        self._pending: list[_Step] = []
        self._arrived = trio.Event()
        self._policy = self.config.gather_policy()  # used on the trio thread only
        self._token: trio.lowlevel.TrioToken | None = None  # jobs deliver results through it
        self.batches = 0  # batched forwards run (two steps or more)
        self.batched_steps = 0  # steps that ran inside one of them

    async def step(self, cache: SpanCache, hidden: torch.Tensor | TensorPayload, start: int | None = None,
                   end: int | None = None,
                   *, position: int | None = None, hypo_ids: torch.Tensor | None = None,
                   prompts: torch.Tensor | None = None, adapter: str | None = None,
                   peer: str = "") -> TensorPayload:
        """Run one step of the session owning ``cache`` (of ``peer``: its turn among peers' jobs),
        with deep ``prompts`` and LoRA ``adapter`` if given (such steps run alone: a batched forward
        uses the base weights and no prompts); return its output hidden states. ``hidden`` may be
        the wire payload a peer sent: it becomes a tensor on the worker thread."""
        tokens = int(hidden.shape[0] * hidden.shape[1])
        batchable = self.config.enabled and prompts is None and adapter is None and can_batch(
            self.span, hidden if isinstance(hidden, torch.Tensor) else torch.empty(hidden.shape, device="meta"), cache)
        if batchable:
            now = time.monotonic()
            self._policy.arrived(cache, now)
            # Alone (no other session active, nothing queued, the worker idle so no other step
            # can join while this one waits): the job a batch of one would run, without the
            # queue, the hand-over through the trio token and the done event (scheduler passes
            # less per hop; figures: BENCHMARKS.md, "A lone session skips the batch queue").
            batchable = self._policy.active(now) > 1 or bool(self._pending) or self.worker.busy
        if not batchable:
            return await self.worker.run(run_with, self.span, adapter, run_single_step, self.span, cache, hidden,
                                         start, end, position, hypo_ids, prompts, tokens=tokens, peer=peer)
        self._token = trio.lowlevel.current_trio_token()
        step = _Step(cache, hidden, start, end, position, hypo_ids,
                     reply_dtype=hidden.dtype if isinstance(hidden, TensorPayload) else None)
        self._enqueue(step)
        try:
            with step.waiting:
                await self._gather_window()
                await self.worker.run(self._take_and_run, step, peer=peer)
            await step.done.wait()
        except BaseException:
            with self._lock:
                if not step.taken:
                    self._pending.remove(step)
            raise
        if step.error is not None:
            raise step.error
        assert step.result is not None
        return step.result

    # ---------------------------------------------------------------------------- trio side

    def forget(self, cache: SpanCache) -> None:
        """The session owning `cache` closed: do not wait for its steps any more."""
        self._policy.forget(cache)

    def _enqueue(self, step: _Step) -> None:
        with self._lock:
            self._pending.append(step)
        self._arrived.set()
        self._arrived = trio.Event()

    async def _gather_window(self) -> None:
        """Wait until one batch's worth of steps is queued (see the module docstring), not longer
        than the policy's window."""
        with self._lock:
            pending = {step.cache for step in self._pending}
        want, window = self._policy.want(time.monotonic(), pending)
        if want > 1 and window > 0:
            with trio.move_on_after(window):
                while len(self._pending) < want and sum(step.rows for step in self._pending) < self.config.max_rows:
                    await self._arrived.wait()

    def _deliver(self, batch: Sequence[_Step], seconds: float, runner: _Step) -> None:
        """(Trio thread, called soon by the job itself.) Wake the steps a job ran, all at once: a
        step whose own job is still queued behind others must not wait for its turn in the worker
        (waking each step from its own job made the last step of a batch reach the next daemon well
        after the first; BENCHMARKS.md, "Gather window"). The step whose job ran the batch
        (`runner`) returns from the worker normally, so the worker's statistics count the job."""
        self._policy.job_done(seconds)
        for step in batch:
            step.done.set()
            if step is not runner:
                step.waiting.cancel()
        self.worker.stats.tokens += sum(step.rows for step in batch)

    # -------------------------------------------------------------------------- worker side

    def _take(self) -> list[_Step]:
        """Queued steps in arrival order, up to ``max_rows`` sequences, one step per session."""
        batch: list[_Step] = []
        caches: set[int] = set()
        rows = 0
        with self._lock:
            for step in list(self._pending):
                if id(step.cache) in caches:
                    continue
                if batch and rows + step.rows > self.config.max_rows:
                    break
                batch.append(step)
                caches.add(id(step.cache))
                rows += step.rows
                step.taken = True
                self._pending.remove(step)
        return batch

    def _take_and_run(self, own: _Step) -> None:
        """Worker thread: unless a previous batch already ran ``own``, run everything queued, and
        have the trio thread deliver the outcomes (even if ``own``'s task was cancelled meanwhile)."""
        with self._lock:
            if own.taken:
                return
        began = time.perf_counter()
        batch = self._take()
        try:
            self._run(batch)
        except Exception as exc:  # every taken step needs an outcome, or its caller waits forever
            for step in batch:
                if step.result is None and step.error is None:
                    step.error = exc
        assert self._token is not None
        self._token.run_sync_soon(self._deliver, batch, time.perf_counter() - began, own)

    def _run(self, batch: Sequence[_Step]) -> None:
        """Prepare each cache, then one forward per group of steps over the same blocks."""
        groups: dict[tuple[int, int], list[_Step]] = {}
        for step in batch:
            try:
                step.hidden = as_tensor(step.hidden, self.span)
                prepare_cache(step.cache, step.position, step.hypo_ids)
                self._check_range(step)
                step.hidden = check_item(self.span, DecodeItem(step.hidden, step.cache))
            except Exception as exc:  # a bad step fails alone; its error goes to its caller
                step.error = exc
                continue
            groups.setdefault((step.cache.start, step.cache.end), []).append(step)
        for group in groups.values():
            try:
                if len(group) == 1:  # a lone step takes the exact per-session path (cache already prepared)
                    (step,) = group
                    step.result = reply(self.span.forward(step.hidden, step.cache), step.reply_dtype)
                else:
                    outputs = batched_decode(self.span, [DecodeItem(s.hidden, s.cache) for s in group])
                    self.batches += 1  # only the worker thread (capacity 1) writes these
                    self.batched_steps += len(group)
                    for step, out in zip(group, outputs, strict=True):
                        step.result = reply(out, step.reply_dtype)
            except Exception as exc:  # routed to every caller of the group, raised there
                for step in group:
                    restore_cache(step.cache)
                    step.error = exc

    @staticmethod
    def _check_range(step: _Step) -> None:
        """The blocks asked for must be the cache's (``Span.forward`` checks the same)."""
        start = step.cache.start if step.start is None else step.start
        end = step.cache.end if step.end is None else step.end
        if (start, end) != (step.cache.start, step.cache.end):
            raise SpanUsageError(f"cache is for blocks [{step.cache.start}, {step.cache.end}), "
                                 f"not [{start}, {end})")
