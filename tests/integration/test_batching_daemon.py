"""Cross-session batching in a real daemon (`--batching`): concurrent sessions share batched forwards and
every session still generates exactly what local transformers generates."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client import ctl
from petalsd.step_times import PHASES

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
    metrics = ctl.metrics(str(sock))
    assert float(metrics["petalsd_batched_steps_total"]) > 0, "no decode step was batched"
    print(f"\nbatched forwards: {metrics['petalsd_batches_total']}, steps inside them: "
          f"{metrics['petalsd_batched_steps_total']}")


def test_client_head_batching_with_batching_daemons_matches_local(llama_path, swarm_factory, tmp_path):
    """`from_pretrained(batching=True)`: the client shares head calls across concurrent sessions,
    two `--batching` daemons batch their steps, the first pushes each batch's outputs to the
    second in shared writes, and greedy output is still what local transformers generates."""
    sock = tmp_path / "control.sock"
    swarm = swarm_factory(llama_path, ["3:6"], ["--batching"])
    swarm.start("0:3", args=["--control-socket", str(sock)])  # the first hop: it pushes to 3:6
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
    metrics = ctl.metrics(str(sock))
    pushes, writes = float(metrics["petalsd_pushes_total"]), float(metrics["petalsd_push_writes_total"])
    assert pushes >= len(prompts) * 23 and writes < pushes, (pushes, writes)  # pushes of a batch shared writes
    # Where its steps' time went (petalsd/step_times.py): every step is timed, in every phase
    # (computing, pushing the output on, answering the client).
    assert metrics["petalsd_timed_steps_total"] == metrics['petalsd_requests_total{kind="steps"}'] > 0
    phases = {phase: metrics[f'petalsd_step_seconds_total{{phase="{phase}"}}'] for phase in PHASES}
    assert all(seconds > 0 for seconds in phases.values()), phases
    print(f"\nshared head calls: {batches}, session steps inside them: {requests}; "
          f"pushes {pushes:.0f} in {writes:.0f} writes")
