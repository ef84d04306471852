"""Benchmark petals_protocol.p2p: connect, open_stream and FramedStream round trips, 2 processes.

    .venv/bin/python scripts/bench_p2p.py [--iterations 300]

Starts a server process (this script with --serve) on 127.0.0.1, then from this process measures:
connect, open_stream (new stream on the open connection), a 100-byte frame echo, and an
inference-shaped exchange (InferenceStep with a [1, 1, 1024] float32 hidden state -> StepResult
with the same tensor and a signature-sized field: both sides encode and decode real messages).
Prints median / p90 / p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream

from petals_protocol.messages import InferenceStep, StepResult
from petals_protocol.p2p.host import connect, listen_multiaddrs, make_host, quiet_libp2p_logs, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.streams import open_framed, open_stream
from petals_protocol.tensors import TensorPayload

RAW_ECHO = "/petals-bench/raw/1"
STEP = "/petals-bench/step/1"
WARMUP = 20


async def _serve_raw(stream: INetStream) -> None:
    async with open_framed(stream) as framed:
        async for payload in framed.frames():
            await framed.send_frame(payload)


async def _serve_step(stream: INetStream) -> None:
    signature = bytes(64)
    async with open_framed(stream) as framed:
        async for step in framed:
            assert isinstance(step, InferenceStep)
            await framed.send(StepResult(step.session_id, step.step, step.position, step.hidden, signature))


async def serve() -> None:
    host = make_host(ephemeral_identity())
    host.set_stream_handler(RAW_ECHO, _serve_raw)
    host.set_stream_handler(STEP, _serve_step)
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
        print("ready", listen_multiaddrs(host)[0], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


def _summary(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p90, p99 = ms[int(0.9 * (len(ms) - 1))], ms[int(0.99 * (len(ms) - 1))]
    return f"{name:<42} median {statistics.median(ms):7.2f} ms   p90 {p90:7.2f}   p99 {p99:7.2f}   (n={len(ms)})"


async def _timed(name: str, iterations: int, once: Callable[[], Awaitable[None]]) -> None:
    """Print wall-clock round trips, and this process's CPU per round trip (less sensitive to load)."""
    for _ in range(WARMUP):
        await once()
    samples = []
    cpu_started = time.process_time()
    for _ in range(iterations):
        started = time.perf_counter()
        await once()
        samples.append(time.perf_counter() - started)
    cpu_ms = (time.process_time() - cpu_started) * 1000 / iterations
    print(f"{_summary(name, samples)}   client CPU {cpu_ms:.2f} ms/rt")


async def measure(addr: str, iterations: int) -> None:
    connects: list[float] = []
    for _ in range(5):  # a fresh client host each time: a cold connect, as a client sees it
        host = make_host(ephemeral_identity())
        async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
            started = time.perf_counter()
            await connect(host, addr)
            connects.append(time.perf_counter() - started)
    print(_summary("connect (Noise + yamux, cold)", connects))

    host = make_host(ephemeral_identity())
    async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]), trio.open_nursery() as nursery:
        peer = await connect(host, addr)

        opens: list[float] = []
        for _ in range(30):
            started = time.perf_counter()
            framed = await open_stream(host, peer, RAW_ECHO, nursery=nursery)
            opens.append(time.perf_counter() - started)
            await framed.close()
        print(_summary("open_stream on an open connection", opens))

        raw = await open_stream(host, peer, RAW_ECHO, nursery=nursery)
        payload = os.urandom(100)

        async def raw_round_trip() -> None:
            await raw.send_frame(payload)
            await raw.receive_frame()

        await _timed("100 B frame echo", iterations, raw_round_trip)
        await raw.close()

        framed = await open_stream(host, peer, STEP, nursery=nursery)
        session = os.urandom(16)
        hidden = TensorPayload("float32", (1, 1, 1024), os.urandom(4096))
        counter = iter(range(10**9))

        async def step_round_trip() -> None:
            step = next(counter)
            await framed.send(InferenceStep(session, step, step, hidden, None))
            result = await framed.receive()
            assert isinstance(result, StepResult) and result.step == step

        await _timed("InferenceStep [1,1,1024] fp32 -> StepResult", iterations, step_round_trip)
        await framed.close()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    quiet_libp2p_logs()
    if args.serve:
        trio.run(serve)
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("ready "):
            raise SystemExit(f"server failed to start: {line!r}")
        trio.run(measure, line.split()[1], args.iterations)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
