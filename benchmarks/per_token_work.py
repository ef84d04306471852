"""Per decode token, the work each party does: thread crossings, tensor<->bytes conversions,
msgpack encodes and decodes, SHA-256 passes, signatures (issue 18, "serialize once").

    python -m benchmarks.per_token_work --model-size 6.8m --daemons 3 --new-tokens 32

Starts `--daemons` real daemons on 127.0.0.1 (blocks split evenly, push forwarding on, as by
default), each counted by benchmarks/work_counters.py, and a counted client in this process.
Counts are exact, not sampled: each counted function is wrapped and every call adds one. A
decode token's share is the difference between a greedy `generate` of 1 + N new tokens and one
of 1 new token (same prompt, each in its own session), divided by N: session set-up, prefill
and close cancel out. Background traffic (info probes, DHT) uses other messages and is shown
apart from the steps'.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import process_cpu_seconds
from benchmarks.work_counters import COUNTS_DIR_ENV, WorkCounters, count_client_calls, install

#: Rows of the report: (label, counter keys summed). Per decode token, per party.
ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("thread crossings", ("crossings.compute_job", "crossings.lane", "crossings.to_thread", "crossings.from_thread")),
    ("tensor->bytes (loop)", ("tensor_to_bytes.loop",)),
    ("tensor->bytes (other thread)", ("tensor_to_bytes.thread",)),
    ("bytes->tensor (loop)", ("bytes_to_tensor.loop",)),
    ("bytes->tensor (other thread)", ("bytes_to_tensor.thread",)),
    ("msgpack encodes (step, result)", ("encode.step", "encode.result")),
    ("msgpack decodes (step, result)", ("decode.step", "decode.result")),
    ("tensor data packed into msgpack", ("tensor_packs",)),
    ("SHA-256 over tensor data", ("sha256.tensor",)),
    ("SHA-256 over digests (bindings)", ("sha256.binding",)),
    ("Ed25519 sign", ("ed25519.sign",)),
    ("Ed25519 verify", ("ed25519.verify",)),
    ("bytes encoded (step, result)", ("encode_bytes.step", "encode_bytes.result")),
    ("other messages encoded + decoded", ()),  # filled in by `_other_messages`
    ("process CPU, ms", ()),  # filled in from `cpu_us` (user + system, from /proc; noisy, unlike the counts)
]


def _other_messages(counts: dict[str, float]) -> float:
    return sum(v for k, v in counts.items()
               if k.split(".")[0] in ("encode", "decode") and k.split(".")[1] not in ("step", "result"))


def per_token(before: dict[str, int], short: dict[str, int], long: dict[str, int], tokens: int) -> dict[str, float]:
    """(long run - short run) / tokens, each run measured as the change from `before`."""
    keys = set(before) | set(short) | set(long)
    first = {k: short.get(k, 0) - before.get(k, 0) for k in keys}
    second = {k: long.get(k, 0) - short.get(k, 0) for k in keys}
    return {k: (second[k] - first[k]) / tokens for k in keys if second[k] != first[k]}


def rows_of(counts: dict[str, float]) -> dict[str, float]:
    out = {label: sum(counts.get(k, 0.0) for k in keys) for label, keys in ROWS if keys}
    out["other messages encoded + decoded"] = _other_messages(counts)
    out["process CPU, ms"] = counts.get("cpu_us", 0.0) / 1000
    return out


class Parties:
    """The client's counters (this process) and the daemons' (asked for over SIGUSR1)."""

    def __init__(self, client: WorkCounters, daemons: list[Any], folder: Path) -> None:
        self.client, self.daemons, self.folder = client, daemons, folder

    def snapshot(self, settle_s: float) -> list[dict[str, int]]:
        time.sleep(settle_s)  # let the daemons finish what the last reply started (a session's close)
        paths = [self.folder / f"{d.pid}.json" for d in self.daemons]
        for path in paths:
            path.unlink(missing_ok=True)
        for daemon in self.daemons:
            os.kill(daemon.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                raise RuntimeError("a daemon did not write its counters within 30 s")
            time.sleep(0.05)
        counts = [self.client.snapshot(), *(json.loads(p.read_text()) for p in paths)]
        for pid, party in zip([os.getpid(), *(d.pid for d in self.daemons)], counts):
            party["cpu_us"] = round(process_cpu_seconds(pid) * 1e6)
        return counts


def format_table(names: list[str], results: list[dict[str, float]]) -> str:
    width = max(len(label) for label, _ in ROWS)
    lines = [f"{'per decode token':<{width}}  " + "  ".join(f"{n:>8}" for n in names)]
    for label, _ in ROWS:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{r.get(label, 0.0):>8.2f}" for r in results))
    return "\n".join(lines)


def encode_costs(sizes: tuple[int, ...] = (1024, 4096, 2 << 20)) -> list[str]:
    """What a pushing daemon spends encoding one output into its two messages (the push and the
    answer), packed once and joined in (`encode_message`) against the whole map packed per message
    (how it was encoded before). A fresh output each time, as the compute thread makes one per
    step; median and 10th percentile, the two ways alternating."""
    import msgpack

    from petals_protocol.messages import InferenceStep, PushTarget, StepResult, _fields_to_wire, encode_message
    from petals_protocol.tensors import TensorPayload

    def whole_map(msg: Any) -> bytes:
        return msgpack.packb({"t": msg.TAG, **_fields_to_wire(msg)}, use_bin_type=True)

    sid = os.urandom(16)
    target = PushTarget(peer_id=b"\x00\x24" + b"p" * 36, addr="/ip4/127.0.0.1/tcp/1/p2p/" + "1" * 52,
                        session_id=sid, start_block=2, end_block=4, step=3)
    lines = []
    for nbytes in sizes:
        times: dict[str, list[float]] = {"whole map per message": [], "packed once, joined": []}
        for i in range(4000 if nbytes < 1 << 16 else 400):
            way = list(times)[i % 2]
            data = os.urandom(16) + bytes(nbytes - 16)
            began = time.perf_counter()
            output = TensorPayload("float32", (1, 1, nbytes // 4), data)
            if way == "packed once, joined":
                output.packed()  # on the compute thread (petalsd/batching.py)
            encode = whole_map if way == "whole map per message" else encode_message
            encode(InferenceStep(session_id=sid, step=1, position=3, hidden=output, hypo_ids=None, push=(target,)))
            encode(StepResult(session_id=sid, step=1, position=3, hidden=output, signature=b"s" * 64))
            times[way].append(time.perf_counter() - began)
        for way, values in times.items():
            values.sort()
            lines.append(f"{nbytes:>8} B output, {way:<22}: median {values[len(values) // 2] * 1e6:7.1f} us, "
                         f"p10 {values[len(values) // 10] * 1e6:7.1f} us")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="6.8m", choices=("271m", "6.8m", "tiny"))
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32, help="N: decode tokens measured")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before each snapshot")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the per-token counts here")
    parser.add_argument("--echo-daemons", action="store_true")
    parser.add_argument("--encode-costs", action="store_true",
                        help="only time encoding one output into a push and an answer, in this process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.encode_costs:
        print("\n".join(encode_costs()))
        return 0
    counters = install()  # before anything imports the counted functions
    import torch

    from benchmarks.shapes import SHAPES, default_cache_dir, ensure_model, split_blocks
    from benchmarks.swarm_vs_local import greedy_options, random_prompt
    from petals_client import AutoDistributedModelForCausalLM
    from petals_client.localswarm import LocalSwarm

    count_client_calls(counters)
    torch.set_num_threads(1)
    shape = SHAPES[args.model_size]
    path = ensure_model(shape, args.cache_dir or default_cache_dir())
    spans = split_blocks(shape.num_layers, args.daemons)
    with tempfile.TemporaryDirectory(prefix="petals-work-") as folder:
        launcher = ["-m", "benchmarks.work_counters"]
        env = {COUNTS_DIR_ENV: folder, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(),
                                                                                  os.environ.get("PYTHONPATH")]))}
        with LocalSwarm(path, extra_args=["--num-threads", "1", "--log-level", "info"],
                        echo=args.echo_daemons) as swarm:
            first = None
            for start, end in spans:
                daemon = swarm.start(f"{start}:{end}", initial_peers=first.addrs if first else [], launcher=launcher,
                                     env=env)
                first = first or daemon
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs)
            try:
                prompt = random_prompt(shape, args.prompt_tokens, seed=1)
                model.generate(prompt, **greedy_options(2))  # warm-up: connections, streams, push links
                parties = Parties(counters, swarm.daemons, Path(folder))
                before = parties.snapshot(args.settle)
                model.generate(prompt, **greedy_options(1))
                short = parties.snapshot(args.settle)
                model.generate(prompt, **greedy_options(1 + args.new_tokens))
                long = parties.snapshot(args.settle)
            finally:
                model.close()
    names = ["client", *(f"d{i + 1} {s}:{e}" for i, (s, e) in enumerate(spans))]
    results = [rows_of(per_token(b, s, l, args.new_tokens)) for b, s, l in zip(before, short, long)]
    load = os.getloadavg()
    print(f"{args.model_size}, {args.daemons} daemons (push on), {args.new_tokens} decode tokens; "
          f"load average {load[0]:.1f}")
    print(format_table(names, results))
    if args.json:
        args.json.write_text(json.dumps({"parties": dict(zip(names, results)), "model_size": args.model_size,
                                         "new_tokens": args.new_tokens, "load_average": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
