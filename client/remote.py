"""Remote blocks as a torch module: stateless forward and backward through the swarm.

`RemoteSequential` runs hidden states [B, T, H] through blocks [start, end) that live on daemons,
over `/petals/forward/1` (and `/petals/backward/1` for gradients), so researchers can read
internal states (`model.layers[4:8](hidden)`) and fine-tuning can train client-side parameters
(prompts, adapters, a head) through frozen remote blocks. Every reply is signature-checked; a
failed request is retried on other daemons serving the same blocks (the failed one is banned).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import trio

from petals_protocol.errors import PetalsError, RemoteError
from petals_protocol.messages import BackwardRequest, BackwardResponse, ForwardRequest, ForwardResponse
from petals_protocol.signing import backward_binding, forward_binding, peer_id_from_text, verify_response
from petals_protocol.tensors import TensorPayload, from_torch, to_torch

from .routing import Hop, NoRoute, ServerInfo, choose_route
from .runtime import ClientRuntime
from .session import CALLER_FAULTS
from .swarm import NETWORK_ERRORS, SwarmClient, raise_for_reply

log = logging.getLogger("petals_client.remote")


async def _request(swarm: SwarmClient, server: ServerInfo, msg: Any, expected: type) -> Any:
    with trio.fail_after(swarm.step_timeout):
        stream = await swarm.open_forward(server)
        try:
            await stream.send(msg)
            reply = await stream.receive()
        finally:
            await stream.aclose()
    return raise_for_reply(reply, expected, server.peer_id)


async def run_hop(swarm: SwarmClient, hop: Hop, hidden: TensorPayload,
                  grad_output: TensorPayload | None = None) -> TensorPayload:
    """One forward (or backward, with grad_output) request to one daemon, verified."""
    if grad_output is None:
        return (await signed_forward(swarm, hop, hidden)).hidden
    msg = BackwardRequest(request_id=os.urandom(16), model_fingerprint=swarm.model_fingerprint,
                          start_block=hop.start, end_block=hop.end, hidden=hidden, grad_output=grad_output)
    reply = await _request(swarm, hop.server, msg, BackwardResponse)
    return _verified(hop, hidden, backward_binding(msg, reply.grad_input), reply.grad_input, reply.signature)


async def signed_forward(swarm: SwarmClient, hop: Hop, hidden: TensorPayload) -> ForwardResponse:
    """One verified forward request to one daemon, its signed reply whole (spot checks keep it as evidence)."""
    msg = ForwardRequest(request_id=os.urandom(16), model_fingerprint=swarm.model_fingerprint,
                         start_block=hop.start, end_block=hop.end, hidden=hidden)
    reply = await _request(swarm, hop.server, msg, ForwardResponse)
    _verified(hop, hidden, forward_binding(msg, reply.hidden), reply.hidden, reply.signature)
    return reply


def _verified(hop: Hop, hidden: TensorPayload, binding: Any, out: TensorPayload, signature: bytes) -> TensorPayload:
    verify_response(peer_id_from_text(hop.server.peer_id), binding, signature)
    if out.shape != hidden.shape:
        raise PetalsError(f"daemon {hop.server.name} returned shape {out.shape} for input {hidden.shape}")
    return out


async def run_range(swarm: SwarmClient, start: int, end: int, hidden: TensorPayload,
                    grad_output: TensorPayload | None = None) -> TensorPayload:
    """Blocks [start, end) forward (or, with grad_output, backward in reverse order), with retries.

    Backward needs each hop's input: it re-runs the forward over the chain first (daemons keep no
    activations between requests), then walks the hops backwards. A request that fails (stream
    closed, timeout, error reply, bad signature) bans the daemon that failed and starts over on a
    new route, at most `swarm.max_retries` times; every request is bounded by `swarm.step_timeout`.
    """
    attempts = 0
    while True:
        route = await _route(swarm, start, end)
        current_hop: Hop | None = None
        try:
            inputs: list[TensorPayload] = []
            current = hidden
            for hop in route:
                inputs.append(current)
                if grad_output is None or hop is not route[-1]:
                    current_hop = hop
                    current = await run_hop(swarm, hop, current)
            if grad_output is None:
                return current
            grad = grad_output
            for hop, hop_input in zip(reversed(route), reversed(inputs)):
                current_hop = hop
                grad = await run_hop(swarm, hop, hop_input, grad)
            return grad
        except NETWORK_ERRORS as exc:
            if isinstance(exc, RemoteError) and exc.code in CALLER_FAULTS:
                raise  # our request is at fault: every daemon would refuse it
            attempts += 1
            failed = current_hop.server.peer_id if current_hop is not None else getattr(exc, "peer", None)
            log.warning("request through blocks %d:%d failed at %s (%s: %s); retrying (%d/%d)", start, end,
                        current_hop.server.name if current_hop else "?", type(exc).__name__, exc, attempts,
                        swarm.max_retries)
            if failed:
                swarm.ban(failed)
            if attempts >= swarm.max_retries:
                raise


async def _route(swarm: SwarmClient, start: int, end: int) -> list[Hop]:
    """The best route among known daemons; re-learn the swarm only when none is left, because a
    refresh waits up to connect_timeout on a daemon that hangs (SIGSTOP) instead of dying."""
    try:
        return choose_route(swarm.servers(), start, end, banned=swarm.banned())
    except NoRoute:
        await swarm.refresh()
        return choose_route(swarm.servers(), start, end, banned=swarm.banned())


class _RemoteBlocks(torch.autograd.Function):
    """Autograd bridge: forward and backward of frozen remote blocks (gradient w.r.t. the input only)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, remote: RemoteSequential) -> torch.Tensor:  # type: ignore[override]
        ctx.remote = remote
        ctx.save_for_backward(hidden)
        payload = remote.runtime.call(run_range, remote.swarm, remote.start, remote.end, from_torch(hidden.detach()))
        return to_torch(payload, device=hidden.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (hidden,) = ctx.saved_tensors
        remote: RemoteSequential = ctx.remote
        payload = remote.runtime.call(run_range, remote.swarm, remote.start, remote.end,
                                      from_torch(hidden.detach()), from_torch(grad_output.contiguous().to(hidden.dtype)))
        return to_torch(payload, device=hidden.device), None


class RemoteSequential(torch.nn.Module):
    """Blocks [start, end) of the model, served by the swarm. Slicing gives a sub-range."""

    def __init__(self, runtime: ClientRuntime, swarm: SwarmClient, start: int, end: int) -> None:
        super().__init__()
        self.runtime, self.swarm, self.start, self.end = runtime, swarm, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"block {index} out of range for {len(self)} blocks")
            index = index % len(self)
            return RemoteSequential(self.runtime, self.swarm, self.start + index, self.start + index + 1)
        lo, hi, step = index.indices(len(self))
        if step != 1 or lo >= hi:
            raise IndexError("remote blocks can only be sliced into a non-empty contiguous range")
        return RemoteSequential(self.runtime, self.swarm, self.start + lo, self.start + hi)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _RemoteBlocks.apply(hidden, self)

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end}"
