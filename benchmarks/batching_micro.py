"""Per-step time of N concurrent sessions' decode steps: batched forward vs one after another.

    python -m benchmarks.batching_micro                 # 271M shape, 2-block span, 8 sessions
    python -m benchmarks.batching_micro --blocks 1 --sessions 4 --dtype bfloat16 --json

Builds a random checkpoint with the 271M shape's block sizes (hidden 1024, 16 heads, FFN 2816;
only ``--blocks`` layers and a tiny vocabulary, a few tens of MB), opens ``--sessions`` caches at
different positions (``--context`` + i tokens), and times one decode step of every session,
sequentially through ``Span.forward`` and batched through ``batched_decode``. Also prints the max
abs difference between the two (the reason batching is opt-in: see petals_protocol.models.batched).
This is the compute-only bound of what the daemon's batcher can gain; the network is not involved.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from benchmarks.shapes import SHAPES
from petals_protocol.models.batched import DecodeItem, batched_decode
from petals_protocol.models.span import Span, SpanCache, load_span
from petals_protocol.models.synthetic import make_random_checkpoint


def _open_sessions(span: Span, sessions: int, context: int, dtype: torch.dtype) -> list[SpanCache]:
    generator = torch.Generator().manual_seed(0)
    caches = []
    for i in range(sessions):
        cache = span.new_cache(1, context + sessions + 4096)
        span.forward(torch.randn(1, context + i, span.hidden_size, generator=generator).to(dtype), cache)
        caches.append(cache)
    return caches


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def run(blocks: int, sessions: int, context: int, dtype_name: str, repeats: int, threads: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, dtype_name)
    shape = SHAPES["271m"]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_checkpoint(
            Path(tmp), "llama", num_layers=blocks, hidden_size=shape.hidden_size, num_heads=shape.num_heads,
            intermediate_size=shape.intermediate_size, vocab_size=128,
        )
        span = load_span(path, 0, blocks, dtype=dtype)
    single_caches = _open_sessions(span, sessions, context, dtype)
    batched_caches = _open_sessions(span, sessions, context, dtype)
    generator = torch.Generator().manual_seed(1)
    hiddens = [torch.randn(1, 1, span.hidden_size, generator=generator).to(dtype) for _ in range(sessions)]

    with torch.inference_mode():
        expected = [span.forward(h, c) for h, c in zip(hiddens, single_caches, strict=True)]
        outputs = batched_decode(span, [DecodeItem(h, c) for h, c in zip(hiddens, batched_caches, strict=True)])
        max_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs, expected, strict=True))

        def sequential() -> None:
            for h, c in zip(hiddens, single_caches, strict=True):
                span.forward(h, c)

        def batched() -> None:
            batched_decode(span, [DecodeItem(h, c) for h, c in zip(hiddens, batched_caches, strict=True)])

        sequential()
        batched()  # warm-up
        seq_s = _median_time(sequential, repeats)
        bat_s = _median_time(batched, repeats)
        one_s = _median_time(lambda: span.forward(hiddens[0], single_caches[0]), repeats)
    return {
        "shape": "271m", "blocks": blocks, "sessions": sessions, "context": context, "dtype": dtype_name,
        "threads": threads, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "one_session_step_ms": one_s * 1e3, "sequential_step_ms": seq_s * 1e3, "batched_step_ms": bat_s * 1e3,
        "speedup": seq_s / bat_s, "max_abs_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="blocks in the span (271M shape)")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--context", type=int, default=32, help="tokens already cached by session 0 (i adds i)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the daemon default is 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    result = run(args.blocks, args.sessions, args.context, args.dtype, args.repeats, args.threads)
    if args.json:
        print(json.dumps(result))
        return
    print(f"271M shape, {args.blocks} block(s), {args.sessions} sessions, {args.dtype}, {args.threads} thread(s)")
    print(f"  one session's step:               {result['one_session_step_ms']:.2f} ms")
    print(f"  {args.sessions} sessions one after another:  {result['sequential_step_ms']:.2f} ms")
    print(f"  {args.sessions} sessions batched:            {result['batched_step_ms']:.2f} ms "
          f"({result['speedup']:.2f}x faster)")
    print(f"  max abs diff batched vs per-session: {result['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
