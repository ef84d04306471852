"""Swarm vs local `transformers` on one machine: decode, prefill, concurrency, memory, start-up.

    python -m benchmarks.swarm_vs_local --model-size 271m --daemons 3 --repeats 3 --json out.json

One run builds (or reuses) a random-weight checkpoint, loads it locally with `transformers`,
starts `--daemons` real `petalsd` processes on 127.0.0.1 that split its blocks evenly, connects
a client, and measures, interleaving local and swarm repeats so that load from other processes
on a shared machine hits both sides alike:

- decode: mean time per generated token after the first (greedy, `--prompt-tokens` prompt,
  `--new-tokens` tokens), median over repeats, swarm / local; plus whether the tokens match;
- prefill: time to the first token of a `--prefill-tokens` prompt, median, swarm / local;
- concurrency: aggregate tokens/s of `--sessions` threads each calling `generate` at once,
  over the tokens/s of one session alone, and how busy the client and the daemons kept the
  cores meanwhile (CPU seconds / (wall x cores): near 1 means compute-bound);
- per daemon: seconds from process start to its `ready` line; VmRSS and VmHWM against the bytes
  of its span's weights plus its KV-cache budget.

Thread settings: the local model and the client use `--local-threads` torch threads, and every
daemon gets `--daemon-threads` (passed as `--num-threads`); both default to 1. The local model and
each daemon then compute with the same single core, so the per-token ratio compares equal compute;
concurrent sessions can keep several daemons (and cores) busy at once; and on a 2-core machine
shared by 3 daemons, a client and other users, a multi-threaded OpenMP region stalls whenever one
of its threads is descheduled (measured: 4x slower decode with 2 threads under load; see
BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from petals_client.localswarm import DaemonProcess, LocalSwarm

from .measure import TokenClock, machine_info, median, process_cpu_seconds, process_memory, span_weight_bytes
from .shapes import SHAPES, ModelShape, default_cache_dir, ensure_model, split_blocks

#: The issue's targets for each shape (None: no target for that figure). Stated, not asserted.
TARGETS: dict[str, dict[str, float | None]] = {
    "271m": {"decode_ratio_max": 1.10, "prefill_ratio_max": 1.10, "concurrency_speedup_min": 3.0},
    "6.8m": {"decode_ratio_max": 1.6, "prefill_ratio_max": None, "concurrency_speedup_min": None},
    "tiny": {"decode_ratio_max": None, "prefill_ratio_max": None, "concurrency_speedup_min": None},
}
RSS_SLACK_BYTES = 500 * 2**20  # the allowance over span weights + KV budget


@dataclass
class BenchConfig:
    model_size: str = "271m"
    daemons: int = 3
    repeats: int = 3
    new_tokens: int = 64
    prompt_tokens: int = 16
    prefill_tokens: int = 512
    sessions: int = 8
    local_threads: int = 1
    daemon_threads: int = 1
    cache_budget: int = 2**30
    cache_dir: Path = field(default_factory=default_cache_dir)
    echo_daemons: bool = False
    batching: bool = False  # daemons (petalsd --batching) and the client's head merge concurrent sessions' steps

    def validate(self) -> None:
        if self.model_size not in SHAPES:
            raise ValueError(f"--model-size must be one of {', '.join(SHAPES)}")
        if self.repeats < 1 or self.sessions < 1 or self.prompt_tokens < 1 or self.prefill_tokens < 1:
            raise ValueError("--repeats, --sessions, --prompt-tokens and --prefill-tokens must be positive")
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be at least 2 (the first token is the prefill)")


def random_prompt(shape: ModelShape, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, shape.vocab_size, (1, length), generator=generator)


def greedy_options(new_tokens: int) -> dict[str, Any]:
    # min_new_tokens masks EOS on both sides, so a random model always produces exactly this many.
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def _timed_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[TokenClock, torch.Tensor]:
    clock = TokenClock()
    out = model.generate(ids, streamer=clock, **greedy_options(new_tokens))
    return clock, out


def start_daemons(swarm: LocalSwarm, spans: list[tuple[int, int]]) -> list[float]:
    """Start daemons one after another (each alone on the CPU) and return each start-to-ready time."""
    ready: list[float] = []
    first: DaemonProcess | None = None
    for start, end in spans:
        began = time.monotonic()
        daemon = swarm.start(f"{start}:{end}", initial_peers=first.addrs if first else [], wait=True)
        ready.append(time.monotonic() - began)
        first = first or daemon
    return ready


def _concurrent_tokens_per_s(model: Any, prompts: list[torch.Tensor], new_tokens: int) -> float:
    """Aggregate tokens/s of one thread per prompt, all calling `generate` at the same time."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts) + 1)

    def run(ids: torch.Tensor) -> None:
        barrier.wait()
        try:
            model.generate(ids, **greedy_options(new_tokens))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,), name=f"bench-session-{i}") for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} concurrent sessions failed") from errors[0]
    return len(prompts) * new_tokens / elapsed


def _ratio(swarm: float, local: float) -> float:
    return swarm / local if local > 0 else float("nan")


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Run every measurement once (with `config.repeats` repeats each) and return the JSON record."""
    from transformers import AutoModelForCausalLM

    from petals_client import AutoDistributedModelForCausalLM

    config.validate()
    if config.local_threads:  # 0: the process's defaults (benchmarks/thread_defaults.py)
        torch.set_num_threads(config.local_threads)
    shape = SHAPES[config.model_size]
    began = time.monotonic()
    path = ensure_model(shape, config.cache_dir)
    build_s = time.monotonic() - began
    spans = split_blocks(shape.num_layers, config.daemons)
    machine = machine_info(torch.get_num_threads(), config.daemon_threads)

    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    threads = ["--num-threads", str(config.daemon_threads)] if config.daemon_threads else []
    daemon_args = threads + ["--log-level", "info", "--cache-budget", str(config.cache_budget)] + (
        ["--batching"] if config.batching else [])
    with LocalSwarm(path, extra_args=daemon_args, echo=config.echo_daemons) as swarm:
        ready_s = start_daemons(swarm, spans)
        began = time.monotonic()
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs,
                                                                batching=config.batching)
        connect_s = time.monotonic() - began
        try:
            prompt = random_prompt(shape, config.prompt_tokens, seed=1)
            long_prompt = random_prompt(shape, config.prefill_tokens, seed=2)
            for model in (local, remote):  # warm-up: allocators, connections, streams
                _timed_generate(model, prompt, 2)

            decode: dict[str, list[float]] = {"local": [], "swarm": []}
            prefill: dict[str, list[float]] = {"local": [], "swarm": []}
            outputs: dict[str, torch.Tensor] = {}
            for _ in range(config.repeats):
                for side, model in (("local", local), ("swarm", remote)):
                    clock, out = _timed_generate(model, prompt, config.new_tokens)
                    decode[side].append(clock.per_token_s)
                    outputs.setdefault(side, out)
                    clock, _ = _timed_generate(model, long_prompt, 2)
                    prefill[side].append(clock.first_token_s)

            single: list[float] = []
            aggregate: list[float] = []
            busy: list[float] = []  # CPU used by the client and the daemons / (wall x cores)
            prompts = [random_prompt(shape, config.prompt_tokens, seed=100 + i) for i in range(config.sessions)]
            pids = [os.getpid(), *(d.pid for d in swarm.daemons)]
            for _ in range(config.repeats):
                began = time.perf_counter()
                remote.generate(prompt, **greedy_options(config.new_tokens))
                single.append(config.new_tokens / (time.perf_counter() - began))
                cpu_before, began = sum(map(process_cpu_seconds, pids)), time.perf_counter()
                aggregate.append(_concurrent_tokens_per_s(remote, prompts, config.new_tokens))
                wall = time.perf_counter() - began
                busy.append((sum(map(process_cpu_seconds, pids)) - cpu_before) / (wall * (os.cpu_count() or 1)))

            daemons = [_daemon_record(d, path, span, ready, config.cache_budget)
                       for d, span, ready in zip(swarm.daemons, spans, ready_s)]
        finally:
            remote.close()

    targets = TARGETS[config.model_size]
    decode_ratio = _ratio(median(decode["swarm"]), median(decode["local"]))
    prefill_ratio = _ratio(median(prefill["swarm"]), median(prefill["local"]))
    speedup = _ratio(median(aggregate), median(single))
    return {
        "benchmark": "swarm_vs_local",
        "schema": 1,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, "-m", "benchmarks.swarm_vs_local", *sys.argv[1:]],
        "config": {**asdict(config), "cache_dir": str(config.cache_dir), "spans": [f"{a}:{b}" for a, b in spans]},
        "machine": {**machine, "load_average_1m_end": os.getloadavg()[0]},
        "model": {**asdict(shape), "params": shape.num_params, "path": str(path), "build_or_reuse_s": build_s},
        "decode": {
            "local_s_per_token": decode["local"], "swarm_s_per_token": decode["swarm"],
            "local_median_s": median(decode["local"]), "swarm_median_s": median(decode["swarm"]),
            "ratio": decode_ratio, "tokens_match": bool(torch.equal(outputs["local"], outputs["swarm"])),
        },
        "prefill": {
            "tokens": config.prefill_tokens, "local_s": prefill["local"], "swarm_s": prefill["swarm"],
            "local_median_s": median(prefill["local"]), "swarm_median_s": median(prefill["swarm"]),
            "ratio": prefill_ratio,
        },
        "concurrency": {
            "sessions": config.sessions, "single_tokens_per_s": single, "aggregate_tokens_per_s": aggregate,
            "single_median": median(single), "aggregate_median": median(aggregate), "speedup": speedup,
            "cpu_busy_fraction": busy, "cpu_busy_median": median(busy),
        },
        "client_connect_s": connect_s,
        "daemons": daemons,
        "targets": {
            **targets,
            "decode_met": _meets(decode_ratio, targets["decode_ratio_max"], upper=True),
            "prefill_met": _meets(prefill_ratio, targets["prefill_ratio_max"], upper=True),
            "concurrency_met": _meets(speedup, targets["concurrency_speedup_min"], upper=False),
            "rss_met": all(d["rss_within_target"] for d in daemons),
        },
    }


def _meets(value: float, bound: float | None, *, upper: bool) -> bool | None:
    if bound is None:
        return None
    return value <= bound if upper else value >= bound


def _daemon_record(daemon: DaemonProcess, path: Path, span: tuple[int, int], ready_s: float,
                   cache_budget: int) -> dict[str, Any]:
    memory = process_memory(daemon.pid)
    weights = span_weight_bytes(path, *span)
    limit = weights + cache_budget + RSS_SLACK_BYTES
    return {
        "name": daemon.name, "pid": daemon.pid, "blocks": f"{span[0]}:{span[1]}", "ready_s": ready_s,
        "rss_bytes": memory.rss_bytes, "peak_rss_bytes": memory.peak_rss_bytes,
        "span_weight_bytes": weights, "cache_budget_bytes": cache_budget,
        "rss_over_weights_bytes": memory.peak_rss_bytes - weights,
        "rss_limit_bytes": limit, "rss_within_target": memory.peak_rss_bytes <= limit,
    }


def format_report(result: dict[str, Any]) -> str:
    """The human-readable summary printed after a run."""
    mib = 2**20
    m, d, p, c = result["machine"], result["decode"], result["prefill"], result["concurrency"]
    t = result["targets"]

    def target(met: bool | None, text: str) -> str:
        return "" if met is None else f"  (target {text}: {'met' if met else 'NOT met'})"

    lines = [
        f"model {result['model']['name']} ({result['model']['params'] / 1e6:.1f}M params), "
        f"{result['config']['daemons']} daemons {' '.join(result['config']['spans'])}, "
        f"repeats {result['config']['repeats']}",
        f"machine: {m['cpu_model']}, {m['cores']} cores, torch threads local/client {m['torch_threads_local_and_client']}"
        f", per daemon {m['torch_threads_per_daemon']}; load {m['load_average_1m']:.2f} -> {m['load_average_1m_end']:.2f}",
        f"decode:  local {d['local_median_s'] * 1e3:.1f} ms/token, swarm {d['swarm_median_s'] * 1e3:.1f} ms/token, "
        f"ratio {d['ratio']:.3f}x, tokens match: {d['tokens_match']}"
        + target(t["decode_met"], f"<= {t['decode_ratio_max']}x"),
        f"prefill: {p['tokens']} tokens local {p['local_median_s'] * 1e3:.0f} ms, swarm {p['swarm_median_s'] * 1e3:.0f} ms,"
        f" ratio {p['ratio']:.3f}x" + target(t["prefill_met"], f"<= {t['prefill_ratio_max']}x"),
        f"concurrency: 1 session {c['single_median']:.1f} tok/s, {c['sessions']} sessions {c['aggregate_median']:.1f} tok/s"
        f" aggregate, {c['speedup']:.2f}x (client and daemons busy {c['cpu_busy_median']:.0%} of the cores)"
        + target(t["concurrency_met"], f">= {t['concurrency_speedup_min']}x"),
        f"client connect {result['client_connect_s']:.2f} s",
    ]
    for dm in result["daemons"]:
        lines.append(
            f"daemon {dm['name']} blocks {dm['blocks']}: ready in {dm['ready_s']:.2f} s, RSS {dm['rss_bytes'] / mib:.0f} MiB"
            f" (peak {dm['peak_rss_bytes'] / mib:.0f}), weights {dm['span_weight_bytes'] / mib:.0f} MiB,"
            f" peak - weights {dm['rss_over_weights_bytes'] / mib:.0f} MiB"
            f" (limit weights + budget {dm['cache_budget_bytes'] / mib:.0f} + 500 MiB: "
            f"{'met' if dm['rss_within_target'] else 'NOT met'})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path | None]:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.swarm_vs_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", choices=sorted(SHAPES), default=defaults.model_size)
    parser.add_argument("--daemons", type=int, default=defaults.daemons)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--prefill-tokens", type=int, default=defaults.prefill_tokens)
    parser.add_argument("--sessions", type=int, default=defaults.sessions, help="concurrent sessions")
    parser.add_argument("--local-threads", type=int, default=defaults.local_threads,
                        help="torch threads of the local model and the client (default: 1; 0: torch's default)")
    parser.add_argument("--daemon-threads", type=int, default=defaults.daemon_threads,
                        help="torch threads per daemon, passed as --num-threads (default: 1; 0: no flag, the daemon's default)")
    parser.add_argument("--cache-budget", type=int, default=defaults.cache_budget,
                        help="each daemon's KV-cache budget in bytes (the RSS target includes it)")
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir,
                        help="where built checkpoints are kept between runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the full record here")
    parser.add_argument("--echo-daemons", action="store_true", help="copy daemon logs to stderr")
    parser.add_argument("--batching", action="store_true",
                        help="start daemons with --batching and batch the client's head across sessions "
                             "(from_pretrained(batching=True)): batched decode across sessions")
    args = parser.parse_args(argv)
    config = BenchConfig(
        model_size=args.model_size, daemons=args.daemons, repeats=args.repeats, new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens, prefill_tokens=args.prefill_tokens, sessions=args.sessions,
        local_threads=args.local_threads, daemon_threads=args.daemon_threads, cache_budget=args.cache_budget,
        cache_dir=args.cache_dir, echo_daemons=args.echo_daemons, batching=args.batching,
    )
    config.validate()
    return config, args.json


def main(argv: list[str] | None = None) -> int:
    try:
        config, json_path = parse_args(argv)
    except ValueError as exc:
        print(f"swarm_vs_local: {exc}", file=sys.stderr)
        return 2
    result = run_benchmark(config)
    print(format_report(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
