"""`petals demo`: a whole swarm on this machine, end to end, in one command.

Starts daemons on 127.0.0.1 (free ports) each serving a span of the shipped model, joins them as
a client, generates from a prompt while streaming the text, prints the route and the per-token
latency, and stops every daemon it started, also on Ctrl-C.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from ..localswarm import LocalSwarm
from ..model import AutoDistributedModelForCausalLM
from ..tokenizer import Tokenizer, load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent / "model"
DEFAULT_PROMPT = "Beautiful is better"


def split_blocks(num_blocks: int, parts: int) -> list[str]:
    """Contiguous spans as even as possible: 6 blocks in 3 parts -> 0:2, 2:4, 4:6."""
    parts = max(1, min(parts, num_blocks))
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


class _TimedPrinter:
    """A transformers-style streamer: prints text as tokens arrive and times each one."""

    def __init__(self, tokenizer: Tokenizer, out: object = sys.stdout) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.times: list[float] = []
        self._first = True
        self._feed = tokenizer.incremental()

    def put(self, value: torch.Tensor) -> None:
        if self._first:  # the prompt
            self._first = False
            self._last = time.perf_counter()
            return
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        ids = [int(i) for i in value.reshape(-1)[:1]]
        text = self._feed(ids)
        print(text, end="", file=self.out, flush=True)  # type: ignore[arg-type]

    def end(self) -> None:
        print(file=self.out, flush=True)  # type: ignore[arg-type]


def run_demo(model: Path = DEFAULT_MODEL, *, prompt: str = DEFAULT_PROMPT, daemons: int = 3,
             max_new_tokens: int = 1000, echo_logs: bool = False) -> int:
    from petals_protocol.models.checkpoint import Checkpoint

    num_blocks = Checkpoint(model).config.num_hidden_layers
    spans = split_blocks(num_blocks, daemons)
    print(f"petals demo: starting {len(spans)} daemons on 127.0.0.1 serving {model.name} "
          f"({num_blocks} blocks)", flush=True)
    begin = time.perf_counter()
    # One torch thread per daemon: several processes share this machine's cores, and a multi-threaded
    # OpenMP region stalls whenever one of its threads loses its core (BENCHMARKS.md, "Thread setting").
    torch.set_num_threads(1)
    with LocalSwarm(model, echo=echo_logs, extra_args=["--num-threads", "1"]) as swarm:
        first = swarm.start(spans[0], initial_peers=[])  # the bootstrap peer; the rest join it at once
        for blocks in spans[1:]:
            swarm.start(blocks, initial_peers=first.addrs, wait=False)
        swarm.wait_all()
        for d, blocks in zip(swarm.daemons, spans):
            print(f"  daemon {d.name}  blocks {blocks:>7}  pid {d.pid}  {d.addrs[0]}", flush=True)
        print(f"swarm ready in {time.perf_counter() - begin:.1f} s; joining as a client", flush=True)
        tokenizer = load_tokenizer(model)
        with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.addrs) as lm:
            names = {d.peer_id: d.name for d in swarm.daemons}
            route = lm.route()
            for peer, name in names.items():
                route = route.replace(peer[-8:], name)
            print(f"route: {route}\n", flush=True)
            ids = torch.tensor([tokenizer.encode(prompt)])
            printer = _TimedPrinter(tokenizer)
            print(prompt, end="", flush=True)
            out = lm.generate(ids, max_new_tokens=max_new_tokens, streamer=printer)
        generated = out.shape[1] - ids.shape[1]
        if printer.times:
            steps = printer.times[1:] or printer.times
            print(f"\n{generated} tokens; first token (prompt of {ids.shape[1]} tokens) "
                  f"{printer.times[0] * 1000:.1f} ms; per-token latency median "
                  f"{statistics.median(steps) * 1000:.1f} ms, p90 "
                  f"{sorted(steps)[int(0.9 * (len(steps) - 1))] * 1000:.1f} ms "
                  f"through {len(spans)} daemons", flush=True)
        print("stopping the daemons", flush=True)
    return 0
