"""A swarm of real daemons reproduces local transformers generation exactly."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.routing import choose_route
from petals_protocol.models.span import load_span


pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def local_generate(path, ids, **opts):
    return AutoModelForCausalLM.from_pretrained(path).generate(ids, **opts)


@pytest.fixture(scope="module")
def llama_model(llama_path, llama_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=llama_swarm.addrs)
    yield model
    model.close()


def test_greedy_equals_local_llama(llama_path, llama_model):
    ref = local_generate(llama_path, PROMPT, max_new_tokens=24, do_sample=False)
    out = llama_model.generate(PROMPT, max_new_tokens=24, do_sample=False)
    assert out.tolist() == ref.tolist()
    route = choose_route(llama_model.swarm.servers(), 0, 6)
    assert [(h.start, h.end) for h in route] == [(0, 2), (2, 4), (4, 6)]


def test_greedy_equals_local_bloom(bloom_path, swarm_factory):
    swarm = swarm_factory(bloom_path, ["0:2", "2:4", "4:6"])
    with AutoDistributedModelForCausalLM.from_pretrained(bloom_path, initial_peers=swarm.addrs) as model:
        ref = local_generate(bloom_path, PROMPT, max_new_tokens=16, do_sample=False)
        assert model.generate(PROMPT, max_new_tokens=16, do_sample=False).tolist() == ref.tolist()


def test_sampling_with_seed_equals_local(llama_path, llama_model):
    opts = dict(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=30, top_p=0.95)
    torch.manual_seed(7)
    ref = local_generate(llama_path, PROMPT, **opts)
    torch.manual_seed(7)
    assert llama_model.generate(PROMPT, **opts).tolist() == ref.tolist()


def test_batch_of_two(llama_path, llama_model):
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    ref = local_generate(llama_path, ids, max_new_tokens=10, do_sample=False)
    assert llama_model.generate(ids, max_new_tokens=10, do_sample=False).tolist() == ref.tolist()


def test_multi_turn_session_equals_one_long_generation(llama_path, llama_model):
    turn2 = torch.tensor([[7, 7, 21]])
    with llama_model.inference_session(max_length=64) as session:
        first = llama_model.generate(PROMPT, session=session, max_new_tokens=8)
        second = llama_model.generate(turn2, session=session, max_new_tokens=8)
    ref1 = local_generate(llama_path, PROMPT, max_new_tokens=8, do_sample=False)
    assert first.tolist() == ref1.tolist()
    context = torch.cat([ref1, turn2], dim=1)
    ref2 = local_generate(llama_path, context, max_new_tokens=8, do_sample=False)
    assert second.tolist() == ref2[:, ref1.shape[1]:].tolist()


def test_two_concurrent_sessions_stay_correct(llama_path, llama_model):
    prompts = [PROMPT, torch.tensor([[100, 2, 50, 9]])]
    refs = [local_generate(llama_path, p, max_new_tokens=20, do_sample=False) for p in prompts]
    results: list = [None, None]

    def run(i):
        results[i] = llama_model.generate(prompts[i], max_new_tokens=20, do_sample=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.tolist() for r in results] == [r.tolist() for r in refs]


def test_full_forward_logits_and_block_slices(llama_path, llama_model):
    ref = AutoModelForCausalLM.from_pretrained(llama_path)
    with torch.no_grad():
        expected = ref(PROMPT).logits
        logits = llama_model(PROMPT).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    hidden = llama_model.client_part.embed(PROMPT)
    with torch.no_grad():
        remote = llama_model.layers[1:5](hidden)
        local = load_span(llama_path, 1, 5).forward(hidden)
    assert torch.equal(remote, local)


def test_gradients_through_remote_blocks(llama_path, llama_model):
    hidden = llama_model.client_part.embed(PROMPT).detach().requires_grad_(True)
    remote_out = llama_model.layers(hidden)
    remote_out.pow(2).mean().backward()
    span = load_span(llama_path, 0, 6)
    h2 = hidden.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        for p in span.parameters() if hasattr(span, "parameters") else []:
            p.requires_grad_(False)
        local_out = span.forward(h2)
        local_out.pow(2).mean().backward()
    assert (hidden.grad - h2.grad).abs().max().item() <= 1e-5
