"""Remote blocks as a torch module: stateless forward and backward through the swarm.

`RemoteSequential` runs hidden states [B, T, H] through blocks [start, end) that live on daemons,
over `/petals/forward/1` (and `/petals/backward/1` for gradients), so researchers can read
internal states (`model.layers[4:8](hidden)`) and fine-tuning can train client-side parameters
(prompts, adapters, a head) through frozen remote blocks. Every reply is signature-checked; a
failed request is retried on other daemons serving the same blocks (the failed one is banned).
With spot checks on (`checker`, from_pretrained's spot_check_rate), each forward hop's answer is
re-computed on another daemon with probability R before it is used (client/spotcheck.py); a daemon
found wrong is flagged and the call runs again on a route without it. Gradients are not checked.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import trio

from petals_protocol.errors import PetalsError, RemoteError
from petals_protocol.messages import BackwardRequest, BackwardResponse, ForwardRequest, ForwardResponse
from petals_protocol.p2p.streams import transfer_allowance
from petals_protocol.signing import backward_binding, forward_binding
from petals_protocol.tensors import TensorPayload, from_torch, to_torch

from .routing import Hop, NoRoute, ServerInfo, choose_route
from .replies import check_reply
from .runtime import ClientRuntime
from .session import CALLER_FAULTS, WrongOutput
from .swarm import NETWORK_ERRORS, SwarmClient

if TYPE_CHECKING:
    from .spotcheck import SpotChecker

log = logging.getLogger("petals_client.remote")


async def _request(swarm: SwarmClient, server: ServerInfo, msg: ForwardRequest | BackwardRequest, expected: type,
                   binding: Any) -> Any:
    # the request's tensors go out, and an output (or a gradient) the activations' size comes back
    sent = msg.hidden.nbytes + (msg.grad_output.nbytes if isinstance(msg, BackwardRequest) else 0)
    with trio.fail_after(swarm.step_timeout + transfer_allowance(sent + msg.hidden.nbytes)):
        stream = await swarm.open_forward(server)
        try:
            await stream.send(msg)
            reply = await stream.receive()
        finally:
            await stream.aclose()
    return check_reply(reply, expected, server.peer_id, binding)


async def run_hop(swarm: SwarmClient, hop: Hop, hidden: TensorPayload, grad_output: TensorPayload | None = None,
                  prompts: TensorPayload | None = None,
                  adapter: str | None = None) -> tuple[TensorPayload, TensorPayload | None]:
    """One forward (or backward, with grad_output) request to one daemon, verified. Returns the
    output (or the gradient w.r.t. `hidden`) and, for a backward with `prompts`, theirs."""
    if grad_output is None:
        return (await signed_forward(swarm, hop, hidden, prompts=prompts, adapter=adapter)).hidden, None
    msg = BackwardRequest(request_id=os.urandom(16), model_fingerprint=swarm.model_fingerprint,
                          start_block=hop.start, end_block=hop.end, hidden=hidden, grad_output=grad_output,
                          prompts=prompts, active_adapter=adapter)
    reply = await _request(swarm, hop.server, msg, BackwardResponse,
                           lambda r: backward_binding(msg, r.grad_input, r.grad_prompts))
    out, grad_prompts = reply.grad_input, reply.grad_prompts
    _same_shape(hop, hidden, out)
    expected = prompts.shape if prompts is not None else None
    if (grad_prompts.shape if grad_prompts is not None else None) != expected:
        raise PetalsError(f"daemon {hop.server.name} returned prompt gradients that do not match the prompts sent")
    return out, grad_prompts


async def signed_forward(swarm: SwarmClient, hop: Hop, hidden: TensorPayload, *, prompts: TensorPayload | None = None,
                         adapter: str | None = None) -> ForwardResponse:
    """One verified forward request to one daemon, its signed reply whole (spot checks keep it as evidence)."""
    msg = ForwardRequest(request_id=os.urandom(16), model_fingerprint=swarm.model_fingerprint,
                         start_block=hop.start, end_block=hop.end, hidden=hidden, prompts=prompts,
                         active_adapter=adapter)
    reply = await _request(swarm, hop.server, msg, ForwardResponse, lambda r: forward_binding(msg, r.hidden))
    _same_shape(hop, hidden, reply.hidden)
    return reply


def _same_shape(hop: Hop, hidden: TensorPayload, out: TensorPayload) -> TensorPayload:
    if out.shape != hidden.shape:
        raise PetalsError(f"daemon {hop.server.name} returned shape {out.shape} for input {hidden.shape}")
    return out


async def run_range(swarm: SwarmClient, start: int, end: int, hidden: TensorPayload,
                    grad_output: TensorPayload | None = None, *, prompts: torch.Tensor | None = None,
                    adapter: str | None = None, busy: set[str] | None = None,
                    checker: SpotChecker | None = None) -> tuple[TensorPayload, torch.Tensor | None]:
    """Blocks [start, end) forward (or, with grad_output, backward in reverse order), with retries.

    `prompts` [end - start, 1 or B, K, H]: deep prompts, each hop gets its blocks' slice; a
    backward also returns their gradient (else None). `adapter`: the LoRA adapter to compute
    with (only daemons announcing it are routed to). `busy`: daemons other micro-batches of the
    same call already use, avoided while another route exists. `checker`: spot-check forward hops.

    Backward needs each hop's input: it re-runs the forward over the chain first (daemons keep no
    activations between requests), then walks the hops backwards. A request that fails (stream
    closed, timeout, error reply, bad signature) bans the daemon that failed and starts over on a
    new route, at most `swarm.max_retries` times; every request is bounded by `swarm.step_timeout`.
    A hop a spot check finds wrong is flagged by the checker and the call starts over the same way.
    """
    attempts = 0
    while True:
        route = await _route(swarm, start, end, adapter, busy)
        current_hop: Hop | None = None
        checking = False  # a failure inside a check is the checker's to handle, never the hop's
        try:
            inputs: list[TensorPayload] = []
            current = hidden
            for hop in route:
                inputs.append(current)
                if grad_output is None or hop is not route[-1]:
                    current_hop = hop
                    current, _ = await run_hop(swarm, hop, current, None, _hop_prompts(prompts, start, hop), adapter)
                    if checker is not None and checker.choose():
                        checking = True
                        await checker.check(hop, to_torch(inputs[-1]), to_torch(current), adapter=adapter,
                                            prompts=None if prompts is None else prompts[hop.start - start:hop.end - start])
                        checking = False
            if grad_output is None:
                return current, None
            grad = grad_output
            grad_prompts: list[torch.Tensor] = []
            for hop, hop_input in zip(reversed(route), reversed(inputs)):
                current_hop = hop
                grad, hop_grad = await run_hop(swarm, hop, hop_input, grad, _hop_prompts(prompts, start, hop), adapter)
                if hop_grad is not None:
                    grad_prompts.insert(0, to_torch(hop_grad))
            return grad, (torch.cat(grad_prompts) if grad_prompts else None)
        except WrongOutput as exc:  # flagged by the checker: the next route avoids it
            attempts += 1
            log.warning("request through blocks %d:%d: %s; running it again (%d/%d)", start, end, exc, attempts,
                        swarm.max_retries)
            if attempts >= swarm.max_retries:
                raise
        except NETWORK_ERRORS as exc:
            if checking or (isinstance(exc, RemoteError) and exc.code in CALLER_FAULTS):
                raise  # no checker for the hop at R = 1, or our request is at fault: every daemon would refuse it
            attempts += 1
            failed = current_hop.server.peer_id if current_hop is not None else getattr(exc, "peer", None)
            log.warning("request through blocks %d:%d failed at %s (%s: %s); retrying (%d/%d)", start, end,
                        current_hop.server.name if current_hop else "?", type(exc).__name__, exc, attempts,
                        swarm.max_retries)
            if failed:
                swarm.ban(failed)
            if attempts >= swarm.max_retries:
                raise


def _hop_prompts(prompts: torch.Tensor | None, start: int, hop: Hop) -> TensorPayload | None:
    return None if prompts is None else from_torch(prompts[hop.start - start:hop.end - start].contiguous())


async def _route(swarm: SwarmClient, start: int, end: int, adapter: str | None = None,
                 busy: set[str] | None = None) -> list[Hop]:
    """The best route among known daemons (with `adapter`, if any), preferring daemons not `busy`
    with other micro-batches; re-learn the swarm only when none is left, because a refresh waits
    up to connect_timeout on a daemon that hangs (SIGSTOP) instead of dying."""
    for attempt in range(2):
        servers = [s for s in swarm.servers() if adapter is None or adapter in s.adapters]
        avoid = set(busy or ())
        while avoid:  # give up avoiding the busy daemons of the blocks nobody else serves
            try:
                route = choose_route(servers, start, end, banned=swarm.banned() | avoid, push=False)
            except NoRoute as exc:
                gaps = exc.uncovered
                by_peer = {s.peer_id: s for s in servers}
                kept = {p for p in avoid if p in by_peer and not any(
                    by_peer[p].start < gap_end and gap_start < by_peer[p].end for gap_start, gap_end in gaps)}
                avoid = kept if kept != avoid else set()
            else:
                assert busy is not None
                busy.update(h.server.peer_id for h in route)
                return route
        try:
            # the client drives every hop of a stateless request: no daemon-to-daemon legs
            route = choose_route(servers, start, end, banned=swarm.banned(), push=False)
        except NoRoute:
            if attempt:
                raise
            await swarm.refresh()
            continue
        if busy is not None:
            busy.update(h.server.peer_id for h in route)
        return route
    raise AssertionError("unreachable")


async def run_batched(swarm: SwarmClient, start: int, end: int, hidden: torch.Tensor,
                      grad_output: torch.Tensor | None, prompts: torch.Tensor | None, adapter: str | None,
                      rows: int, checker: SpotChecker | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`run_range` on micro-batches of at most `rows` sequences, in parallel (on different
    daemons where several serve the blocks); results joined in order, prompt gradients summed
    (or joined, for per-sequence prompts)."""
    bounds = [(lo, min(lo + rows, hidden.shape[0])) for lo in range(0, hidden.shape[0], max(rows, 1))]
    results: list[tuple[TensorPayload, torch.Tensor | None] | None] = [None] * len(bounds)
    busy: set[str] = set()
    per_row = prompts is not None and prompts.shape[1] == hidden.shape[0] and prompts.shape[1] > 1

    async def one(index: int, lo: int, hi: int) -> None:
        chunk_prompts = prompts[:, lo:hi] if per_row else prompts
        grad = from_torch(grad_output[lo:hi].contiguous()) if grad_output is not None else None
        results[index] = await run_range(swarm, start, end, from_torch(hidden[lo:hi].contiguous()), grad,
                                         prompts=chunk_prompts, adapter=adapter,
                                         busy=busy if len(bounds) > 1 else None, checker=checker)

    async with trio.open_nursery() as nursery:
        for index, (lo, hi) in enumerate(bounds):
            nursery.start_soon(one, index, lo, hi)
    done = [r for r in results if r is not None]
    out = torch.cat([to_torch(r[0]) for r in done])
    grads = [r[1] for r in done if r[1] is not None]
    if not grads:
        return out, None
    return out, (torch.cat(grads, dim=1) if per_row else torch.stack(grads).sum(0))


class _RemoteBlocks(torch.autograd.Function):
    """Autograd bridge: forward and backward of frozen remote blocks (gradients w.r.t. the input
    and the deep prompts, if any)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None,  # type: ignore[override]
                remote: RemoteSequential) -> torch.Tensor:
        ctx.remote = remote
        ctx.save_for_backward(hidden, prompts)
        out, _ = remote.runtime.call(run_batched, remote.swarm, remote.start, remote.end, hidden.detach(), None,
                                     _detached(prompts, hidden.dtype), remote.active_adapter, remote.rows(hidden),
                                     remote.checker)
        return out.to(hidden.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:  # type: ignore[override]
        hidden, prompts = ctx.saved_tensors
        remote: RemoteSequential = ctx.remote
        grad, grad_prompts = remote.runtime.call(run_batched, remote.swarm, remote.start, remote.end, hidden.detach(),
                                                 grad_output.contiguous().to(hidden.dtype),
                                                 _detached(prompts, hidden.dtype), remote.active_adapter,
                                                 remote.rows(hidden), remote.checker)
        if grad_prompts is not None and prompts is not None:
            grad_prompts = grad_prompts.to(device=prompts.device, dtype=prompts.dtype)
        return grad.to(hidden.device), grad_prompts, None


def _detached(prompts: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if prompts is None else prompts.detach().to(dtype).contiguous()


class RemoteSequential(torch.nn.Module):
    """Blocks [start, end) of the model, served by the swarm. Slicing gives a sub-range."""

    def __init__(self, runtime: ClientRuntime, swarm: SwarmClient, start: int, end: int, *,
                 micro_batch_size: int | None = None, active_adapter: str | None = None,
                 checker: SpotChecker | None = None) -> None:
        super().__init__()
        self.runtime, self.swarm, self.start, self.end = runtime, swarm, start, end
        # Sequences per request (None: the smallest max_batch_size the daemons announce); more
        # are split into micro-batches run in parallel.
        self.micro_batch_size = micro_batch_size
        self.active_adapter = active_adapter  # a LoRA adapter on the daemons (None: the base model)
        self.checker = checker  # spot checks of forward hops (None: off)

    def rows(self, hidden: torch.Tensor) -> int:
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        limits = [s.max_batch_size for s in self.swarm.servers() if s.max_batch_size > 0]
        return min(limits) if limits else hidden.shape[0]

    def _sub(self, start: int, end: int) -> RemoteSequential:
        return RemoteSequential(self.runtime, self.swarm, start, end, micro_batch_size=self.micro_batch_size,
                                active_adapter=self.active_adapter, checker=self.checker)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"block {index} out of range for {len(self)} blocks")
            index = index % len(self)
            return self._sub(self.start + index, self.start + index + 1)
        lo, hi, step = index.indices(len(self))
        if step != 1 or lo >= hi:
            raise IndexError("remote blocks can only be sliced into a non-empty contiguous range")
        return self._sub(self.start + lo, self.start + hi)

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, T, H] through the blocks; `prompts` [blocks, 1 or B, K, H] are deep
        prompts added at each block's input to positions [0, K) (gradients flow to them)."""
        if prompts is not None and (prompts.ndim != 4 or prompts.shape[0] != len(self)):
            raise ValueError(f"prompts must be [{len(self)}, batch, prefix, hidden], got {list(prompts.shape)}")
        return _RemoteBlocks.apply(hidden, prompts, self)

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end}"
