"""A client in its own process (its CPU and GIL apart from the test's), for load and latency tests.

`python steady_client.py MODEL ADDR [--identity FILE] (--loop | --tokens N)`: joins the swarm
through ADDR, prints "ready", then either generates without end (a consumer keeping a daemon
busy; stops on SIGTERM) or generates N tokens greedily and prints one JSON line with the mean
the median and mean seconds between tokens (the prompt's step is left out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from petals_client import AutoDistributedModelForCausalLM

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("addr")
    parser.add_argument("--identity")
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[args.addr],
                                                         identity=args.identity) as model:
        print("ready", flush=True)
        if args.loop:
            while True:
                model.generate(PROMPT, max_new_tokens=200, do_sample=False)
        stamps = Stamps()
        model.generate(PROMPT, max_new_tokens=args.tokens + 1, do_sample=False, streamer=stamps)
        gaps = [b - a for a, b in zip(stamps.times[2:], stamps.times[3:])]  # after the prompt and its step
        print(json.dumps({"tokens": len(gaps), "median_s": statistics.median(gaps),
                          "mean_s": statistics.fmean(gaps)}), flush=True)


class Stamps:
    """A streamer that notes when each put arrives (the prompt first, then one per token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
