"""An inference session over a chain of daemons, with recovery when one of them fails.

Each hop of the route holds one long-lived inference stream to its daemon, which keeps the KV
cache of that hop's blocks. A step sends the hidden states through the hops in order; every
reply is checked against its signature (bound to session, step, position, span, model and the
digests of input and output) before it is used.

Recovery: every hop remembers the inputs it was sent, chunk by chunk. When a daemon fails
(stream closed, timeout, error reply, bad signature) the hop's daemon is banned for a while, a
replacement chain is chosen for exactly that hop's blocks, and the remembered chunks are replayed
to it in their original chunking: the replacement then holds a bit-identical cache (a matmul over
a different number of tokens may round differently, so we do not merge chunks), and the step
that failed is retried. The user sees a log line and a delay, never a different token.

Daemon-to-daemon forwarding (`push`, on by default): the client sends a step to the first hop
only, naming the next hops (peer, address, session id, blocks, step number) in the step's `push`
field; each daemon answers the client and also sends its output straight to the next one, so the
critical path is client -> d1 -> d2 -> d3 -> client (4 network legs for 3 hops, not 6). The
client still receives every hop's signed result, each on its own stream, and checks the chain: a
hop's result must be signed over an input equal to the previous hop's signed output (the binding
holds the input digest), so it keeps exactly the inputs it would have sent and replay works as
before. When a pushed hop fails, the steps of the hops before it stand and the client takes over
from that hop:
- its stream closed or no result within `step_timeout`: that hop failed, exactly as if the client
  had sent the step itself (recovery below). After such a timeout push is turned off for the rest
  of the session: a missing result may also mean the previous daemon could not reach this one (or
  withheld the push), and one ban per session is the most that may cost an innocent daemon.
- an error reply or a result that does not verify: the input may have come wrong from the
  previous daemon, so nobody is blamed yet; the client resends the step to that hop itself, and
  only a failure of that direct step counts against the hop.
Results left over from such a resend (a later hop answering a push that the client no longer
waits for) are recognised by their old step number and dropped.

Idle closes are not failures: daemons close connections idle for `idle_connection_timeout` and
sessions idle for `session_idle_timeout`, freeing the cache. A hop that breaks after being quiet
for `IDLE_RESUME_AFTER` seconds is first re-opened on the *same* daemon (no ban) and replayed;
only if that fails too is the daemon banned and replaced. A daemon that died while the hop was
idle costs one refused dial before the usual rerouting.

Spot checks (`checker`, client/spotcheck.py): after a step has run through every hop, each hop's
result may be re-computed elsewhere, before the step is returned. A hop found wrong is replaced
like a failed one (never resumed on the same daemon), the hops after it are rolled back to the
step's position (they computed on its wrong output), and the step runs again from the replacement.

Bounds: each replacement search makes at most `swarm.max_retries` attempts (backoff 0.2 s
doubling, capped at 5 s); one step survives at most `swarm.max_retries` failures; every network
wait is under `swarm.step_timeout`. So a session never hangs: it continues or raises
`SessionFailed` naming the blocks that could not be served.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import trio

from petals_protocol.errors import ErrorCode, PetalsError, ProtocolError, RemoteError
from petals_protocol.messages import (
    MAX_PUSH_HOPS,
    CloseSession,
    ErrorReply,
    InferenceStep,
    OpenSession,
    PushTarget,
    SessionOpened,
    StepResult,
)
from petals_protocol.p2p.relay import is_circuit
from petals_protocol.p2p.streams import NETWORK_ERRORS, Channel, StreamClosed
from petals_protocol.signing import inference_binding, peer_id_from_text, verify_response
from petals_protocol.tensors import TensorPayload, from_torch, to_torch

from .routing import Hop, NoRoute, choose_route, describe_route

if TYPE_CHECKING:
    from .spotcheck import SpotChecker

log = logging.getLogger("petals_client.session")

#: Replayed steps sent ahead of their results on one hop: enough to hide the round trip of a
#: long link, few enough that a slow daemon's unread input stays well inside its stream buffer.
MAX_REPLAY_STEPS_IN_FLIGHT = 16


class Swarm(Protocol):
    """What a session needs from the client's view of the swarm (client/swarm.py implements it)."""

    model_fingerprint: str
    step_timeout: float
    max_retries: int

    def servers(self) -> list: ...

    async def refresh(self) -> None: ...

    def ban(self, peer_id: str) -> None: ...

    def banned(self) -> frozenset[str]: ...

    def route_restrictions(self) -> str: ...

    async def open_inference(self, hop: Hop) -> Channel: ...


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


#: Daemon replies that blame our request: another daemon would refuse it too, so do not retry.
CALLER_FAULTS = frozenset({ErrorCode.TOO_LONG, ErrorCode.BAD_TENSOR, ErrorCode.BAD_REQUEST, ErrorCode.WRONG_MODEL})
#: A hop quiet for this long whose stream then turns out closed was most likely closed by the
#: daemon's idle timeouts (connection or session), not by a crash: during generation steps follow
#: each other within milliseconds, and idle timeouts are seconds at the least.
IDLE_RESUME_AFTER = 1.0


@dataclass
class _HopState:
    hop: Hop
    channel: Channel
    session_id: bytes
    peer: bytes  # the daemon's peer id (what its signatures verify against)
    # Inputs this hop has consumed, in the chunks they were sent: replayed to a replacement.
    chunks: list[torch.Tensor] = field(default_factory=list)
    position: int = 0
    step: int = 0
    # time.monotonic() of the last reply (or of the open), and of the last step sent: the gap is
    # how long the hop had been quiet when the step that failed went out.
    last_active: float = field(default_factory=time.monotonic)
    last_sent: float = field(default_factory=time.monotonic)


def _check_step_reply(reply: object, state: _HopState, sent: InferenceStep, fingerprint: str) -> TensorPayload:
    """The verified output of `state`'s hop for `sent` (the step it was sent, or for a pushed hop
    the step the previous daemon should have sent it: its signed output as input)."""
    if isinstance(reply, ErrorReply):
        raise reply.to_exception(state.hop.server.peer_id)
    if not isinstance(reply, StepResult) or reply.session_id != state.session_id or reply.step != sent.step:
        raise ProtocolError(ErrorCode.MALFORMED, f"unexpected reply to step {sent.step}: {type(reply).__name__}")
    binding = inference_binding(sent, start_block=state.hop.start, end_block=state.hop.end,
                                model_fingerprint=fingerprint, output=reply.hidden)
    verify_response(state.peer, binding, reply.signature)
    if reply.hidden.shape != sent.hidden.shape or reply.hidden.dtype != sent.hidden.dtype:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"reply shape {reply.hidden.shape} != sent {sent.hidden.shape}")
    return reply.hidden


def _looks_like_idle_close(exc: BaseException) -> bool:
    """A stream the daemon closed (idle connection) or a session it timed out (idle session)."""
    if isinstance(exc, StreamClosed):
        return True
    return isinstance(exc, RemoteError) and exc.code == ErrorCode.TIMEOUT


class InferenceSession:
    """Step-by-step inference through the swarm; `position` tokens are in every hop's cache."""

    def __init__(self, swarm: Swarm, start: int, end: int, *, max_length: int, batch_size: int = 1,
                 push: bool = True, checker: SpotChecker | None = None, active_adapter: str | None = None) -> None:
        self.swarm = swarm
        self.checker = checker  # spot checks of the hops' results (client/spotcheck.py); None: off
        self.active_adapter = active_adapter  # a LoRA adapter every hop computes with (None: none)
        # Deep prompts [end - start, 1 or batch, K, hidden] for positions [0, K), sent with the steps
        # that cover those positions (replays too); such steps are not pushed (a push carries none).
        self.prompts: torch.Tensor | None = None
        self.push = push  # daemon-to-daemon forwarding (see the module docstring)
        self.start, self.end = start, end
        self.max_length = max_length
        self.batch_size = batch_size
        self.position = 0
        self.hops: list[_HopState] = []
        self.recoveries = 0  # failed daemons replaced
        self.resumes = 0  # hops re-opened on the same daemon after an idle close

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    async def open(self) -> None:
        self.hops = await self._open_chain(self.start, self.end)
        log.info("session route: %s", describe_route(self.route))

    async def _open_chain(self, start: int, end: int) -> list[_HopState]:
        servers = [s for s in self.swarm.servers() if self.active_adapter in (None, *s.adapters)]
        try:
            route = choose_route(servers, start, end, banned=self.swarm.banned(), cache_tokens_needed=self.max_length)
        except NoRoute as exc:
            restrictions = self.swarm.route_restrictions()
            if restrictions:  # say why daemons the user may know of were not used
                raise NoRoute(exc.uncovered, restrictions) from exc
            raise
        # All hops at once: on a long link each open costs round trips, and they do not depend
        # on each other (a fresh session's time to first token pays the slowest, not the sum).
        opened: list[_HopState | None] = [None] * len(route)
        errors: list[Exception] = []

        async def open_one(index: int, hop: Hop) -> None:
            try:
                opened[index] = await self._open_hop(hop)
            except Exception as exc:  # noqa: BLE001 - the first is raised below, after closing the others
                errors.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                for index, hop in enumerate(route):
                    nursery.start_soon(open_one, index, hop)
        finally:
            if errors or any(state is None for state in opened):
                for state in opened:
                    if state is not None:
                        await self._close_hop(state)
        if errors:
            raise errors[0]
        return [state for state in opened if state is not None]

    async def _open_hop(self, hop: Hop) -> _HopState:
        session_id = os.urandom(16)
        with trio.fail_after(self.swarm.step_timeout):
            channel = await self.swarm.open_inference(hop)
            try:
                await channel.send(OpenSession(
                    session_id=session_id, model_fingerprint=self.swarm.model_fingerprint,
                    start_block=hop.start, end_block=hop.end, max_length=self.max_length,
                    batch_size=self.batch_size, active_adapter=self.active_adapter,
                ))
                reply = await channel.receive()
            except BaseException:
                await channel.aclose()
                raise
        if isinstance(reply, ErrorReply):
            await channel.aclose()
            raise reply.to_exception(hop.server.peer_id)
        if not isinstance(reply, SessionOpened) or reply.session_id != session_id:
            await channel.aclose()
            raise ProtocolError(ErrorCode.MALFORMED, f"unexpected reply to open: {type(reply).__name__}")
        return _HopState(hop=hop, channel=channel, session_id=session_id, peer=peer_id_from_text(hop.server.peer_id))

    async def _close_hop(self, state: _HopState) -> None:
        with trio.move_on_after(1.0):
            try:
                await state.channel.send(CloseSession(session_id=state.session_id))
            except NETWORK_ERRORS:
                pass  # the daemon is gone or the stream broke: it frees the session on its own timeout
            await state.channel.aclose()

    async def _send_steps(self, state: _HopState, chunks: list[torch.Tensor], position: int) -> list[torch.Tensor]:
        """Steps for consecutive `chunks` from `position` on one hop, pipelined: the next is sent
        before the result of the one before arrives (the daemon runs a session's steps in order),
        so a replay costs one round trip per hop rather than one per step, and each chunk is still
        computed as it was the first time (identical results)."""
        steps: list[InferenceStep] = []
        for i, hidden in enumerate(chunks):
            steps.append(InferenceStep(session_id=state.session_id, step=state.step + i, position=position,
                                       hidden=from_torch(hidden), hypo_ids=None,
                                       prompts=self._prompts_for(state, position)))
            position += hidden.shape[1]
        window = trio.Semaphore(MAX_REPLAY_STEPS_IN_FLIGHT)

        async def send_all() -> None:
            for sent in steps:
                await window.acquire()
                state.last_sent = time.monotonic()
                with trio.fail_after(self.swarm.step_timeout):
                    await state.channel.send(sent)

        outs: list[torch.Tensor] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            for sent in steps:
                outs.append(to_torch(await self._receive_result(state, sent)))
                window.release()
        state.step += len(steps)
        return outs

    async def _receive_result(self, state: _HopState, expected: InferenceStep) -> TensorPayload:
        """`state`'s verified result for `expected`, within step_timeout. Results of earlier steps
        (answers to pushes the client stopped waiting for) are dropped."""
        with trio.fail_after(self.swarm.step_timeout):
            while True:
                reply = await state.channel.receive()
                if isinstance(reply, StepResult) and reply.session_id == state.session_id \
                        and reply.step < expected.step:
                    log.debug("dropped a stale result of step %d from %s", reply.step, state.hop.server.name)
                    continue
                break
        out = _check_step_reply(reply, state, expected, self.swarm.model_fingerprint)
        state.last_active = time.monotonic()
        return out

    def _push_targets(self, index: int) -> list[_HopState]:
        """The hops after `index` that hop `index` may push to: consecutive ones with a dialable
        address, on another daemon than the one before (a daemon does not push to itself)."""
        if not self.push:
            return []
        targets: list[_HopState] = []
        for before, state in zip(self.hops[index:], self.hops[index + 1:index + 1 + MAX_PUSH_HOPS]):
            if not state.hop.server.addrs or state.hop.server.peer_id == before.hop.server.peer_id:
                break
            targets.append(state)
        return targets

    def _prompts_for(self, state: _HopState, position: int) -> TensorPayload | None:
        """The hop's blocks' deep prompts, for a step at `position` that reaches into the prefix."""
        if self.prompts is None or position >= self.prompts.shape[2]:
            return None
        return from_torch(self.prompts[state.hop.start - self.start:state.hop.end - self.start].contiguous())

    def _rollback(self, state: _HopState, position: int) -> None:
        """Trim the remembered chunks to `position` tokens (the daemon crops its cache likewise)."""
        if position == state.position:
            return  # the usual decode step: nothing to trim (and no walk over every chunk)
        kept: list[torch.Tensor] = []
        total = 0
        for chunk in state.chunks:
            if total >= position:
                break
            take = min(chunk.shape[1], position - total)
            kept.append(chunk[:, :take])
            total += take
        state.chunks = kept
        state.position = position

    def _commit(self, state: _HopState, hidden: torch.Tensor, position: int) -> None:
        """A hop consumed `hidden` at `position`: remember it for replay."""
        self._rollback(state, position)
        state.chunks.append(hidden)
        state.position = position + hidden.shape[1]
        state.step += 1

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Run `hidden` [B, T, H] through every hop, continuing after `position` tokens
        (default: after everything so far; smaller values roll back). Returns the last hop's output."""
        if position is None:
            position = self.position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside 0..{self.position}")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"session max_length {self.max_length} exceeded: {position} + {hidden.shape[1]} tokens"
            )
        hidden = await self._run(0, hidden, position)
        if self.checker is not None:
            hidden = await self._spot_check(hidden, position)
        self.position = position + hidden.shape[1]
        return hidden

    async def _spot_check(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Check the hops' results of the step just run (client/spotcheck.py); a hop found wrong is
        replaced, the hops from it on are rolled back to `position`, and the step is run again from it."""
        assert self.checker is not None
        index = 0
        while index < len(self.hops):
            state = self.hops[index]
            if not self.checker.choose():
                index += 1
                continue
            step_input = state.chunks[-1]
            output = self.hops[index + 1].chunks[-1] if index + 1 < len(self.hops) else hidden
            try:
                prompts = None if self.prompts is None else \
                    self.prompts[state.hop.start - self.start:state.hop.end - self.start]  # the whole prefix, as at position 0
                await self.checker.check(state.hop, torch.cat(state.chunks, dim=1), output, prompts=prompts,
                                         adapter=self.active_adapter)
            except WrongOutput as exc:
                for later in self.hops[index:]:
                    self._rollback(later, position)
                await self._recover(index, exc, position)
                hidden = await self._run(index, step_input, position)
                continue  # check the replacement's result too
            index += 1
        return hidden

    async def _run(self, index: int, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run `hidden` through the hops from `index` on, recovering failed ones; the last output."""
        failures = 0
        while index < len(self.hops):
            first = self.hops[index]
            prompts = self._prompts_for(first, position)
            pushed = self._push_targets(index) if prompts is None else []
            payload = from_torch(hidden)
            expected = InferenceStep(
                session_id=first.session_id, step=first.step, position=position, hidden=payload, hypo_ids=None,
                push=tuple(PushTarget(peer_id=s.peer, addr=s.hop.server.addrs[0], session_id=s.session_id,
                                      start_block=s.hop.start, end_block=s.hop.end, step=s.step)
                           for s in pushed) or None,
                prompts=prompts,
            )
            now = time.monotonic()
            for state in (first, *pushed):
                state.last_sent = now
            done = 0  # hops of this round whose results are verified and committed
            try:
                with trio.fail_after(self.swarm.step_timeout):
                    await first.channel.send(expected)
                for state in (first, *pushed):
                    if done:  # a pushed hop: its input is the previous hop's verified output
                        expected = InferenceStep(session_id=state.session_id, step=state.step, position=position,
                                                 hidden=payload, hypo_ids=None)
                    payload = await self._receive_result(state, expected)
                    self._commit(state, hidden, position)
                    hidden = to_torch(payload)
                    done += 1
            except NETWORK_ERRORS as exc:
                failed = index + done
                failures += 1
                state = self.hops[failed]
                if failures > self.swarm.max_retries:
                    raise SessionFailed((state.hop.start, state.hop.end),
                                        f"blocks {state.hop.start}:{state.hop.end}: the step failed {failures} "
                                        f"times in a row (last: {exc})") from exc
                index = failed
                if done and isinstance(exc, (RemoteError, ProtocolError)) and not isinstance(exc, StreamClosed):
                    # Maybe the previous daemon pushed a wrong input: resend to this hop ourselves.
                    log.info("pushed step to %s for blocks %d:%d failed (%s); sending it directly",
                             state.hop.server.name, state.hop.start, state.hop.end, exc)
                    continue
                if done and isinstance(exc, trio.TooSlowError) and self.push:
                    log.warning("no result from %s for blocks %d:%d on a pushed step; push is off for the rest "
                                "of this session", state.hop.server.name, state.hop.start, state.hop.end)
                    self.push = False
                await self._recover(failed, exc, position)
                continue  # retry the same hop index: now a replacement (possibly several hops)
            index += done
        return hidden

    async def _recover(self, index: int, exc: BaseException, position: int) -> None:
        """Replace hop `index` after `exc`: resume on the same daemon after an idle close, else
        ban it and find a chain for exactly its blocks; the replacement gets the hop's inputs replayed."""
        failed = self.hops[index]
        self._rollback(failed, position)  # replay only what the step builds on
        if isinstance(exc, RemoteError) and exc.code in CALLER_FAULTS:
            raise exc
        idle_for = failed.last_sent - failed.last_active
        await self._close_hop(failed)
        # A daemon reached through a relay may be fine while its relay is gone: try it through its
        # other addresses (relays) before giving up on it, as after an idle close.
        relayed = bool(failed.hop.server.addrs) and all(is_circuit(a) for a in failed.hop.server.addrs)
        if not isinstance(exc, WrongOutput) and ((_looks_like_idle_close(exc) and idle_for >= IDLE_RESUME_AFTER)
                                                 or relayed):
            log.info("daemon %s closed blocks %d:%d (%s, %.1f s idle%s); re-opening and replaying %d tokens",
                     failed.hop.server.name, failed.hop.start, failed.hop.end, exc, idle_for,
                     ", relayed" if relayed else "", failed.position)
            try:
                resumed = [await self._open_hop(failed.hop)]
                await self._replay(resumed, failed.chunks)
            except NETWORK_ERRORS as resume_exc:
                exc = resume_exc  # gone for real: fall through to ban and reroute
            else:
                self.hops[index:index + 1] = resumed
                self.resumes += 1
                return
        log.warning("daemon %s failed on blocks %d:%d (%s: %s); rerouting", failed.hop.server.name,
                    failed.hop.start, failed.hop.end, type(exc).__name__, exc)
        self.swarm.ban(failed.hop.server.peer_id)
        self.recoveries += 1
        self.hops[index:index + 1] = await self._replacement(failed)

    async def _replacement(self, failed: _HopState) -> list[_HopState]:
        """A chain for the failed hop's blocks with its inputs replayed, within max_retries attempts."""
        start, end = failed.hop.start, failed.hop.end
        began = time.monotonic()
        last_error: BaseException | None = None
        for attempt in range(self.swarm.max_retries):
            try:
                replacement = await self._open_chain(start, end)
                await self._replay(replacement, failed.chunks)
            except NETWORK_ERRORS as retry_exc:
                last_error = retry_exc
                bad = getattr(retry_exc, "peer", None)
                if isinstance(bad, str) and bad:
                    self.swarm.ban(bad)
                if isinstance(retry_exc, NoRoute):
                    await self.swarm.refresh()  # maybe a daemon came (back) up meanwhile
                if attempt + 1 < self.swarm.max_retries:
                    await trio.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            log.info("recovered blocks %d:%d via %s in %.3f s (replayed %d tokens)", start, end,
                     describe_route([h.hop for h in replacement]), time.monotonic() - began, failed.position)
            return replacement
        raise SessionFailed(
            (start, end),
            f"blocks {start}:{end} could not be served after {self.swarm.max_retries} attempts: {last_error}",
        ) from last_error

    async def _replay(self, chain: list[_HopState], chunks: list[torch.Tensor]) -> None:
        """Re-run `chunks` (the failed hop's inputs, step by step) along `chain`, hop after hop,
        each hop's steps pipelined (see _send_steps)."""
        for state in chain:
            try:
                outs = await self._send_steps(state, chunks, 0)
            except BaseException:
                for s in chain:
                    await self._close_hop(s)
                raise
            state.chunks.extend(chunks)
            state.position = sum(chunk.shape[1] for chunk in chunks)
            chunks = outs

    async def close(self) -> None:
        for state in self.hops:
            await self._close_hop(state)
        self.hops = []
