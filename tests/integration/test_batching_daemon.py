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


def test_concurrent_sessions_batched_match_local(llama_path, swarm_factory, tmp_path):
    sock = tmp_path / "control.sock"
    swarm = swarm_factory(llama_path, ["0:6"], ["--batching", "--control-socket", str(sock)])
    prompts = [torch.tensor([[3 + i, 14, 15 + 2 * i, 92, 65]]) for i in range(6)]
    local = AutoModelForCausalLM.from_pretrained(llama_path)
    refs = [local.generate(p, max_new_tokens=24, do_sample=False) for p in prompts]
    results: list = [None] * len(prompts)
    with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs) as model:
        def run(i: int) -> None:
            results[i] = model.generate(prompts[i], max_new_tokens=24, do_sample=False)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [r.tolist() for r in results] == [r.tolist() for r in refs]
    _, _, body = ctl.request(str(sock), "GET", "/v1/metrics")
    metrics = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))
    assert float(metrics["petalsd_batched_steps_total"]) > 0, "no decode step was batched"
    print(f"\nbatched forwards: {metrics['petalsd_batches_total']}, steps inside them: "
          f"{metrics['petalsd_batched_steps_total']}")
