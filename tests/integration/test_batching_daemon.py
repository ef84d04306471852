"""Cross-session batching in a real daemon (`--batching`): concurrent sessions share batched forwards and
every session still generates exactly what local transformers generates."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client import ctl

pytestmark = pytest.mark.integration


def _generate_concurrently(model, prompts: list[torch.Tensor]) -> list:
    """Greedy generation of every prompt, one thread each, all started together."""
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = model.generate(prompts[i], max_new_tokens=24, do_sample=False).tolist()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_sessions_batched_match_local(llama_path, swarm_factory, tmp_path):
    sock = tmp_path / "control.sock"
    swarm = swarm_factory(llama_path, ["0:6"], ["--batching", "--control-socket", str(sock)])
    prompts = [torch.tensor([[3 + i, 14, 15 + 2 * i, 92, 65]]) for i in range(6)]
    local = AutoModelForCausalLM.from_pretrained(llama_path)
    refs = [local.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs) as model:
        results = _generate_concurrently(model, prompts)
    assert results == [r.tolist() for r in refs]
    _, _, body = ctl.request(str(sock), "GET", "/v1/metrics")
    metrics = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))
    assert float(metrics["petalsd_batched_steps_total"]) > 0, "no decode step was batched"
    print(f"\nbatched forwards: {metrics['petalsd_batches_total']}, steps inside them: "
          f"{metrics['petalsd_batched_steps_total']}")


def test_client_head_batching_with_batching_daemons_matches_local(llama_path, swarm_factory):
    """`from_pretrained(batching=True)`: the client shares head calls across concurrent sessions,
    two `--batching` daemons batch their steps, push forwards between them, and greedy output is
    still what local transformers generates."""
    swarm = swarm_factory(llama_path, ["0:3", "3:6"], ["--batching"])
    prompts = [torch.tensor([[5 + i, 11, 40 + 3 * i, 7, 19, 2 + i]]) for i in range(6)]
    local = AutoModelForCausalLM.from_pretrained(llama_path)
    refs = [local.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs,
                                                         batching=True) as model:
        assert model.head_batcher is not None
        results = _generate_concurrently(model, prompts)
        batches, requests = model.head_batcher.batches, model.head_batcher.batched_requests
    assert results == [r.tolist() for r in refs]
    assert batches > 0, "no head call was shared between sessions"
    print(f"\nshared head calls: {batches}, session steps inside them: {requests}")
