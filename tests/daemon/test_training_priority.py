"""Training traffic (forward/backward requests) waits behind inference steps in the compute worker."""
from __future__ import annotations

import dataclasses
import functools
import os
import threading

import torch
import trio

from petals_protocol.messages import BackwardRequest, ForwardRequest
from petals_protocol.models.span import load_span
from petals_protocol.models.synthetic import make_random_checkpoint
from petals_protocol.p2p.budget import ByteBudget
from petals_protocol.p2p.identity import ed25519_private_key, ephemeral_identity, peer_id
from petals_protocol.tensors import from_torch
from petalsd import config as config_mod
from petalsd.batching import Batcher
from petalsd.compute import INFERENCE, ComputeWorker
from petalsd.handlers import Limits, ServingContext, _backward, _forward
from petalsd.limits import PeerGate, ResourceLimits
from petalsd.sessions import CacheBudget, SessionTable


def test_forward_and_backward_requests_run_after_queued_inference(tmp_path) -> None:
    path = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2, hidden_size=32, num_heads=2,
                                  vocab_size=64, seed=1)
    span = load_span(path, 0, 2)
    hidden = from_torch(torch.randn(2, 4, 32))
    order: list[str] = []

    async def main() -> None:
        async with ComputeWorker() as worker:
            key = ephemeral_identity()
            limits = ResourceLimits.from_config(dataclasses.replace(config_mod.DaemonConfig(model="m")))
            ctx = ServingContext(
                span=span, fingerprint="f" * 64, model_name="m", peer_id=peer_id(key).to_base58(),
                signer=ed25519_private_key(key), sessions=SessionTable(4, CacheBudget(1 << 20)), worker=worker,
                limits=Limits(max_length=16, max_batch_size=4, session_idle_timeout=5, step_timeout=30),
                gate=PeerGate(limits), buffers=ByteBudget(per_peer=1 << 30, total=1 << 30),
                batcher=Batcher(worker, span))
            busy = threading.Event()

            async def run(name: str, coroutine_fn, *args) -> None:
                await coroutine_fn(*args)
                order.append(name)

            def request(kind: type, i: int):
                fields = dict(request_id=os.urandom(16), model_fingerprint="f" * 64, start_block=0, end_block=2,
                              hidden=hidden)
                if kind is BackwardRequest:
                    fields["grad_output"] = hidden
                return kind(**fields)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "running", worker.run, busy.wait)  # holds the worker
                await trio.sleep(0.05)
                for i in range(3):
                    nursery.start_soon(run, f"bwd{i}", _backward, ctx, request(BackwardRequest, i), "trainer")
                    nursery.start_soon(run, f"fwd{i}", _forward, ctx, request(ForwardRequest, i), "trainer")
                await trio.sleep(0.05)
                for i in range(2):  # decode steps of an inference session, queued after the training burst
                    step = functools.partial(worker.run, priority=INFERENCE, peer="user")
                    nursery.start_soon(run, f"step{i}", step, span.forward, torch.randn(1, 1, 32))
                    await trio.sleep(0.01)
                busy.set()

    trio.run(main)
    assert order[0] == "running"
    assert order[1:3] == ["step0", "step1"], order
    assert sorted(order[3:]) == sorted([f"bwd{i}" for i in range(3)] + [f"fwd{i}" for i in range(3)])
