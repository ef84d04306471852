"""The client's chain of hops as a sans-IO state machine: what to send where, what each reply must
be, and what to do when a hop fails.

h11 style: this module keeps the state (hops, each hop's replay memory and step counter, push on
or off) and makes every decision, but never touches a stream, a clock or the event loop: it imports
no trio and does no I/O. client/session.py is the trio layer that performs its actions (send,
receive under a timeout, recover a hop) and feeds back what happened (a reply, a failure classified
as a `Fault`, the time). So every recovery rule can be tested in memory, in milliseconds
(tests/client/test_chain.py).

State per hop (`HopState`): the daemon's session, the step number it expects next, and its replay
memory: the inputs it consumed, as the payloads that were sent (`TensorPayload`, bytes; turned into
torch only when a step is spot-checked or the caller needs the output), in their original chunks.

Digest chaining: with push on, a step goes to the first hop of a round only, naming the next hops
(`push_targets`); each pushed hop's result must be signed over an input equal to the previous hop's
verified output, so the client checks it against the step it would have sent itself.

Decisions (`StepRun.failed`, `Chain.recovery`, `Chain.replacement_failed`):
- a hop that fails (stream closed, timeout, error reply, bad signature) is recovered: rolled back to
  the step's position, then resumed on the same daemon after an idle close (or when it is reached
  only through relays), else banned and replaced by a chain for exactly its blocks, with its replay
  memory replayed; the step is retried from that hop;
- a pushed hop that answers with an error or a result that does not verify is resent the step
  directly (its input may have come wrong from the previous daemon): nobody is blamed yet;
- a pushed hop that times out turns push off for the rest of the session, then is recovered;
- a daemon refusing the request itself (`CALLER_FAULTS`) ends the step: every daemon would refuse it;
- one step survives at most `max_retries` failures, one replacement search `max_retries` attempts
  (backoff doubling, capped): then `SessionFailed` names the blocks;
- a hop found wrong by a spot check (`wrong_output`) rolls back every hop from it on, is replaced
  (never resumed) and the step runs again from it.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from petals_protocol.errors import ErrorCode, PetalsError, ProtocolError, RemoteError
from petals_protocol.messages import MAX_PUSH_HOPS, InferenceStep, PushTarget, StepResult
from petals_protocol.signing import inference_binding
from petals_protocol.tensors import TensorPayload, from_torch, to_torch

from .replies import check_reply
from .routing import Hop, NoRoute

log = logging.getLogger("petals_client.session")

#: Daemon replies that blame our request: another daemon would refuse it too, so do not retry.
CALLER_FAULTS = frozenset({ErrorCode.TOO_LONG, ErrorCode.BAD_TENSOR, ErrorCode.BAD_REQUEST, ErrorCode.WRONG_MODEL})
#: A hop quiet for this long whose stream then turns out closed was most likely closed by the
#: daemon's idle timeouts (connection or session), not by a crash: during generation steps follow
#: each other within milliseconds, and idle timeouts are seconds at the least.
IDLE_RESUME_AFTER = 1.0
#: Backoff between replacement attempts: first delay, and the cap of its doubling.
RETRY_DELAY = 0.2
RETRY_DELAY_MAX = 5.0


class SessionFailed(PetalsError):
    """The session could not continue: every retry failed or no daemon is left for some blocks.

    `blocks` is the range [start, end) that could not be served; the cause is chained.
    """

    code = ErrorCode.UNSUPPORTED

    def __init__(self, blocks: tuple[int, int], message: str) -> None:
        super().__init__(message)
        self.blocks = blocks


class WrongOutput(PetalsError):
    """A hop's daemon answered a step wrong (found by a spot check, client/spotcheck.py); it is
    replaced like a failed one, but never resumed."""

    code = ErrorCode.INTERNAL


class ReplayFailed(PetalsError):
    """Replaying a hop's memory to daemon `peer` (a replacement, or the same daemon resumed) failed."""

    def __init__(self, peer: str, cause: BaseException) -> None:
        super().__init__(f"replay to {peer} failed ({type(cause).__name__}: {cause})")
        self.peer = peer
        self.cause = cause


class Fault(enum.Enum):
    """How a hop failed, as the I/O layer saw it."""

    CLOSED = "closed"  # the stream ended (the daemon closed it, reset it, or the connection died)
    TIMEOUT = "timeout"  # no answer within step_timeout
    REPLY = "reply"  # it answered: an error reply, or a reply that is malformed or does not verify
    NETWORK = "network"  # any other transport error


@dataclass
class HopState:
    """One hop of the chain: a session on one daemon for blocks [hop.start, hop.end)."""

    hop: Hop
    session_id: bytes
    peer: bytes  # the daemon's peer id (what its signatures verify against)
    relayed: bool = False  # reachable only through relays (resumed there before it is given up)
    # Inputs this hop has consumed, in the chunks they were sent: replayed to a replacement.
    chunks: list[TensorPayload] = field(default_factory=list)
    position: int = 0
    step: int = 0
    # When the last reply came (or the hop opened), and when the last step went out: the gap is
    # how long the hop had been quiet when the step that failed went out.
    last_active: float = 0.0
    last_sent: float = 0.0

    def rollback(self, position: int) -> None:
        """Trim the replay memory to `position` tokens (the daemon crops its cache likewise)."""
        if position == self.position:
            return  # the usual decode step: nothing to trim (and no walk over every chunk)
        kept: list[TensorPayload] = []
        total = 0
        for chunk in self.chunks:
            if total >= position:
                break
            take = min(chunk.shape[1], position - total)
            kept.append(chunk if take == chunk.shape[1] else from_torch(to_torch(chunk)[:, :take].contiguous()))
            total += take
        self.chunks = kept
        self.position = position

    def commit(self, hidden: TensorPayload, position: int) -> None:
        """The hop consumed `hidden` at `position` (its result verified): remember it for replay."""
        self.rollback(position)
        self.chunks.append(hidden)
        self.position = position + hidden.shape[1]
        self.step += 1


@dataclass(frozen=True)
class Send:
    """Send `step` on `hop`'s stream, then report `StepRun.sent()`."""

    hop: HopState
    step: InferenceStep


@dataclass(frozen=True)
class Expect:
    """Receive `hop`'s result for `step` (within step_timeout), then report `StepRun.received()`.
    Results of earlier steps (`is_stale`) are answers to pushes no longer waited for: drop them."""

    hop: HopState
    step: InferenceStep

    def is_stale(self, reply: object) -> bool:
        return isinstance(reply, StepResult) and reply.session_id == self.hop.session_id and reply.step < self.step.step


@dataclass(frozen=True)
class Recover:
    """Replace hop `index` after `exc`. The I/O layer closes its stream, then: if `resume`,
    re-opens it on the same daemon and replays its memory (`Chain.replaced(..., resumed=True)`);
    if that fails or `resume` is false, bans the daemon and replaces the hop by a chain for its
    blocks, replayed (`Chain.replacement_failed` after each failed attempt, `Chain.replaced`)."""

    index: int
    failed: HopState
    exc: BaseException
    resume: bool
    idle_for: float


@dataclass(frozen=True)
class Prefill:
    """A pipelined prefill (`Chain.prefill`): `steps` go to the first hop back to back; `bases`:
    each hop's step number before it; `position`: where the prompt starts."""

    steps: list[InferenceStep]
    bases: list[int]
    position: int


def _push_field(targets: list[HopState], offset: int = 0) -> tuple[PushTarget, ...] | None:
    """`InferenceStep.push` naming `targets`, for the step `offset` steps after their next one."""
    return tuple(PushTarget(peer_id=s.peer, addr=s.hop.server.addrs[0], session_id=s.session_id,
                            start_block=s.hop.start, end_block=s.hop.end, step=s.step + offset)
                 for s in targets) or None


@dataclass(frozen=True)
class Done:
    """The step went through every hop: `output` is the last hop's verified output."""

    output: TensorPayload


@dataclass(frozen=True)
class Retry:
    """After a failed replacement attempt: ban `ban` (if any), re-learn the swarm if `refresh`,
    wait `delay` seconds (if any), try again."""

    ban: str | None
    refresh: bool
    delay: float | None


@dataclass
class Chain:
    """The hops of one inference session over blocks [start, end), and every decision about them."""

    start: int
    end: int
    model_fingerprint: str
    max_retries: int
    push: bool = True  # daemon-to-daemon forwarding (see client/session.py)
    hops: list[HopState] = field(default_factory=list)
    # Deep prompts [end - start, 1 or batch, K, hidden] (a torch tensor) for positions [0, K), sent
    # with the steps that cover those positions (replays too); such steps are not pushed.
    prompts: Any = None
    recoveries: int = 0  # failed daemons replaced
    resumes: int = 0  # hops re-opened on the same daemon after an idle close

    # ------------------------------------------------------------------ what to send
    def push_targets(self, index: int) -> list[HopState]:
        """The hops after `index` that hop `index` may push to: consecutive ones with a dialable
        address, on another daemon than the one before (a daemon does not push to itself)."""
        if not self.push:
            return []
        targets: list[HopState] = []
        for before, state in zip(self.hops[index:], self.hops[index + 1:index + 1 + MAX_PUSH_HOPS]):
            if not state.hop.server.addrs or state.hop.server.peer_id == before.hop.server.peer_id:
                break
            targets.append(state)
        return targets

    def prompts_for(self, state: HopState, position: int) -> TensorPayload | None:
        """The hop's blocks' deep prompts, for a step at `position` that reaches into the prefix."""
        if self.prompts is None or position >= self.prompts.shape[2]:
            return None
        return from_torch(self.prompts[state.hop.start - self.start:state.hop.end - self.start].contiguous())

    def replay_steps(self, state: HopState, chunks: list[TensorPayload]) -> list[InferenceStep]:
        """The steps that rebuild `chunks` (a replay memory) in a fresh hop, one per chunk as first
        sent (a matmul over a different number of tokens may round differently)."""
        steps: list[InferenceStep] = []
        position = state.position
        for i, hidden in enumerate(chunks):
            steps.append(InferenceStep(session_id=state.session_id, step=state.step + i, position=position,
                                       hidden=hidden, hypo_ids=None, prompts=self.prompts_for(state, position)))
            position += hidden.shape[1]
        return steps

    # ------------------------------------------------------------------ what a reply must be
    def check(self, state: HopState, sent: InferenceStep, reply: object, now: float) -> TensorPayload:
        """The verified output of `state`'s hop for `sent` (the step it was sent, or for a pushed
        hop the step the previous daemon should have sent it: its signed output as input)."""
        result = check_reply(reply, StepResult, state.hop.server.peer_id, lambda r: inference_binding(
            sent, start_block=state.hop.start, end_block=state.hop.end, model_fingerprint=self.model_fingerprint,
            output=r.hidden), signer=state.peer)
        if result.session_id != state.session_id or result.step != sent.step:
            raise ProtocolError(ErrorCode.MALFORMED, f"unexpected reply to step {sent.step}: step {result.step}")
        if result.hidden.shape != sent.hidden.shape or result.hidden.dtype != sent.hidden.dtype:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"reply shape {result.hidden.shape} != sent {sent.hidden.shape}")
        state.last_active = now
        return result.hidden

    def accept(self, state: HopState, sent: InferenceStep, reply: object, now: float) -> TensorPayload:
        """`reply` answers `sent` on `state`'s hop: checked, then `sent`'s input committed to the hop's
        replay memory. The hop's verified output."""
        output = self.check(state, sent, reply, now)
        state.commit(sent.hidden, sent.position)
        return output

    def pushed_step(self, state: HopState, sent: InferenceStep, hidden: TensorPayload) -> InferenceStep:
        """The step pushed hop `state` should have received for `sent` (a step to the hop before it):
        that hop's verified output `hidden` as input (the digest its signature must bind)."""
        return InferenceStep(session_id=state.session_id, step=state.step, position=sent.position, hidden=hidden,
                             hypo_ids=None)

    # ------------------------------------------------------------------ pipelined prefill
    def prefill(self, chunks: list[TensorPayload], position: int, now: float) -> Prefill | None:
        """A prompt of several `chunks` (in order, from `position`) pipelined through the chain: all
        sent to the first hop back to back, each pushed along every hop, so daemon k computes chunk
        i while daemon k-1 computes chunk i+1. None where the chain cannot take it so (push off,
        a hop it cannot push to, deep prompts in range): the prompt then runs as one step."""
        first = self.hops[0]
        pushed = self.push_targets(0)
        if len(chunks) < 2 or len(pushed) != len(self.hops) - 1 or self.prompts_for(first, position) is not None:
            return None
        steps: list[InferenceStep] = []
        at = position
        for i, hidden in enumerate(chunks):
            steps.append(InferenceStep(session_id=first.session_id, step=first.step + i, position=at, hidden=hidden,
                                       hypo_ids=None, push=_push_field(pushed, i)))
            at += hidden.shape[1]
        for state in self.hops:
            state.last_sent = now
        return Prefill(steps, [state.step for state in self.hops], position)

    def abandon(self, plan: Prefill) -> None:
        """A pipelined prefill failed: every hop back to its position, and its step number past every
        step the prefill sent or pushed it (their late results are then stale); the prompt runs again
        as one step, where every failure has its usual recovery."""
        for state, base in zip(self.hops, plan.bases):
            state.rollback(plan.position)
            state.step = base + len(plan.steps)

    # ------------------------------------------------------------------ running a step
    def run(self, index: int, hidden: TensorPayload, position: int) -> StepRun:
        """A step of `hidden` at `position` through the hops from `index` on."""
        return StepRun(self, index, hidden, position)

    # ------------------------------------------------------------------ recovery
    def recovery(self, index: int, exc: BaseException, fault: Fault, position: int) -> Recover:
        """How to replace hop `index`, failed with `exc` on a step at `position`. Raises `exc`
        itself when the daemon refused our request (another would refuse it too)."""
        failed = self.hops[index]
        failed.rollback(position)  # replay only what the step builds on
        if isinstance(exc, RemoteError) and exc.code in CALLER_FAULTS:
            raise exc
        idle_for = failed.last_sent - failed.last_active
        idle_close = fault is Fault.CLOSED or (isinstance(exc, RemoteError) and exc.code == ErrorCode.TIMEOUT)
        # A daemon reached through a relay may be fine while its relay is gone: try it through its
        # other addresses (relays) before giving up on it, as after an idle close.
        resume = not isinstance(exc, WrongOutput) and ((idle_close and idle_for >= IDLE_RESUME_AFTER) or failed.relayed)
        return Recover(index, failed, exc, resume, idle_for)

    def replacement_failed(self, attempt: int, exc: BaseException) -> Retry:
        """What to do after replacement attempt `attempt` (from 0) failed with `exc`."""
        bad = getattr(exc, "peer", None)
        return Retry(ban=bad if isinstance(bad, str) and bad else None, refresh=isinstance(exc, NoRoute),
                     delay=min(RETRY_DELAY * 2**attempt, RETRY_DELAY_MAX) if attempt + 1 < self.max_retries else None)

    def no_replacement(self, failed: HopState, last_error: BaseException | None) -> SessionFailed:
        """The error that ends the session when every replacement attempt failed."""
        start, end = failed.hop.start, failed.hop.end
        return SessionFailed((start, end),
                             f"blocks {start}:{end} could not be served after {self.max_retries} attempts: {last_error}")

    def replaced(self, index: int, replacement: list[HopState], *, resumed: bool) -> None:
        """Hop `index` is replaced by `replacement` (its memory replayed there)."""
        self.hops[index:index + 1] = replacement
        if resumed:
            self.resumes += 1
        else:
            self.recoveries += 1

    def wrong_output(self, index: int, position: int) -> TensorPayload:
        """A spot check found hop `index` wrong on the step at `position`: every hop from it on
        computed on a wrong output, so all are rolled back. Returns that step's input to the hop,
        to run again from its replacement (`recovery` with a `WrongOutput`)."""
        step_input = self.hops[index].chunks[-1]
        for later in self.hops[index:]:
            later.rollback(position)
        return step_input


class StepRun:
    """One step through the hops from `index` on, hop after hop (a round of pushed hops at a time).

    Drive it: `action = run.next()`; perform it; report `sent()`, `received(reply, now)` or
    `failed(exc, fault, now)`; after a `Recover`, `Chain.replaced(...)`; until `Done`.
    """

    def __init__(self, chain: Chain, index: int, hidden: TensorPayload, position: int) -> None:
        self.chain = chain
        self.index = index  # the first hop of the current round
        self.hidden = hidden  # the input of hop index + done
        self.position = position
        self.failures = 0
        self._round: list[HopState] = []  # the hops of the round in flight (first, then pushed ones)
        self._expected: InferenceStep | None = None
        self._sent = False
        self._done = 0  # hops of the round whose results are verified and committed
        self._recover: Recover | None = None

    def next(self, now: float) -> Send | Expect | Recover | Done:
        if self._recover is not None:
            action, self._recover = self._recover, None
            return action
        hops = self.chain.hops
        if not self._round:
            if self.index >= len(hops):
                return Done(self.hidden)
            first = hops[self.index]
            prompts = self.chain.prompts_for(first, self.position)
            pushed = self.chain.push_targets(self.index) if prompts is None else []
            self._round = [first, *pushed]
            self._expected = InferenceStep(
                session_id=first.session_id, step=first.step, position=self.position, hidden=self.hidden,
                hypo_ids=None, push=_push_field(pushed), prompts=prompts,
            )
            self._sent = False
            self._done = 0
            for state in self._round:
                state.last_sent = now
        assert self._expected is not None
        if not self._sent:
            return Send(self._round[0], self._expected)
        return Expect(self._round[self._done], self._expected)

    def sent(self) -> None:
        self._sent = True

    def received(self, reply: object, now: float) -> None:
        """The reply to the `Expect` just returned (not a stale one)."""
        assert self._expected is not None
        self.hidden = self.chain.accept(self._round[self._done], self._expected, reply, now)
        self._done += 1
        if self._done < len(self._round):  # a pushed hop: its input is the previous hop's verified output
            self._expected = self.chain.pushed_step(self._round[self._done], self._expected, self.hidden)
        else:
            self.index += self._done
            self._round = []

    def failed(self, exc: BaseException, fault: Fault) -> None:
        """The action just returned failed with `exc`. Decides what comes next (`next()`): the
        same step resent directly to a pushed hop, or that hop's recovery; raises `SessionFailed`
        after `max_retries` failures, or `exc` when the daemon refused our request."""
        chain = self.chain
        failed = self.index + self._done
        pushed = self._done > 0
        self.failures += 1
        state = chain.hops[failed]
        self.index = failed
        self._round = []
        if self.failures > chain.max_retries:
            raise SessionFailed((state.hop.start, state.hop.end),
                                f"blocks {state.hop.start}:{state.hop.end}: the step failed {self.failures} "
                                f"times in a row (last: {exc})") from exc
        if pushed and fault is Fault.REPLY:
            # Maybe the previous daemon pushed a wrong input: resend to this hop ourselves.
            log.info("pushed step to %s for blocks %d:%d failed (%s); sending it directly",
                     state.hop.server.name, state.hop.start, state.hop.end, exc)
            return
        if pushed and fault is Fault.TIMEOUT and chain.push:
            log.warning("no result from %s for blocks %d:%d on a pushed step; push is off for the rest "
                        "of this session", state.hop.server.name, state.hop.start, state.hop.end)
            chain.push = False
        self._recover = chain.recovery(failed, exc, fault, self.position)
