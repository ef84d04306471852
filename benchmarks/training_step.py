"""One fine-tuning step through the swarm vs the same step with local `transformers`.

    python -m benchmarks.training_step --model-size 271m --daemons 3 --batch 8 --tokens 128 --json out.json

The step is prompt tuning (`tuning_mode="ptune"`, `--pre-seq-len` prefix embeddings, the only
trainable parameters): forward of `batch x tokens` token ids with the prefix, next-token loss,
`loss.backward()`, one Adam step. Locally it runs on the whole model (the prefix concatenated
to the input embeddings); through the swarm the blocks run on `--daemons` real `petalsd`
processes splitting them evenly. Local and swarm repeats alternate, so that load from other
processes on a shared machine hits both sides alike; the figure is the ratio of the medians,
measured in one run. The loss and the prefix gradient of the first repeat are compared between
the two sides as a check that both computed the same step.

Why the swarm costs more than the compute alone: daemons keep no activations between requests,
so a backward re-runs each hop's forward (about 4/3 of the local compute), the spans run one
after another, and activations and gradients cross the loopback network and are signed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from petals_client.localswarm import LocalSwarm

from .measure import machine_info, median
from .shapes import SHAPES, default_cache_dir, ensure_model, split_blocks
from .swarm_vs_local import start_daemons


def _step(model: Any, forward: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, float]:
    """One training step; returns (seconds, loss)."""
    began = time.perf_counter()
    optimizer.zero_grad()
    loss = forward(ids)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - began, loss.item()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from petals_client import AutoDistributedModelForCausalLM
    from petals_client.ptune import PromptTuning

    torch.set_num_threads(args.local_threads)
    shape = SHAPES[args.model_size]
    path = ensure_model(shape, Path(args.cache_dir))
    ids = torch.randint(3, shape.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).requires_grad_(False)
    spans = split_blocks(shape.num_layers, args.daemons)
    extra = ["--num-threads", str(args.daemon_threads), "--step-timeout", "3600", "--max-batch-size", str(args.batch)]
    with LocalSwarm(path, extra_args=extra, echo=args.echo_daemons, ready_timeout=600) as swarm:
        start_daemons(swarm, spans)
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs, tuning_mode="ptune",
                                                                 pre_seq_len=args.pre_seq_len, step_timeout=3600,
                                                                 dtype=torch.float32)
        with remote:
            prompts = PromptTuning("ptune", args.pre_seq_len, shape.hidden_size, shape.num_layers, 0.02)
            prompts.load_state_dict(remote.ptune.state_dict())

            def local_loss(batch: torch.Tensor) -> torch.Tensor:
                embeds = torch.cat([prompts.prefix(batch.shape[0]), local.get_input_embeddings()(batch)], dim=1)
                logits = local(inputs_embeds=embeds).logits[:, args.pre_seq_len:]
                return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1))

            def remote_loss(batch: torch.Tensor) -> torch.Tensor:
                return remote(input_ids=batch, labels=batch).loss

            # lr 0: the prompts stay equal on both sides, so every repeat computes the same step
            local_opt = torch.optim.Adam(prompts.parameters(), lr=0.0)
            remote_opt = torch.optim.Adam([p for p in remote.parameters() if p.requires_grad], lr=0.0)
            local_s: list[float] = []
            swarm_s: list[float] = []
            check: dict[str, float] = {}
            for repeat in range(args.repeats):
                seconds, loss = _step(local, local_loss, local_opt, ids)
                local_s.append(seconds)
                if repeat == 0:
                    check["local_loss"], local_grad = loss, prompts.prompt_embeddings.weight.grad.clone()
                seconds, loss = _step(remote, remote_loss, remote_opt, ids)
                swarm_s.append(seconds)
                if repeat == 0:
                    check["swarm_loss"] = loss
                    check["prefix_grad_max_abs_diff"] = (remote.ptune.prompt_embeddings.weight.grad
                                                         - local_grad).abs().max().item()
                print(f"repeat {repeat + 1}/{args.repeats}: local {local_s[-1]:.2f} s, swarm {swarm_s[-1]:.2f} s",
                      flush=True)
    return {
        "benchmark": "training_step", "model_size": args.model_size, "num_params": shape.num_params,
        "daemons": args.daemons, "spans": spans, "batch": args.batch, "tokens": args.tokens,
        "pre_seq_len": args.pre_seq_len, "repeats": args.repeats,
        "local_step_s": local_s, "swarm_step_s": swarm_s,
        "local_median_s": median(local_s), "swarm_median_s": median(swarm_s),
        "ratio_swarm_over_local": median(swarm_s) / median(local_s), "check": check,
        "machine": machine_info(args.local_threads, args.daemon_threads),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="271m", choices=sorted(SHAPES))
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--local-threads", type=int, default=1)
    parser.add_argument("--daemon-threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--echo-daemons", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    record = run(args)
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
