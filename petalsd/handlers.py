"""One handler per protocol: what the daemon does with the messages of one stream.

Every handler speaks to a `Channel` (typed messages over one libp2p stream, drained continuously
by petals_protocol.p2p.streams) and never lets one client's mistake escape its own stream: bad
input gets an `ErrorReply` with a typed code and the stream goes on (or is closed cleanly when
nothing sensible can follow); the daemon keeps serving everyone else.

Inference: a client's stream is one session. The first message opens it (KV-cache room reserved
up front, or "busy"), then each `InferenceStep` runs the span on the session's cache in the compute
thread (where its input becomes a tensor and its output wire bytes, once) and comes back signed.
The session ends with `CloseSession`, a closed stream, or after `session_idle_timeout` seconds
without a step; every exit path returns its cache budget.

Daemon-to-daemon forwarding (petalsd/forwarding.py): a step with `push` is also sent on to the
next daemon. An inference stream whose first message is an `InferenceStep` (not `OpenSession`) is
such a *push stream* from a previous daemon: each step on it must name a session open here (or
about to be: a push may overtake the client's OpenSession, and waits up to `PUSH_OPEN_WAIT` for
it), runs exactly like a step from the client, and its result (or error) is sent on the *client's* stream
of that session, the session's owner. A push stream can only run steps: it cannot open or close
sessions, and nothing it causes is answered to it except "unknown session", a bad message, and
`PushLanded` once a large pushed step (a prefill) has arrived: the pushing daemon answers its own
client only then, so that its answer does not share its uplink with the push.

Why accepting steps from another peer is safe: the session id is 16 random bytes the client chose
and sent only over Noise-encrypted streams, to this daemon and to the daemons before it in the
chain of that step; it is a capability, as unguessable as a key. Those earlier daemons could
already give the client wrong activations for their own blocks, so letting them feed ours adds no
power over the result. What it could change is *blame*, and the client guards that: it verifies
every hop's signature over its input digest and checks that each hop's input is exactly the
previous hop's signed output (a daemon that pushes something else than it reported breaks the
chain and is caught), and it treats any result it did not ask for as an error.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import trio

from petals_protocol.errors import BadTensor, ErrorCode, MalformedMessage, PetalsError
from petals_protocol.messages import (
    BackwardRequest,
    BackwardResponse,
    CloseSession,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    OpenSession,
    PushLanded,
    SessionOpened,
    StepResult,
    confirms_landing,
    error_reply,
)
from petals_protocol.signing import (
    backward_binding,
    forward_binding,
    inference_binding,
    peer_id_from_text,
    sign_response,
)
from petals_protocol.tensors import ACTIVATION_DTYPES, TensorPayload, as_activation_dtype, from_torch, to_torch

from petals_protocol.p2p.budget import ByteBudget
from petals_protocol.p2p.locking import held
from petals_protocol.p2p.streams import Channel, StreamClosed

from .adapters import steps_with
from .batching import Batcher
from .compute import ComputeWorker
from .forwarding import PUSH_LANDED_WAIT, Forwarder, LinkActivity, PushRefused
from .limits import PeerGate
from .sessions import Session, SessionRefused, SessionTable
from .step_times import StepTimes

log = logging.getLogger("petalsd.handlers")

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Limits:
    """The limits a handler enforces; reloadable, so handlers read them at each use."""

    max_length: int
    max_batch_size: int
    session_idle_timeout: float
    step_timeout: float


@dataclass
class ServingContext:
    """Everything a handler needs, passed explicitly (no module state)."""

    span: Any  # petals_protocol.models.span.Span
    fingerprint: str
    model_name: str
    peer_id: str
    signer: Any  # cryptography Ed25519PrivateKey
    sessions: SessionTable
    worker: ComputeWorker
    limits: Limits
    gate: PeerGate  # per-peer streams, compute jobs and request rate (petalsd/limits.py)
    buffers: ByteBudget  # bytes of unread frames, per peer and in all (charged by every stream's pump)
    # Where every decode step runs: alone, or merged with other sessions' when batching is on.
    batcher: Batcher
    public_name: str = ""
    version: str = ""
    state: str = "online"
    throughput: float = 1.0
    stats: dict[str, int] = field(default_factory=lambda: {"steps": 0, "forward": 0, "backward": 0, "errors": 0})
    # Daemon-to-daemon forwarding: None means steps with `push` are computed and answered but not
    # forwarded (the client then drives the next hops itself after its step timeout).
    forwarder: Forwarder | None = None
    # Open sessions by id, with the client stream that owns each (where pushed steps are answered).
    owners: dict[bytes, _Owned] = field(default_factory=dict)
    # Steps received on push streams, by the pushing peer (connection activity for the sweeper).
    push_streams: dict[str, LinkActivity] = field(default_factory=dict)
    # Pushed steps waiting for their session to open here, by session id (`_owner_once_open`).
    awaited_opens: dict[bytes, trio.Event] = field(default_factory=dict)
    # LoRA adapters requests may select (`active_adapter`; petalsd/adapters.py)
    adapters: tuple[str, ...] = ()
    # This daemon's membership certificate blob, shown in info replies (--member-certificate)
    certificate: bytes | None = None
    # Where inference steps spend their time here (petalsd/step_times.py; control API metrics)
    step_times: StepTimes = field(default_factory=StepTimes)

    def link_activity(self) -> list[LinkActivity]:
        """Push traffic in both directions, shaped like sessions (peer, steps), so that the idle
        connection sweeper does not close a connection that only carries pushes."""
        outbound = self.forwarder.activity() if self.forwarder is not None else []
        return [*outbound, *self.push_streams.values()]

    @property
    def dtype_name(self) -> str:
        return str(self.span.dtype).removeprefix("torch.")

    def cache_tokens_free(self) -> int:
        per_token = self.span.cache_bytes_per_token(1)
        return self.sessions.budget.free // max(per_token, 1)

    def info(self) -> InfoResponse:
        return InfoResponse(
            peer_id=peer_id_from_text(self.peer_id), version=self.version, model_name=self.model_name,
            model_fingerprint=self.fingerprint, num_blocks=self.span.num_blocks_total,
            start_block=self.span.start, end_block=self.span.end, dtype=self.dtype_name,
            state=self.state, max_length=self.limits.max_length,
            max_batch_size=self.limits.max_batch_size, max_sessions=self.sessions.max_sessions,
            active_sessions=len(self.sessions), cache_tokens_free=self.cache_tokens_free(),
            throughput=self.throughput, public_name=self.public_name,
            max_sessions_per_peer=self.sessions.max_per_peer or None, adapters=self.adapters or None,
            certificate=self.certificate,
        )


@dataclass
class _Owned:
    """A session and the client stream it was opened on. `lock` serialises its steps, which may
    arrive on that stream and on push streams at once."""

    session: Session
    channel: Channel
    lock: trio.Lock = field(default_factory=trio.Lock)
    push_targets: set[bytes] = field(default_factory=set)  # next daemons its steps were pushed to


def _refuse(code: ErrorCode, message: str) -> SessionRefused:
    return SessionRefused(code, message)


#: How long a pushed step waits for its session to open here. A client sends OpenSession to every
#: hop at once and its first step right behind the first hop's, so a push can overtake the open
#: of a later hop (the open waits for the compute thread, or its path is slower); this bounds
#: what a push naming a session that never opens holds its push stream for.
PUSH_OPEN_WAIT = 2.0


def _opens_settled(ctx: ServingContext, session_id: bytes) -> None:
    """A session's open ended here (opened, refused or failed): wake the pushed step waiting for it."""
    event = ctx.awaited_opens.pop(session_id, None)
    if event is not None:
        event.set()


async def _owner_once_open(ctx: ServingContext, session_id: bytes) -> _Owned | None:
    """The session's owner, after waiting up to PUSH_OPEN_WAIT for it to open if it is not open
    yet; None if it is not open by then. The caller's stream waits too, which keeps a session's
    pushed steps in order (they come on one push stream)."""
    owned = ctx.owners.get(session_id)
    if owned is not None:
        return owned
    event = ctx.awaited_opens.setdefault(session_id, trio.Event())
    with trio.move_on_after(PUSH_OPEN_WAIT):
        await event.wait()
    if ctx.awaited_opens.get(session_id) is event:
        del ctx.awaited_opens[session_id]
    return ctx.owners.get(session_id)


def _check_span(ctx: ServingContext, fingerprint: str, start: int, end: int) -> None:
    if fingerprint != ctx.fingerprint:
        raise _refuse(ErrorCode.WRONG_MODEL, f"this daemon serves model {ctx.fingerprint[:16]}, not {fingerprint[:16]}")
    if not (ctx.span.start <= start < end <= ctx.span.end):
        raise _refuse(ErrorCode.BAD_REQUEST,
                      f"blocks {start}:{end} are not inside the served span {ctx.span.start}:{ctx.span.end}")


def _check_adapter(ctx: ServingContext, name: str | None) -> None:
    if name is not None and name not in ctx.adapters:
        raise _refuse(ErrorCode.BAD_REQUEST, f"this daemon serves no adapter {name!r} (it serves: "
                                             f"{', '.join(ctx.adapters) or 'none'})")


def _check_hidden(ctx: ServingContext, payload: TensorPayload, batch_size: int | None, what: str,
                  codecs: bool = False) -> None:
    """Validate a hidden-state payload against what this span computes (dtype and shape only: it
    becomes a tensor of the span's dtype on the compute thread, petalsd/batching.py for steps,
    `_tensor` for requests). With `codecs`, any activation dtype is accepted (compressed
    activations, tensors.CODECS); the caller answers in the dtype the request came in."""
    accepted = ACTIVATION_DTYPES if codecs else (ctx.dtype_name,)
    if payload.dtype not in accepted:
        raise _refuse(ErrorCode.BAD_TENSOR, f"{what} has dtype {payload.dtype}; this daemon computes in {ctx.dtype_name}"
                                            + (f" and accepts {', '.join(accepted)}" if codecs else ""))
    shape = payload.shape
    if len(shape) != 3 or shape[2] != ctx.span.hidden_size or shape[1] < 1 or shape[0] < 1:
        raise _refuse(ErrorCode.BAD_TENSOR,
                      f"{what} must be [batch, tokens>=1, {ctx.span.hidden_size}], got {list(shape)}")
    if batch_size is not None and shape[0] != batch_size:
        raise _refuse(ErrorCode.BAD_TENSOR, f"{what} batch {shape[0]} != the session's batch size {batch_size}")
    if shape[0] > ctx.limits.max_batch_size or shape[1] > ctx.limits.max_length:
        raise _refuse(ErrorCode.TOO_LONG, f"{what} {list(shape)} exceeds max batch {ctx.limits.max_batch_size} "
                                          f"or max length {ctx.limits.max_length}")


def _finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Training inputs must be numbers: a NaN or inf would come back as a NaN gradient that the
    client cannot trace to its cause."""
    if not bool(torch.isfinite(tensor).all()):
        raise _refuse(ErrorCode.BAD_TENSOR, f"{what} contains NaN or infinite values")
    return tensor


def _prompts(ctx: ServingContext, payload: TensorPayload | None, batch: int, blocks: int) -> torch.Tensor | None:
    """Deep prompts of a request or step, checked against this span (messages.check_prompts has
    checked their rank); None when the request has none."""
    if payload is None:
        return None
    if payload.dtype != ctx.dtype_name:
        raise _refuse(ErrorCode.BAD_TENSOR, f"prompts have dtype {payload.dtype}; this daemon computes in "
                                            f"{ctx.dtype_name}")
    n, rows, prefix, hidden_size = payload.shape
    if n != blocks or rows not in (1, batch) or hidden_size != ctx.span.hidden_size or prefix > ctx.limits.max_length:
        raise _refuse(ErrorCode.BAD_TENSOR, f"prompts must be [{blocks}, 1 or {batch}, prefix<={ctx.limits.max_length}, "
                                            f"{ctx.span.hidden_size}], got {list(payload.shape)}")
    return _finite(to_torch(payload, device=ctx.span.device), "prompts")


# ------------------------------------------------------------------------------------------ info

async def serve_info(ctx: ServingContext, channel: Channel) -> None:
    while True:
        # Bounded like a session: a peer that goes quiet (or never finishes a frame, holding up to
        # max_frame_size buffered) loses the stream after session_idle_timeout.
        msg = await _receive_within(channel, ctx.limits.session_idle_timeout)
        if msg is None:
            return
        if isinstance(msg, InfoRequest):
            await channel.send(ctx.info())
        else:
            await channel.send(error_reply(ErrorCode.BAD_REQUEST, f"{type(msg).__name__} is not valid on the info protocol"))


# ------------------------------------------------------------------------------------- inference

async def _open(ctx: ServingContext, msg: OpenSession, peer: str) -> Session:
    ctx.gate.request(peer)
    _check_span(ctx, msg.model_fingerprint, msg.start_block, msg.end_block)
    if msg.max_length < 1 or msg.max_length > ctx.limits.max_length:
        raise _refuse(ErrorCode.TOO_LONG, f"max_length {msg.max_length} is outside 1..{ctx.limits.max_length}")
    if msg.batch_size < 1 or msg.batch_size > ctx.limits.max_batch_size:
        raise _refuse(ErrorCode.BAD_REQUEST, f"batch_size {msg.batch_size} is outside 1..{ctx.limits.max_batch_size}")
    _check_adapter(ctx, msg.active_adapter)
    nbytes = ctx.span.cache_bytes_per_token(msg.batch_size, msg.start_block, msg.end_block) * msg.max_length
    ctx.sessions.reserve(msg.session_id, nbytes, peer)  # claims the id too, before the await below
    try:
        cache = await ctx.worker.run(ctx.span.new_cache, msg.batch_size, msg.max_length, msg.start_block, msg.end_block)
    except BaseException:
        ctx.sessions.abandon(msg.session_id)
        raise
    session = Session(session_id=msg.session_id, peer=peer, start=msg.start_block, end=msg.end_block,
                      max_length=msg.max_length, batch_size=msg.batch_size, cache=cache, reserved_bytes=nbytes,
                      adapter=msg.active_adapter)
    ctx.sessions.add(session)
    return session


def _signed_result(ctx: ServingContext, session: Session, msg: InferenceStep, payload: TensorPayload) -> StepResult:
    """The client's answer: the output signed over its binding to the request (DESIGN: signatures)."""
    signature = sign_response(ctx.signer, inference_binding(
        msg, start_block=session.start, end_block=session.end, model_fingerprint=ctx.fingerprint, output=payload))
    return StepResult(session_id=session.session_id, step=msg.step, position=msg.position, hidden=payload,
                      signature=signature)


async def _step(ctx: ServingContext, session: Session, msg: InferenceStep) -> TensorPayload:
    """Check and run one step; its output, not yet signed (the next daemon does not need the
    signature, so a pushed output leaves before it is computed)."""
    if msg.session_id != session.session_id:
        raise _refuse(ErrorCode.UNKNOWN_SESSION, f"this stream holds session {session.session_id.hex()}, "
                                                 f"not {msg.session_id.hex()}")
    _check_hidden(ctx, msg.hidden, session.batch_size, "hidden states", codecs=True)
    tokens = msg.hidden.shape[1]
    length = session.cache.length
    if msg.position > length:
        raise _refuse(ErrorCode.BAD_REQUEST, f"position {msg.position} is past the {length} cached tokens")
    if msg.position + tokens > session.max_length:
        raise _refuse(ErrorCode.TOO_LONG, f"{msg.position} + {tokens} tokens exceeds the session's "
                                          f"max_length {session.max_length}")
    if msg.push is not None and msg.push[0].start_block != session.end:
        raise _refuse(ErrorCode.BAD_REQUEST, f"push starts at block {msg.push[0].start_block}, but this "
                                             f"session's blocks end at {session.end}")
    hypo_ids = None
    if msg.hypo_ids is not None:
        hypo_ids = to_torch(msg.hypo_ids)
        if hypo_ids.dtype != torch.int64 or hypo_ids.shape != (session.batch_size,) or \
                bool(((hypo_ids < 0) | (hypo_ids >= session.batch_size)).any()):
            raise _refuse(ErrorCode.BAD_TENSOR, f"hypo_ids must be int64 [{session.batch_size}] in range")
    prompts = _prompts(ctx, msg.prompts, session.batch_size, session.end - session.start)
    with ctx.gate.job(session.peer):
        payload = await ctx.batcher.step(session.cache, msg.hidden, session.start, session.end, position=msg.position,
                                         hypo_ids=hypo_ids, prompts=prompts, adapter=session.adapter,
                                         peer=session.peer)
    session.steps += 1
    session.last_step = msg.step
    session.tokens += tokens
    session.last_active = time.monotonic()
    ctx.stats["steps"] += 1
    return payload  # in the step's own dtype: a compressed step is answered (and pushed on) compressed


async def _forward_output(ctx: ServingContext, owned: _Owned, msg: InferenceStep,
                          output: TensorPayload) -> trio.Event | None:
    """Send the step on to the next daemon named in `msg.push` (best effort, bounded in time); for
    a large output, an event set once it has landed there (Forwarder.push)."""
    assert msg.push is not None
    if ctx.forwarder is None:
        log.warning("step of session %s asks to push, but forwarding is off here", msg.session_id.hex()[:12])
        return None
    target, rest = msg.push[0], msg.push[1:]
    if target.peer_id not in owned.push_targets:
        cap = ctx.gate.limits.max_push_targets_per_session
        if len(owned.push_targets) >= cap:
            log.info("push of session %s not forwarded: it already pushed to %d daemons, the most allowed",
                     msg.session_id.hex()[:12], cap)
            return None
        owned.push_targets.add(target.peer_id)
    onward = InferenceStep(session_id=target.session_id, step=target.step, position=msg.position,
                           hidden=output, hypo_ids=msg.hypo_ids, push=rest or None)
    try:  # returns once the push is written: the client is answered after (the critical path first)
        return await ctx.forwarder.push(target, onward)
    except PushRefused as exc:
        log.info("push of session %s not forwarded: %s", msg.session_id.hex()[:12], exc)
        return None


async def _run_owned_step(ctx: ServingContext, owned: _Owned, msg: InferenceStep, via: str | None) -> None:
    """Run one step of an owned session (from its client stream or a push stream) and answer on the
    client's stream; with `push`, the output goes to the next daemon first (the critical path),
    before it is even signed for the client."""
    sid = owned.session.session_id.hex()[:12]
    arrived = time.monotonic()
    async with held(owned.lock):
        if ctx.owners.get(owned.session.session_id) is not owned:  # closed while this step waited for the lock
            return
        try:
            output = await _step(ctx, owned.session, msg)
        except PetalsError as exc:
            ctx.stats["errors"] += 1
            log.info("step refused peer=%s session=%s: %s", via or owned.channel.peer_id, sid, exc)
            await owned.channel.send(error_reply(exc, session_id=msg.session_id))
            return
        except Exception as exc:  # torch failed (out of memory, a kernel error): this step alone fails,
            # its cache cut back to the last whole step (batching.restore_cache); the session goes on
            ctx.stats["errors"] += 1
            log.warning("step failed peer=%s session=%s: %s: %s", via or owned.channel.peer_id, sid,
                        type(exc).__name__, exc)
            await owned.channel.send(error_reply(exc, f"the step failed in the daemon ({type(exc).__name__}: {exc})",
                                                 session_id=msg.session_id))
            return
        output_ready = time.monotonic()
        landed = await _forward_output(ctx, owned, msg, output) if msg.push is not None else None
        sent_on = time.monotonic()
        if landed is not None:  # a prefill: answer once the push is across (messages.PushLanded)
            with trio.move_on_after(PUSH_LANDED_WAIT):
                await landed.wait()
        await owned.channel.send(_signed_result(ctx, owned.session, msg, output))
        answered = time.monotonic()
        ctx.step_times.add(arrived, output_ready, sent_on if msg.push is not None else answered, answered)


async def _receive_within(channel: Channel, seconds: float) -> object | None:
    with trio.move_on_after(seconds):
        return await channel.receive()
    return None


# A frame that arrived whole but is not a valid message (bad msgpack, wrong field types, a tensor
# whose bytes disagree with its shape) leaves the byte stream in sync: the next frame starts where
# this one ended. Inside a session such a frame is answered like any other refused step, and the
# session goes on with its cache untouched. (A frame over the limit arrives as FrameTooLarge and
# ends the session; a frame cut short by the peer's EOF is a MalformedMessage too, but the stream
# layer has already reset that stream, so the reply fails with StreamClosed and the session ends as
# for any vanished client.)
_UNDECODABLE = (MalformedMessage, BadTensor)


async def serve_inference(ctx: ServingContext, channel: Channel) -> None:
    first = await _receive_within(channel, ctx.limits.session_idle_timeout)
    if first is None:
        return
    if isinstance(first, InferenceStep) and await _owner_once_open(ctx, first.session_id) is not None:
        await _serve_push_stream(ctx, channel, first)
    elif isinstance(first, OpenSession):
        await _serve_session(ctx, channel, first)
    else:
        await channel.send(error_reply(ErrorCode.BAD_REQUEST, "an inference stream must start with OpenSession "
                                       "(a push stream: with a step of a session open here), "
                                       f"not {type(first).__name__}"))


async def _receive_step(channel: Channel, session: Session, idle_timeout: float) -> object | None:
    """The next message on a session's client stream; None once the *session* (not just this
    stream: its steps may all come on a push stream) has had no step for `idle_timeout` seconds."""
    while True:
        idle_for = time.monotonic() - session.last_active
        if idle_for >= idle_timeout:
            return None
        msg = await _receive_within(channel, idle_timeout - idle_for)
        if msg is not None:
            return msg


async def _serve_session(ctx: ServingContext, channel: Channel, first: OpenSession) -> None:
    try:
        session = await _open(ctx, first, channel.peer_id or "?")
        owned = _Owned(session, channel)
        ctx.owners[session.session_id] = owned
    except PetalsError as exc:
        log.info("refused session peer=%s session=%s: %s", channel.peer_id, first.session_id.hex()[:12], exc)
        await channel.send(error_reply(exc, session_id=first.session_id))
        return
    finally:  # opened, refused or failed: a push waiting for this open stops waiting
        _opens_settled(ctx, first.session_id)
    sid = session.session_id.hex()[:12]
    try:
        log.info("session open peer=%s session=%s blocks=%d:%d max_length=%d batch=%d", channel.peer_id,
                 sid, session.start, session.end, session.max_length, session.batch_size)
        await channel.send(SessionOpened(session_id=session.session_id, max_length=session.max_length))
        while True:
            try:
                msg = await _receive_step(channel, session, ctx.limits.session_idle_timeout)
            except _UNDECODABLE as exc:
                ctx.stats["errors"] += 1
                log.info("bad message peer=%s session=%s: %s", channel.peer_id, sid, exc)
                await channel.send(error_reply(exc, session_id=session.session_id))
                continue
            if msg is None:
                log.info("session idle peer=%s session=%s: closing after %.0f s", channel.peer_id, sid,
                         ctx.limits.session_idle_timeout)
                await channel.send(error_reply(ErrorCode.TIMEOUT, f"session idle for "
                                               f"{ctx.limits.session_idle_timeout:.0f} s; closed",
                                               session_id=session.session_id))
                return
            if isinstance(msg, CloseSession):
                return
            if not isinstance(msg, InferenceStep):
                await channel.send(error_reply(ErrorCode.BAD_REQUEST, f"{type(msg).__name__} is not valid inside "
                                               "a session", session_id=session.session_id))
                continue
            await _run_owned_step(ctx, owned, msg, None)
    finally:
        # No new pushed step may start; one running now finishes first (the cache is dropped
        # below, and a compute job must never see it vanish). Steps are short: shield briefly.
        del ctx.owners[session.session_id]
        ctx.batcher.forget(session.cache)  # (close() below drops the cache)
        with trio.CancelScope(shield=True):
            async with held(owned.lock):
                ctx.sessions.close(session.session_id)
        log.info("session closed peer=%s session=%s steps=%d", channel.peer_id, sid, session.steps)


#: Steps of one push stream running at once (each of a different session, normally): the stream
#: carries the steps of every session whose previous hop is that daemon, and they must not wait
#: for each other's replies to be read; the compute worker still runs one job at a time.
MAX_PUSHED_STEPS_IN_FLIGHT = 64


async def _serve_push_stream(ctx: ServingContext, channel: Channel, first: InferenceStep) -> None:
    """Steps forwarded by a previous daemon; each runs on the session it names and is answered to
    that session's client. Ends when the pusher closes the stream or after the idle timeout."""
    peer = channel.peer_id or "?"
    activity = ctx.push_streams.setdefault(peer, LinkActivity(peer))
    in_flight = trio.CapacityLimiter(MAX_PUSHED_STEPS_IN_FLIGHT)
    log.info("push stream open peer=%s", peer)

    async def run(owned: _Owned, msg: InferenceStep) -> None:
        try:
            await _run_owned_step(ctx, owned, msg, peer)
        except PetalsError as exc:  # e.g. the client's stream is gone (its handler closes the session), or
            # a per-peer limit of the client: this step fails alone, never the other sessions' steps
            log.info("pushed step of session %s failed: %s", msg.session_id.hex()[:12], exc)
        finally:
            in_flight.release_on_behalf_of(msg)

    try:
        async with trio.open_nursery() as nursery:
            msg: object | None = first
            while msg is not None:
                if not isinstance(msg, InferenceStep):
                    await channel.send(error_reply(ErrorCode.BAD_REQUEST,
                                                   f"{type(msg).__name__} is not valid on a push stream"))
                elif (owned := await _owner_once_open(ctx, msg.session_id)) is None:
                    await channel.send(error_reply(ErrorCode.UNKNOWN_SESSION, f"no open session {msg.session_id.hex()}",
                                                   session_id=msg.session_id))
                else:
                    activity.steps += 1
                    if confirms_landing(msg):  # the pusher answers its client after this
                        with contextlib.suppress(PetalsError):
                            await channel.send(PushLanded(session_id=msg.session_id, step=msg.step))
                    await in_flight.acquire_on_behalf_of(msg)
                    # A session has one step in flight at a time (its client waits for the results).
                    nursery.start_soon(run, owned, msg)
                try:
                    msg = await _receive_within(channel, ctx.limits.session_idle_timeout)
                except StreamClosed as exc:  # the pusher is done: let the steps it sent finish, then end
                    log.info("push stream from peer=%s ended: %s", peer, exc)
                    msg = None
                except _UNDECODABLE as exc:
                    ctx.stats["errors"] += 1
                    log.info("bad message on push stream peer=%s: %s", peer, exc)
                    await channel.send(error_reply(exc))
                    msg = None  # a daemon sent us garbage: end its push stream (its link re-opens if it must)
    finally:
        if ctx.push_streams.get(peer) is activity:
            del ctx.push_streams[peer]
        log.info("push stream closed peer=%s steps=%d", peer, activity.steps)


# --------------------------------------------------------------------------- forward / backward

def _on_worker(make: Callable[[], Generator[None, None, T]], serialize: Callable[[T], R]) -> Generator[None, None, R]:
    """A span's block-by-block computation whose tensor work all happens on the compute thread:
    `make` (converting the request's payloads, then calling the span) runs in the first piece,
    `serialize` (the result to wire payloads) in the last."""
    return serialize((yield from make()))


def _tensor(ctx: ServingContext, payload: TensorPayload, what: str) -> torch.Tensor:
    """(Compute thread.) A checked request input as a tensor of finite numbers in the span's dtype."""
    return _finite(to_torch(payload, device=ctx.span.device).to(ctx.span.dtype), what)


async def _forward(ctx: ServingContext, msg: ForwardRequest, peer: str) -> ForwardResponse:
    _check_span(ctx, msg.model_fingerprint, msg.start_block, msg.end_block)
    _check_hidden(ctx, msg.hidden, None, "hidden states", codecs=True)
    batch, tokens = msg.hidden.shape[0], msg.hidden.shape[1]
    prompts = _prompts(ctx, msg.prompts, batch, msg.end_block - msg.start_block)
    _check_adapter(ctx, msg.active_adapter)
    activations = ctx.span.activation_bytes(batch, tokens, msg.start_block, msg.end_block)
    with ctx.gate.job(peer), ctx.sessions.budget.lend(activations, "this forward"):
        blocks = _on_worker(lambda: ctx.span.forward_blocks(_tensor(ctx, msg.hidden, "hidden states"),
                                                            msg.start_block, msg.end_block, prompts),
                            # the request's dtype: compressed in, compressed out
                            lambda out: from_torch(as_activation_dtype(out, msg.hidden.dtype)))
        payload = await ctx.worker.run_steps(steps_with(ctx.span, msg.active_adapter, blocks),
                                             tokens=batch * tokens, peer=peer)
    binding = forward_binding(msg, payload)
    ctx.stats["forward"] += 1
    return ForwardResponse(request_id=msg.request_id, hidden=payload, signature=sign_response(ctx.signer, binding))


def _grads(grads: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[TensorPayload, TensorPayload | None]:
    grad, grad_prompts = grads
    return from_torch(grad), (from_torch(grad_prompts) if grad_prompts is not None else None)


async def _backward(ctx: ServingContext, msg: BackwardRequest, peer: str) -> BackwardResponse:
    _check_span(ctx, msg.model_fingerprint, msg.start_block, msg.end_block)
    _check_hidden(ctx, msg.hidden, None, "hidden states")
    _check_hidden(ctx, msg.grad_output, msg.hidden.shape[0], "grad_output")
    if msg.grad_output.shape != msg.hidden.shape:
        raise _refuse(ErrorCode.BAD_TENSOR, f"grad_output {list(msg.grad_output.shape)} != hidden "
                                            f"{list(msg.hidden.shape)}")
    batch, tokens = msg.hidden.shape[0], msg.hidden.shape[1]
    prompts = _prompts(ctx, msg.prompts, batch, msg.end_block - msg.start_block)
    _check_adapter(ctx, msg.active_adapter)
    activations = ctx.span.activation_bytes(batch, tokens, msg.start_block, msg.end_block, grad=True)
    with ctx.gate.job(peer), ctx.sessions.budget.lend(activations, "this backward"):
        blocks = _on_worker(lambda: ctx.span.backward_blocks(_tensor(ctx, msg.hidden, "hidden states"),
                                                             _tensor(ctx, msg.grad_output, "grad_output"),
                                                             msg.start_block, msg.end_block, prompts), _grads)
        payload, prompts_payload = await ctx.worker.run_steps(steps_with(ctx.span, msg.active_adapter, blocks),
                                                              grad=True, peer=peer)
    binding = backward_binding(msg, payload, prompts_payload)
    ctx.stats["backward"] += 1
    return BackwardResponse(request_id=msg.request_id, grad_input=payload, signature=sign_response(ctx.signer, binding),
                            grad_prompts=prompts_payload)


async def serve_stateless(ctx: ServingContext, channel: Channel) -> None:
    """Forward and backward requests: any number per stream, one reply each; an idle stream is
    closed after session_idle_timeout (see serve_info)."""
    while True:
        msg = await _receive_within(channel, ctx.limits.session_idle_timeout)
        if msg is None:
            return
        request_id = getattr(msg, "request_id", None)
        peer = channel.peer_id or "?"
        try:
            if isinstance(msg, ForwardRequest):
                ctx.gate.request(peer)
                reply: object = await _forward(ctx, msg, peer)
            elif isinstance(msg, BackwardRequest):
                ctx.gate.request(peer)
                reply = await _backward(ctx, msg, peer)
            else:
                raise _refuse(ErrorCode.BAD_REQUEST, f"{type(msg).__name__} is not valid on this protocol")
        except PetalsError as exc:
            ctx.stats["errors"] += 1
            log.info("request refused peer=%s: %s", channel.peer_id, exc)
            reply = error_reply(exc, request_id=request_id)
        await channel.send(reply)
