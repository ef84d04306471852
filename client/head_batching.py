"""The client's head for many concurrent sessions at once: one matmul instead of one per session.

Each session's `generate` runs in its caller's thread and ends every step with the head (final
norm + LM head: on the 271M Llama, a 1024 x 32000 matrix, 131 MB of fp32 weights read per call).
Eight sessions computing it one by one read those weights eight times per token, and, worse, come
out of the head at different times: they reach the first daemon one by one and its decode batcher
finds nobody to batch with. `HeadBatcher` lets the threads that need the head at about the same
time share one call: the first to arrive leads, waits briefly for the other expected sessions
(`petals_protocol.models.gathering.GatherPolicy`: only sessions active in the last second, never
for a lone session, and at most about two heads' time), stacks the waiting rows, computes once and
hands each thread its rows. Threads arriving while a batch computes wait for the next one.

Parity: a matmul over several rows rounds differently from one over a single row (CPU kernels
reduce in another order; measured max abs difference ~1.4e-6 on the 271M head), so batched
logits are not bit-identical to local `transformers`: this is opt-in (`from_pretrained(...,
batching=True)`), like the daemons' `--batching`. A lone session always takes the exact path.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from petals_protocol.models.gathering import GatherPolicy


@dataclass(eq=False)
class _Request:
    session: object
    hidden: torch.Tensor  # [b, 1, H]
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class HeadBatcher:
    """Thread-safe: `batcher(session, hidden)` returns `head(hidden)`, possibly computed in a batch."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], policy: GatherPolicy | None = None,
                 max_rows: int = 64, *, batched_head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.head = head  # a lone request's exact path
        self.batched_head = batched_head or head  # several rows (e.g. ClientPart.packed_logits: faster)
        self.max_rows = max_rows
        self._policy = policy or GatherPolicy()
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._leading = False  # a thread is gathering or computing a batch
        self.batches = 0  # head calls that served two requests or more
        self.batched_requests = 0

    def forget(self, session: object) -> None:
        """`session` closed: stop waiting for its steps."""
        with self._cond:
            self._policy.forget(session)

    def __call__(self, session: object, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.ndim != 3 or hidden.shape[1] != 1:  # prefill and odd shapes: the plain call
            return self.head(hidden)
        request = _Request(session, hidden)
        with self._cond:
            self._policy.arrived(session, time.monotonic())
            self._pending.append(request)
            self._cond.notify_all()
        while True:
            with self._cond:
                while self._leading and not request.done:
                    self._cond.wait()
                if request.done:
                    return self._outcome(request)
                self._leading = True  # still pending: lead the next batch (it may not reach us)
            self._lead(request)

    def _lead(self, own: _Request) -> None:
        """Gather, take and run one batch, then hand leadership on. Interrupted while gathering
        (KeyboardInterrupt in this thread), `own` is withdrawn and the interruption propagates."""
        batch: list[_Request] = []
        try:
            with self._cond:
                self._gather(time.monotonic())
                batch = self._take()
            self._run(batch)
        except BaseException:
            with self._cond:
                if own in self._pending:
                    self._pending.remove(own)
                    own.error, own.done = RuntimeError("interrupted while waiting for the head"), True
            raise
        finally:
            with self._cond:
                for item in batch:
                    if item.result is None and item.error is None:
                        item.error = RuntimeError("the head batch computing this request was interrupted")
                    item.done = True
                self._leading = False
                self._cond.notify_all()

    def _gather(self, now: float) -> None:
        """(Lock held.) Wait for the expected sessions' requests, at most the policy's window."""
        want, window = self._policy.want(now, {r.session for r in self._pending})
        deadline = now + window
        while len(self._pending) < want and sum(r.hidden.shape[0] for r in self._pending) < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)

    def _take(self) -> list[_Request]:
        """(Lock held.) Pending requests in arrival order, up to `max_rows` rows (at least one)."""
        batch: list[_Request] = []
        taken = 0
        while self._pending and (not batch or taken + self._pending[0].hidden.shape[0] <= self.max_rows):
            request = self._pending.pop(0)
            batch.append(request)
            taken += request.hidden.shape[0]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        began = time.perf_counter()
        try:
            if len(batch) == 1:
                batch[0].result = self.head(batch[0].hidden)  # the exact per-session path
            else:
                out = self.batched_head(torch.cat([r.hidden for r in batch], dim=0))
                row = 0
                for request in batch:
                    rows = request.hidden.shape[0]
                    request.result = out[row:row + rows]
                    row += rows
                self.batches += 1
                self.batched_requests += len(batch)
        except Exception as exc:  # every request of the batch gets the error, raised in its thread
            for request in batch:
                request.error = exc
        with self._cond:
            self._policy.job_done(time.perf_counter() - began)

    @staticmethod
    def _outcome(request: _Request) -> torch.Tensor:
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result
