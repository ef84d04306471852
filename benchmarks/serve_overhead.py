"""What `petals serve` adds on top of the client library: the same greedy completion, timed both ways.

    python -m benchmarks.serve_overhead [--daemons 2] [--tokens 64] [--repeats 5]

On the shipped demo model, over daemons on loopback: `model.generate` in this process, and a
streamed `/v1/completions` request to a `petals serve` process on the same swarm (raw HTTP, so
that no client library's parsing is timed). Runs alternate, medians are reported; both sides
produce the same tokens (greedy), which the run checks.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import httpx
import torch

from petals_client import AutoDistributedModelForCausalLM
from petals_client.demo.run import DEFAULT_MODEL
from petals_client.localswarm import LocalSwarm
from petals_client.tokenizer import load_tokenizer
from petals_protocol.models.checkpoint import Checkpoint

PROMPT = "It was the best of times"


def _served(url: str, tokens: int) -> tuple[float, float, str]:
    """(seconds to the first text chunk, seconds in all, text) of one streamed completion."""
    body = {"model": DEFAULT_MODEL.name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    begin = time.perf_counter()
    first, text = None, []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter() - begin
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return first or 0.0, time.perf_counter() - begin, "".join(text)


def _direct(model: AutoDistributedModelForCausalLM, ids: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    begin = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens)
    return time.perf_counter() - begin, out[0, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--daemons", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    blocks = int(Checkpoint(DEFAULT_MODEL).config.num_hidden_layers)
    cuts = [round(i * blocks / args.daemons) for i in range(args.daemons + 1)]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with LocalSwarm(DEFAULT_MODEL, extra_args=["--num-threads", "1"]) as swarm:
        for a, b in zip(cuts, cuts[1:]):
            swarm.start(f"{a}:{b}")
        server = subprocess.Popen([sys.executable, "-m", "petals_client.cli", "serve", "--model", str(DEFAULT_MODEL),
                                   "--initial-peers", swarm.addrs[0], "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout is not None
            url = server.stdout.readline().split("ready at ", 1)[1].split("/v1", 1)[0]
            with AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.addrs[:1]) as model:
                _direct(model, ids, 4)  # warm-up: connections, first-call costs
                _served(url, 4)
                direct, served, first = [], [], []
                for _ in range(args.repeats):
                    seconds, new = _direct(model, ids, args.tokens)
                    direct.append(len(new) / seconds)
                    ttft, seconds, text = _served(url, args.tokens)
                    assert text == tokenizer.decode(new), "served text differs from model.generate"
                    served.append(len(new) / seconds)
                    first.append(ttft)
        finally:
            server.terminate()
            server.wait(30)
    d, s = statistics.median(direct), statistics.median(served)
    print(f"{args.tokens} tokens, {args.daemons} daemons, median of {args.repeats}: model.generate {d:.1f} tok/s, "
          f"petals serve (streamed) {s:.1f} tok/s ({s / d:.3f}x), first chunk {statistics.median(first) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
