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

Pipelined prefill (`prefill_chunk`, off by default): a step of more tokens than that is cut into
chunks sent to the first hop one after another without waiting for results, each pushed along the
whole chain, so daemon k computes chunk i while daemon k-1 computes chunk i+1. Every hop's results
are still verified chunk by chunk in chain order, and its replay memory holds the chunks as they
were computed. Where the chain cannot push end to end (push off, deep prompts in range, spot
checks on), or when any part of the pipelined prefill fails, the prompt runs as one ordinary step
(after a failure, from a rollback), with the recovery below; a hung daemon then costs two timeouts.

Opening: a hop's OpenSession is sent without waiting for its answer, all hops at once, and the
first step follows on the first hop's stream right behind it; each hop's `SessionOpened` is read in
front of its first result. A fresh session's first token so costs no round trip of its own (a
daemon holds a pushed step that overtakes its session's open, petalsd/handlers.py). A refusal
(busy, too long, wrong model) ends that first step with the daemon's error, as an open that was
waited for did, and the session with it: it is the caller's to see, not a hop failure to recover
from. Hops opened during recovery wait for their answer, so a refusal there moves on to the next
candidate.

Idle closes are not failures: daemons close connections idle for `idle_connection_timeout` and
sessions idle for `session_idle_timeout`, freeing the cache. A hop that breaks after being quiet
for `IDLE_RESUME_AFTER` seconds is first re-opened on the *same* daemon (no ban) and replayed;
only if that fails too is the daemon banned and replaced. A daemon that died while the hop was
idle costs one refused dial before the usual rerouting.

Spot checks (`checker`, client/spotcheck.py): after a step has run through every hop, each hop's
result may be re-computed elsewhere, before the step is returned. A hop found wrong is replaced
like a failed one (never resumed on the same daemon), the hops after it are rolled back to the
step's position (they computed on its wrong output), and the step runs again from the replacement.

Layers: the chain's state and every decision above (what to send where, what a reply must be,
what to do when a hop fails) live in client/chain.py, a sans-IO state machine that imports no trio
and does no I/O; this module is the trio layer that performs its actions (streams, timeouts,
backoff sleeps) and feeds the results back.

Bounds: each replacement search makes at most `swarm.max_retries` attempts (backoff 0.2 s
doubling, capped at 5 s); one step survives at most `swarm.max_retries` failures; every network
wait is under `swarm.step_timeout`, plus, for a step, the time its activations need over a slow
link (`transfer_allowance`: a long prompt's megabytes take seconds there, a token's kilobytes
milliseconds). So a session never hangs: it continues or raises `SessionFailed` naming the blocks
that could not be served.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
import trio

from petals_protocol.errors import ErrorCode, ProtocolError, RemoteError
from petals_protocol.messages import CloseSession, InferenceStep, OpenSession, SessionOpened
from petals_protocol.p2p.relay import is_circuit
from petals_protocol.p2p.streams import NETWORK_ERRORS, Channel, StreamClosed, transfer_allowance
from petals_protocol.signing import peer_id_from_text
from petals_protocol.tensors import TensorPayload, from_torch, to_torch

from .chain import (CALLER_FAULTS, IDLE_RESUME_AFTER, Chain, Done, Expect, Fault, HopState, Prefill, Recover,
                    ReplayFailed, Send, SessionFailed, WrongOutput)
from .replies import check_reply
from .routing import Hop, NoRoute, choose_route, describe_route

if TYPE_CHECKING:
    from .spotcheck import SpotChecker

__all__ = ["CALLER_FAULTS", "IDLE_RESUME_AFTER", "InferenceSession", "SessionFailed", "Swarm", "WrongOutput"]

log = logging.getLogger("petals_client.session")

#: Steps sent ahead of their results on one hop (a replay, a pipelined prefill): enough to hide
#: the round trip of a long link, few enough that a slow daemon's unread input stays well inside
#: its stream buffer.
MAX_REPLAY_STEPS_IN_FLIGHT = 16


class OpenRefused(Exception):
    """A daemon refused the session's first open (read in front of the first step's result). Not a
    hop failure to recover from: the session fails with `error`, as if the open had been waited for."""

    def __init__(self, error: RemoteError) -> None:
        super().__init__(str(error))
        self.error = error


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


def fault_of(exc: BaseException) -> Fault:
    """How a hop failed, for the chain's decisions."""
    if isinstance(exc, StreamClosed):
        return Fault.CLOSED
    if isinstance(exc, trio.TooSlowError):
        return Fault.TIMEOUT
    if isinstance(exc, (RemoteError, ProtocolError)):
        return Fault.REPLY
    return Fault.NETWORK


@asynccontextmanager
async def _nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose single failure propagates as itself, not wrapped in an ExceptionGroup, so
    that `except NETWORK_ERRORS` around it works as it reads."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _chain_field(name: str, doc: str) -> Any:
    """A session attribute that is the chain's (client/chain.py) field `name`."""
    return property(lambda self: getattr(self.chain, name), lambda self, value: setattr(self.chain, name, value),
                    doc=doc)


class InferenceSession:
    """Step-by-step inference through the swarm; `position` tokens are in every hop's cache."""

    def __init__(self, swarm: Swarm, start: int, end: int, *, max_length: int, batch_size: int = 1,
                 push: bool = True, checker: SpotChecker | None = None, active_adapter: str | None = None,
                 prefill_chunk: int | None = None) -> None:
        self.swarm = swarm
        # A step of more tokens than this is pipelined in chunks of this many (module docstring;
        # None: one step, the exact path).
        self.prefill_chunk = prefill_chunk
        self.checker = checker  # spot checks of the hops' results (client/spotcheck.py); None: off
        self.active_adapter = active_adapter  # a LoRA adapter every hop computes with (None: none)
        self.chain = Chain(start, end, swarm.model_fingerprint, swarm.max_retries, push=push)
        self.start, self.end = start, end
        self.max_length = max_length
        self.batch_size = batch_size
        self.position = 0
        self._channels: dict[bytes, Channel] = {}  # each hop's stream, by its session id
        self._opening: set[bytes] = set()  # sessions whose answer to OpenSession is still unread
        self._refused: RemoteError | None = None  # a daemon refused the first open: the session is unusable

    # The chain's state, under the names this class always had.
    hops = _chain_field("hops", "The hops, in order (`HopState`: daemon, session, replay memory).")
    push = _chain_field("push", "Daemon-to-daemon forwarding (module docstring); off after a pushed step timed out.")
    prompts = _chain_field("prompts", "Deep prompts [end - start, 1 or batch, K, hidden] for positions [0, K), or None.")
    recoveries = _chain_field("recoveries", "Failed daemons replaced.")
    resumes = _chain_field("resumes", "Hops re-opened on the same daemon after an idle close.")

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def channel(self, index: int) -> Channel:
        """The open channel to hop `index` (benchmarks read its stream's flow-control counters)."""
        return self._channels[self.hops[index].session_id]

    async def open(self) -> None:
        """Choose the route and send every hop its OpenSession, without waiting for the answers
        (module docstring, "Opening")."""
        self.chain.hops = await self._open_chain(self.start, self.end, wait=False)
        log.info("session route: %s", describe_route(self.route))

    async def _open_chain(self, start: int, end: int, *, wait: bool = True) -> list[HopState]:
        servers = [s for s in self.swarm.servers() if self.active_adapter in (None, *s.adapters)]
        try:
            route = choose_route(servers, start, end, banned=self.swarm.banned(), cache_tokens_needed=self.max_length,
                                 push=self.push)
        except NoRoute as exc:
            restrictions = self.swarm.route_restrictions()
            if restrictions:  # say why daemons the user may know of were not used
                raise NoRoute(exc.uncovered, restrictions) from exc
            raise
        # All hops at once: on a long link each open costs round trips, and they do not depend
        # on each other (a fresh session's time to first token pays the slowest, not the sum).
        opened: list[HopState | None] = [None] * len(route)
        errors: list[Exception] = []

        async def open_one(index: int, hop: Hop) -> None:
            try:
                opened[index] = await self._open_hop(hop, wait=wait)
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

    async def _open_hop(self, hop: Hop, *, wait: bool = True) -> HopState:
        """Open the hop's session. `wait=False` (a session's first open): send OpenSession only; the
        first step follows on the same stream at once and the answer is read in front of its
        result (`_receive`)."""
        session_id = os.urandom(16)
        with trio.fail_after(self.swarm.step_timeout):
            channel = await self.swarm.open_inference(hop)
            try:
                await channel.send(OpenSession(
                    session_id=session_id, model_fingerprint=self.swarm.model_fingerprint,
                    start_block=hop.start, end_block=hop.end, max_length=self.max_length,
                    batch_size=self.batch_size, active_adapter=self.active_adapter,
                ))
                if wait:
                    self._check_opened(hop, session_id, await channel.receive())
            except BaseException:
                await channel.aclose()
                raise
        self._channels[session_id] = channel
        if not wait:
            self._opening.add(session_id)
        now = time.monotonic()
        return HopState(hop=hop, session_id=session_id, peer=peer_id_from_text(hop.server.peer_id),
                        relayed=bool(hop.server.addrs) and all(is_circuit(a) for a in hop.server.addrs),
                        last_active=now, last_sent=now)

    async def _close_hop(self, state: HopState) -> None:
        self._opening.discard(state.session_id)
        channel = self._channels.pop(state.session_id, None)
        if channel is None:
            return
        with trio.move_on_after(1.0):
            try:
                await channel.send(CloseSession(session_id=state.session_id))
            except NETWORK_ERRORS:
                pass  # the daemon is gone or the stream broke: it frees the session on its own timeout
            await channel.aclose()

    async def _send_steps(self, state: HopState, chunks: list[TensorPayload]) -> list[TensorPayload]:
        """Steps for consecutive `chunks` on one hop, pipelined: the next is sent before the result
        of the one before arrives (the daemon runs a session's steps in order), so a replay costs
        one round trip per hop rather than one per step, and each chunk is still computed as it
        was the first time (identical results). Each verified step is committed to the hop."""
        steps = self.chain.replay_steps(state, chunks)
        channel = self._channels[state.session_id]
        window = trio.Semaphore(MAX_REPLAY_STEPS_IN_FLIGHT)

        async def send_all() -> None:
            for sent in steps:
                await window.acquire()
                state.last_sent = time.monotonic()
                with trio.fail_after(self._deadline(sent)):
                    await channel.send(sent)

        outs: list[TensorPayload] = []
        async with _nursery() as nursery:
            nursery.start_soon(send_all)
            for sent in steps:
                outs.append(self.chain.accept(state, sent, await self._receive(Expect(state, sent)),
                                                time.monotonic()))
                window.release()
        return outs

    def _deadline(self, step: InferenceStep, legs: int = 1) -> float:
        """`step_timeout` for a wait on `step`, plus the time its activations need over `legs` slow
        links: a decode step adds milliseconds, a long prompt's step seconds (transfer_allowance)."""
        return self.swarm.step_timeout + transfer_allowance(step.hidden.nbytes, legs)

    @staticmethod
    def _check_opened(hop: Hop, session_id: bytes, reply: object) -> None:
        opened = check_reply(reply, SessionOpened, hop.server.peer_id)
        if opened.session_id != session_id:
            raise ProtocolError(ErrorCode.MALFORMED, "unexpected reply to open: another session id")

    async def _receive(self, expect: Expect) -> object:
        """The reply `expect` waits for, within step_timeout (stale results dropped), after the
        hop's answer to its OpenSession if that is still unread (`OpenRefused` if it refused)."""
        session_id = expect.hop.session_id
        channel = self._channels[session_id]
        # Legs the result may wait on: the rest of our write (the kernel takes a step before it has
        # crossed), the push on (a pushing hop answers once its push has landed), the output back.
        with trio.fail_after(self._deadline(expect.step, legs=3)):
            if session_id in self._opening:
                self._opening.discard(session_id)
                reply = await channel.receive()
                try:
                    self._check_opened(expect.hop.hop, session_id, reply)
                except RemoteError as exc:
                    raise OpenRefused(exc) from exc
            while True:
                reply = await channel.receive()
                if not expect.is_stale(reply):
                    return reply
                log.debug("dropped a stale result of step %d from %s", reply.step,  # type: ignore[attr-defined]
                          expect.hop.hop.server.name)

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Run `hidden` [B, T, H] through every hop, continuing after `position` tokens
        (default: after everything so far; smaller values roll back). Returns the last hop's output."""
        if self._refused is not None:
            raise self._refused
        try:
            return await self._step(hidden, position)
        except OpenRefused as refused:
            self._refused = refused.error
            raise refused.error from None

    async def _step(self, hidden: torch.Tensor, position: int | None) -> torch.Tensor:
        if position is None:
            position = self.position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside 0..{self.position}")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"session max_length {self.max_length} exceeded: {position} + {hidden.shape[1]} tokens"
            )
        if self.prefill_chunk and self.checker is None and hidden.shape[1] > self.prefill_chunk:
            outputs = await self._prefill(hidden, position, self.prefill_chunk)
            if outputs is not None:
                self.position = position + hidden.shape[1]
                return torch.cat([to_torch(out) for out in outputs], dim=1)
        output = await self._run(0, from_torch(hidden), position)
        if self.checker is not None:
            output = await self._spot_check(output, position)
        self.position = position + output.shape[1]
        return to_torch(output)

    async def _prefill(self, hidden: torch.Tensor, position: int, size: int) -> list[TensorPayload] | None:
        """The last hop's outputs for `hidden` pipelined in chunks of `size` tokens (`Chain.prefill`),
        or None where the chain cannot take it so, or it failed (then rolled back: the caller runs
        the prompt as one step, with the usual recovery)."""
        chunks = [from_torch(hidden[:, i:i + size].contiguous()) for i in range(0, hidden.shape[1], size)]
        plan = self.chain.prefill(chunks, position, time.monotonic())
        if plan is None:
            return None
        try:
            return await self._pipelined(plan)
        except NETWORK_ERRORS as exc:
            log.info("pipelined prefill failed (%s: %s); running the prompt as one step", type(exc).__name__, exc)
            self.chain.abandon(plan)
            return None

    async def _pipelined(self, plan: Prefill) -> list[TensorPayload]:
        """Send the plan's steps to the first hop (at most MAX_REPLAY_STEPS_IN_FLIGHT ahead of its
        results), drain every hop's stream as its results come, and accept them in chain order."""
        hops = list(self.hops)
        inboxes = [trio.open_memory_channel[object](math.inf) for _ in hops]
        window = trio.Semaphore(MAX_REPLAY_STEPS_IN_FLIGHT)
        first = self._channels[hops[0].session_id]

        async def send_all() -> None:
            try:
                for sent in plan.steps:
                    await window.acquire()
                    with trio.fail_after(self._deadline(sent)):
                        await first.send(sent)
            except NETWORK_ERRORS as exc:
                inboxes[0][0].send_nowait(exc)

        async def collect(index: int, state: HopState) -> None:
            oldest = Expect(state, replace(plan.steps[0], session_id=state.session_id, step=plan.bases[index]))
            try:
                for _ in plan.steps:
                    inboxes[index][0].send_nowait(await self._receive(oldest))
                    if index == 0:
                        window.release()
            except (*NETWORK_ERRORS, OpenRefused) as exc:  # raised below, in chain order
                inboxes[index][0].send_nowait(exc)

        inputs = [sent.hidden for sent in plan.steps]
        async with _nursery() as nursery:
            nursery.start_soon(send_all)
            for index, state in enumerate(hops):
                nursery.start_soon(collect, index, state)
            for index, state in enumerate(hops):
                outputs: list[TensorPayload] = []
                for sent, hidden in zip(plan.steps, inputs):
                    reply = await inboxes[index][1].receive()
                    if isinstance(reply, BaseException):
                        raise reply
                    expected = sent if index == 0 else self.chain.pushed_step(state, sent, hidden)
                    outputs.append(self.chain.accept(state, expected, reply, time.monotonic()))
                inputs = outputs
        return inputs

    async def _spot_check(self, output: TensorPayload, position: int) -> TensorPayload:
        """Check the hops' results of the step just run (client/spotcheck.py); a hop found wrong is
        replaced, the hops from it on are rolled back to `position`, and the step is run again from it."""
        assert self.checker is not None
        index = 0
        while index < len(self.hops):
            state = self.hops[index]
            if not self.checker.choose():
                index += 1
                continue
            result = self.hops[index + 1].chunks[-1] if index + 1 < len(self.hops) else output
            history = torch.cat([to_torch(chunk) for chunk in state.chunks], dim=1)
            try:
                prompts = None if self.prompts is None else \
                    self.prompts[state.hop.start - self.start:state.hop.end - self.start]  # the whole prefix, as at position 0
                await self.checker.check(state.hop, history, to_torch(result), prompts=prompts, adapter=self.active_adapter)
            except WrongOutput as exc:
                step_input = self.chain.wrong_output(index, position)
                await self._recover(self.chain.recovery(index, exc, Fault.REPLY, position))
                output = await self._run(index, step_input, position)
                continue  # check the replacement's result too
            index += 1
        return output

    async def _run(self, index: int, hidden: TensorPayload, position: int) -> TensorPayload:
        """Run `hidden` through the hops from `index` on, performing the chain's actions."""
        run = self.chain.run(index, hidden, position)
        while True:
            action = run.next(time.monotonic())
            if isinstance(action, Done):
                return action.output
            if isinstance(action, Recover):
                await self._recover(action)
                continue
            try:
                if isinstance(action, Send):
                    with trio.fail_after(self._deadline(action.step)):
                        await self._channels[action.hop.session_id].send(action.step)
                    run.sent()
                else:
                    run.received(await self._receive(action), time.monotonic())
            except NETWORK_ERRORS as exc:
                run.failed(exc, fault_of(exc))

    async def _recover(self, action: Recover) -> None:
        """Replace a failed hop as the chain decided: resume on the same daemon, else ban it and
        find a chain for exactly its blocks; the replacement gets the hop's inputs replayed."""
        failed, exc = action.failed, action.exc
        await self._close_hop(failed)
        if action.resume:
            log.info("daemon %s closed blocks %d:%d (%s, %.1f s idle%s); re-opening and replaying %d tokens",
                     failed.hop.server.name, failed.hop.start, failed.hop.end, exc, action.idle_for,
                     ", relayed" if failed.relayed else "", failed.position)
            try:
                resumed = [await self._open_hop(failed.hop)]
                await self._replay(resumed, failed.chunks)
            except NETWORK_ERRORS as resume_exc:
                exc = resume_exc  # gone for real: fall through to ban and reroute
            else:
                self.chain.replaced(action.index, resumed, resumed=True)
                return
        log.warning("daemon %s failed on blocks %d:%d (%s: %s); rerouting", failed.hop.server.name,
                    failed.hop.start, failed.hop.end, type(exc).__name__, exc)
        self.swarm.ban(failed.hop.server.peer_id)
        self.chain.replaced(action.index, await self._replacement(failed), resumed=False)

    async def _replacement(self, failed: HopState) -> list[HopState]:
        """A chain for the failed hop's blocks with its inputs replayed, within max_retries attempts."""
        began = time.monotonic()
        last_error: BaseException | None = None
        for attempt in range(self.swarm.max_retries):
            try:
                replacement = await self._open_chain(failed.hop.start, failed.hop.end)
                await self._replay(replacement, failed.chunks)
            except NETWORK_ERRORS as retry_exc:
                last_error = retry_exc
                retry = self.chain.replacement_failed(attempt, retry_exc)
                if retry.ban is not None:
                    self.swarm.ban(retry.ban)
                if retry.refresh:
                    await self.swarm.refresh()  # maybe a daemon came (back) up meanwhile
                if retry.delay is not None:
                    await trio.sleep(retry.delay)
                continue
            log.info("recovered blocks %d:%d via %s in %.3f s (replayed %d tokens)", failed.hop.start, failed.hop.end,
                     describe_route([h.hop for h in replacement]), time.monotonic() - began, failed.position)
            return replacement
        raise self.chain.no_replacement(failed, last_error) from last_error

    async def _replay(self, chain: list[HopState], chunks: list[TensorPayload]) -> None:
        """Re-run `chunks` (the failed hop's inputs, step by step) along `chain`, hop after hop,
        each hop's steps pipelined (see _send_steps). A failure names the daemon it happened on
        (`ReplayFailed`: a replacement that hangs is banned like any hung daemon)."""
        for state in chain:
            try:
                chunks = await self._send_steps(state, chunks)
            except BaseException as exc:
                for s in chain:
                    await self._close_hop(s)
                if isinstance(exc, NETWORK_ERRORS):
                    raise ReplayFailed(state.hop.server.peer_id, exc) from exc
                raise

    async def close(self) -> None:
        for state in self.hops:
            await self._close_hop(state)
        self.chain.hops = []
