"""Integrity end to end: a daemon that returns tampered activations is caught by the client's signature
check, banned, and routed around; the output stays exactly local transformers' output.

The rogue is cheap to write because it only needs to lie: it answers /petals/info/1 with the right model
fingerprint and a huge throughput (so routing prefers it for all blocks), opens sessions, and answers every
step with random hidden states and a signature that is not its own over them.
"""
from __future__ import annotations

import os

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.runtime import ClientRuntime
from petals_protocol.ids import INFERENCE_PROTOCOL, INFO_PROTOCOL, __version__
from petals_protocol.messages import (
    CloseSession,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    OpenSession,
    SessionOpened,
    StepResult,
)
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.p2p.host import listen_multiaddrs, make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity, peer_id_bytes
from petals_protocol.p2p.streams import StreamClosed, open_framed
from petals_protocol.tensors import from_torch, to_torch

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])


class RogueDaemon:
    """Claims blocks [0, num_blocks) of the model; every step's reply is forged."""

    def __init__(self, model_path, num_blocks: int) -> None:
        self.fingerprint = model_fingerprint(model_path)
        self.num_blocks = num_blocks
        self.steps_answered = 0
        key_pair = ephemeral_identity()
        self.peer_id = peer_id_bytes(key_pair)
        holder: dict[str, str] = {}

        async def main(nursery: trio.Nursery, stop: trio.Event) -> None:
            host = make_host(key_pair)
            ready = trio.Event()

            async def keep() -> None:
                async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
                    host.set_stream_handler(INFO_PROTOCOL, self._info)
                    host.set_stream_handler(INFERENCE_PROTOCOL, self._inference)
                    holder["addr"] = listen_multiaddrs(host)[0]
                    ready.set()
                    await trio.sleep_forever()

            nursery.start_soon(keep)
            await ready.wait()

        self.runtime = ClientRuntime(main, name="rogue-daemon")
        self.addr = holder["addr"]

    async def _info(self, stream) -> None:
        try:
            async with open_framed(stream) as channel:
                async for msg in channel:
                    assert isinstance(msg, InfoRequest)
                    await channel.send(InfoResponse(
                        peer_id=self.peer_id, version=__version__, model_name="rogue",
                        model_fingerprint=self.fingerprint, num_blocks=self.num_blocks, start_block=0,
                        end_block=self.num_blocks, dtype="float32", state="online", max_length=4096,
                        max_batch_size=8, max_sessions=64, active_sessions=0, cache_tokens_free=10**6,
                        throughput=1e9, public_name="rogue"))
        except StreamClosed:
            pass

    async def _inference(self, stream) -> None:
        try:
            async with open_framed(stream) as channel:
                async for msg in channel:
                    if isinstance(msg, OpenSession):
                        await channel.send(SessionOpened(session_id=msg.session_id, max_length=msg.max_length))
                    elif isinstance(msg, InferenceStep):
                        hidden = to_torch(msg.hidden)
                        forged = from_torch(torch.randn_like(hidden))
                        self.steps_answered += 1
                        await channel.send(StepResult(session_id=msg.session_id, step=msg.step,
                                                      position=msg.position, hidden=forged,
                                                      signature=os.urandom(64)))
                    elif isinstance(msg, CloseSession):
                        return
        except StreamClosed:
            pass

    def close(self) -> None:
        self.runtime.close()


def test_forged_activations_are_rejected_and_routed_around(llama_path, swarm_factory):
    # Honest daemons announce 1 block-step/s, so the rogue's claim wins the first route whatever
    # the loopback RTTs measured this time (they decide it otherwise, and they are noise).
    swarm = swarm_factory(llama_path, ["0:3", "3:6"], ["--throughput", "1"])
    rogue = RogueDaemon(llama_path, num_blocks=6)
    try:
        ref = AutoModelForCausalLM.from_pretrained(llama_path).generate(PROMPT, max_new_tokens=16, do_sample=False)
        with AutoDistributedModelForCausalLM.from_pretrained(
                llama_path, initial_peers=[*swarm.addrs, rogue.addr]) as model:
            rogue_id = rogue.addr.rsplit("/p2p/", 1)[1]
            assert rogue_id in {s.peer_id for s in model.swarm.servers()}
            with model.inference_session(max_length=64) as session:
                # the rogue's claimed throughput makes it the whole route at first
                assert [h.server.peer_id for h in session.route] == [rogue_id]
                out = model.generate(PROMPT, session=session, max_new_tokens=16, do_sample=False)
                assert session.recoveries >= 1
                assert rogue_id not in {h.server.peer_id for h in session.route}
            assert rogue_id in model.swarm.banned()
        assert rogue.steps_answered >= 1
        assert out.tolist() == ref.tolist()
    finally:
        rogue.close()
