"""Pipelined prefill (`from_pretrained(prefill_chunk=N)`) against one pass and local, in one run.

    .venv/bin/python -m benchmarks.pipelined_prefill --model-size 271m --daemons 3 --lengths 512 2048 --chunk 128

A prompt sent in chunks flows along the pushing daemons, so daemon k computes chunk i while
daemon k-1 computes chunk i+1; one pass makes each daemon wait for the whole prompt from the one
before. For each prompt length the run times, `--repeats` times and interleaved: local
`transformers` (the model's forward over the prompt, `--local-threads` threads), the swarm's one
pass, and the swarm in chunks of `--chunk` tokens; each through a fresh inference session, the
time from the prompt's embeddings in to the last hop's hidden states out. It prints the medians,
their ratios to local, and the logits' max abs difference (chunked vs one pass, one pass vs local)
at every position of the prompt: chunked attention rounds differently from one pass, which is why
the option is off by default.

Each daemon runs `--daemon-threads` torch threads (default 1), as volunteers' daemons on separate
machines would each have their own cores: on one machine with fewer cores than daemons the
daemons' chunks contend for the same cores and the overlap cannot show fully.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from petals_client.localswarm import LocalSwarm

from .measure import machine_info, median
from .shapes import SHAPES, default_cache_dir, ensure_model, split_blocks
from .swarm_vs_local import random_prompt, start_daemons


def _swarm_prefill(model: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds from embeddings in to hidden states out through a fresh session, and the logits."""
    with model.inference_session(max_length=ids.shape[1] + 1) as session, torch.inference_mode():
        embeds = model.client_part.embed(ids)
        began = time.perf_counter()
        hidden = session.step(embeds)
        elapsed = time.perf_counter() - began
        return elapsed, model.client_part.logits(hidden)


def _local_prefill(model: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        began = time.perf_counter()
        logits = model(ids).logits
        return time.perf_counter() - began, logits


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from petals_client import AutoDistributedModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", choices=sorted(SHAPES), default="271m")
    p.add_argument("--daemons", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prompt lengths in tokens")
    p.add_argument("--chunk", type=int, default=128, help="prefill_chunk: tokens per chunk (default 128)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--daemon-threads", type=int, default=1)
    p.add_argument("--local-threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--json", type=Path, help="also write the full record here")
    args = p.parse_args(argv)
    if args.chunk < 1 or args.repeats < 1 or min(args.lengths) <= args.chunk:
        p.error("--chunk must be at least 1 and below every --lengths, --repeats at least 1")
    torch.set_num_threads(args.local_threads)
    shape = SHAPES[args.model_size]
    path = ensure_model(shape, args.cache_dir)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    max_length = max(args.lengths) + 1
    daemon_args = ["--num-threads", str(args.daemon_threads), "--log-level", "info", "--max-length", str(max_length)]
    results: dict[int, dict[str, Any]] = {}
    load = [os.getloadavg()[0]]
    with LocalSwarm(path, extra_args=daemon_args) as swarm:
        start_daemons(swarm, split_blocks(shape.num_layers, args.daemons))
        with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs) as whole, \
                AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs,
                                                                prefill_chunk=args.chunk) as chunked:
            warm = random_prompt(shape, args.chunk * 2, seed=0)
            for model in (whole, chunked):  # connections, streams, allocators
                _swarm_prefill(model, warm)
            _local_prefill(local, warm)
            for length in args.lengths:
                ids = random_prompt(shape, length, seed=length)
                times: dict[str, list[float]] = {"local": [], "one pass": [], "chunked": []}
                logits: dict[str, torch.Tensor] = {}
                for _ in range(args.repeats):
                    for label, run in (("local", lambda: _local_prefill(local, ids)),
                                       ("one pass", lambda: _swarm_prefill(whole, ids)),
                                       ("chunked", lambda: _swarm_prefill(chunked, ids))):
                        seconds, out = run()
                        times[label].append(seconds)
                        logits.setdefault(label, out)
                results[length] = {
                    "seconds": times,
                    "median_s": {k: median(v) for k, v in times.items()},
                    "chunked_vs_one_pass_max_abs_diff": float((logits["chunked"] - logits["one pass"]).abs().max()),
                    "one_pass_vs_local_max_abs_diff": float((logits["one pass"] - logits["local"]).abs().max()),
                    "max_abs_logit": float(logits["local"].abs().max()),
                    "next_token_equal": bool(torch.equal(logits["chunked"][0, -1].argmax(), logits["local"][0, -1].argmax())),
                }
                load.append(os.getloadavg()[0])
    print(f"pipelined prefill, {args.model_size} over {args.daemons} daemons ({args.daemon_threads} thread(s) each), "
          f"chunks of {args.chunk}; median of {args.repeats}; load average {' -> '.join(f'{x:.1f}' for x in load)}")
    for length, r in results.items():
        m = r["median_s"]
        print(f"  {length:5d} tokens: local {m['local']:.3f} s; one pass {m['one pass']:.3f} s "
              f"({m['one pass'] / m['local']:.3f}x local); chunked {m['chunked']:.3f} s "
              f"({m['chunked'] / m['local']:.3f}x local, {m['chunked'] / m['one pass']:.3f}x one pass); "
              f"logits max abs diff chunked vs one pass {r['chunked_vs_one_pass_max_abs_diff']:.3g}, "
              f"one pass vs local {r['one_pass_vs_local_max_abs_diff']:.3g} (max |logit| {r['max_abs_logit']:.3g}); "
              f"next token {'equal' if r['next_token_equal'] else 'DIFFERS'}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "pipelined_prefill", "args": {**vars(args), "json": str(args.json),
                                         "cache_dir": str(args.cache_dir)},
                                         "machine": machine_info(args.local_threads, args.daemon_threads),
                                         "load_average": load, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
