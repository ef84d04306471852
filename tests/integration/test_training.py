"""Training through the swarm: loss, logits and gradients equal local transformers (fp32)."""
from __future__ import annotations

import signal

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.remote import _route
from petals_client.routing import ServerInfo, choose_route
from swarmlib import KillWhenRouted, start_swarm

pytestmark = pytest.mark.integration

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [2, 71, 82, 81, 82, 84, 59, 4, 52, 35]])


@pytest.fixture(scope="module", params=["llama", "bloom"])
def family_model(request, llama_path, bloom_path):
    path = llama_path if request.param == "llama" else bloom_path
    swarm = start_swarm(path, ["0:2", "2:4", "4:6"])
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs)
    yield path, model
    model.close()
    swarm.stop()


def local_step(path, **inputs):
    ref = AutoModelForCausalLM.from_pretrained(path)
    return ref, ref(**inputs)


def test_loss_logits_and_input_gradients_equal_local(family_model):
    path, model = family_model
    ref, _ = local_step(path, input_ids=IDS[:, :1])
    embeds = ref.get_input_embeddings()(IDS).detach()
    x_ref = embeds.clone().requires_grad_(True)
    expected = ref(inputs_embeds=x_ref, labels=IDS)
    expected.loss.backward()

    x = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x, labels=IDS)
    out.loss.backward()
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-5
    assert (out.logits - expected.logits).abs().max().item() <= 1e-5
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-5
    assert x.grad.abs().sum() > 0

    by_ids = model(input_ids=IDS, labels=IDS)  # the same through the model's own embeddings
    assert abs(by_ids.loss.item() - expected.loss.item()) <= 1e-5
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert not [name for name, p in model.named_parameters() if p.requires_grad]  # nothing trainable by default


def test_micro_batches_equal_one_batch(family_model):
    path, model = family_model
    ids = torch.cat([IDS, IDS.flip(1)])
    whole = model(input_ids=ids, labels=ids)
    model.layers.micro_batch_size = 1
    try:
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        split = model(inputs_embeds=x, labels=ids)
        split.loss.backward()
    finally:
        model.layers.micro_batch_size = None
    x_whole = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=x_whole, labels=ids).loss.backward()
    assert (split.logits - whole.logits).abs().max().item() <= 1e-5
    assert (x.grad - x_whole.grad).abs().max().item() <= 1e-6


def test_micro_batches_go_to_different_daemons_serving_the_same_blocks():
    servers = [ServerInfo(peer_id=f"p{i}", addrs=(), start=start, end=end)
               for i, (start, end) in enumerate([(0, 3), (3, 6), (3, 6)])]

    class Swarm:
        def servers(self):
            return servers

        def banned(self):
            return frozenset()

    busy: set[str] = set()
    first = trio.run(_route, Swarm(), 0, 6, None, busy)
    second = trio.run(_route, Swarm(), 0, 6, None, busy)
    third = trio.run(_route, Swarm(), 0, 6, None, busy)  # every daemon busy: the best route again
    assert {first[1].server.peer_id, second[1].server.peer_id} == {"p1", "p2"}
    assert first[0].server.peer_id == second[0].server.peer_id == "p0"
    assert [h.server.peer_id for h in third] == [h.server.peer_id for h in choose_route(servers, 0, 6)]


def test_a_daemon_killed_during_backward_is_retried_elsewhere(llama_path, swarm_factory, monkeypatch):
    swarm = swarm_factory(llama_path, ["0:3", "3:6", "3:6"])
    ref, _ = local_step(llama_path, input_ids=IDS[:, :1])
    x_ref = ref.get_input_embeddings()(IDS).detach().requires_grad_(True)
    ref(inputs_embeds=x_ref, labels=IDS).loss.backward()
    with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs, max_retries=3,
                                                         step_timeout=20.0) as model:
        victims = {d.peer_id: d for d in swarm.daemons}

        def kill(peer_id: str) -> None:
            victims[peer_id].signal(signal.SIGKILL)
            victims[peer_id].process.wait(10)

        killing = KillWhenRouted(kill, start=3, armed=False).install(monkeypatch)
        x = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
        hidden = model.layers(model.client_part.after_embeddings(x))
        # Runs when backward reaches the remote blocks: the 3:6 daemon it routes through then dies.
        hidden.register_hook(lambda grad: setattr(killing, "armed", True))
        logits = model.client_part.logits(hidden)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        loss.backward()
        assert len(killing.killed) == 1
        victim = victims[killing.killed[0]]
        assert victim.process.wait(10) == -signal.SIGKILL
        assert victim.peer_id in model.swarm.banned()
        assert (x.grad - x_ref.grad).abs().max().item() <= 1e-5
