"""Profile one daemon and the client with py-spy while the swarm decodes (see BENCHMARKS.md).

    python -m benchmarks.profile_decode --model-size 6.8m --daemons 2 --new-tokens 400 --out /tmp/prof

Starts the swarm like the benchmark, then runs `py-spy record` (raw collapsed stacks) against
the last daemon and against this process (the client) during one long greedy decode, and prints
the functions with the most samples, inclusive and self, split into our code, py-libp2p, trio,
torch and the rest. py-spy is not a project dependency: `pip install py-spy` into the venv.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from petals_client.localswarm import LocalSwarm

from .shapes import SHAPES, default_cache_dir, ensure_model, split_blocks
from .swarm_vs_local import greedy_options, random_prompt, start_daemons

FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")
# py-spy shortens paths to what follows a sys.path entry, e.g. "client/session.py", "libp2p/...".
GROUPS = (("ours", ("client/", "petalsd/", "protocol/", "benchmarks/")), ("libp2p", ("libp2p/",)),
          ("trio", ("trio/",)), ("torch", ("torch/", "transformers/")))


def group_of(frame: str) -> str:
    match = FRAME_RE.match(frame.strip())
    file = match["file"] if match else frame
    for name, prefixes in GROUPS:
        if file.startswith(prefixes) or any(f"/{p}" in file for p in prefixes):
            return name
    return "other"


def summarize(raw: Path, top: int = 25) -> str:
    """Top functions by inclusive and by self samples from a py-spy raw (collapsed) file."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        seen: set[str] = set()
        for frame in frames:
            key = _short(frame)
            if key not in seen:
                inclusive[key] += count
                seen.add(key)
        leaf = _short(frames[-1])
        self_time[leaf] += count
        groups[group_of(frames[-1])] += count
    if total == 0:
        return f"{raw}: no samples"
    out = [f"{raw.name}: {total} samples; self time by group: "
           + ", ".join(f"{g} {100 * c / total:.1f}%" for g, c in groups.most_common())]
    out.append("  inclusive:")
    out += [f"    {100 * c / total:5.1f}%  {k}" for k, c in inclusive.most_common(top)]
    out.append("  self:")
    out += [f"    {100 * c / total:5.1f}%  {k}" for k, c in self_time.most_common(top)]
    return "\n".join(out)


ROOT = str(Path(__file__).resolve().parent.parent)  # the checkout, to shorten its paths


def _short(frame: str) -> str:
    match = FRAME_RE.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", f"{ROOT}/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['func']} ({file})"


def record(pid: int, out: Path, seconds: float, rate: int, gil: bool = False) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
                             "--format", "raw", "--output", str(out), "--nonblocking", *(["--gil"] if gil else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", choices=sorted(SHAPES), default="6.8m")
    parser.add_argument("--daemons", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long py-spy samples")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads everywhere")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--out", type=Path, default=Path("profile-out"))
    parser.add_argument("--gil", action="store_true",
                        help="only samples of threads holding the GIL: where Python CPU time goes, idle waits left out")
    args = parser.parse_args(argv)

    from petals_client import AutoDistributedModelForCausalLM

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.model_size]
    path = ensure_model(shape, args.cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalSwarm(path, extra_args=["--num-threads", str(args.threads), "--log-level", "info"]) as swarm:
        start_daemons(swarm, split_blocks(shape.num_layers, args.daemons))
        with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs) as model:
            prompt = random_prompt(shape, 16, seed=1)
            model.generate(prompt, **greedy_options(4))  # warm-up
            daemon = swarm.daemons[-1]
            targets = {"daemon": daemon.pid, "client": os.getpid()}
            spies = {name: record(pid, args.out / f"{name}.txt", args.seconds, args.rate, args.gil)
                     for name, pid in targets.items()}
            began = time.perf_counter()
            produced = 0
            while time.perf_counter() - began < args.seconds + 1:
                model.generate(prompt, **greedy_options(args.new_tokens))
                produced += args.new_tokens
            print(f"decoded {produced} tokens in {time.perf_counter() - began:.1f} s while sampling")
            for name, spy in spies.items():
                _, err = spy.communicate(timeout=60)
                if spy.returncode != 0:
                    print(f"py-spy on the {name} failed: {err.decode()[-500:]}", file=sys.stderr)
    for name in targets:
        raw = args.out / f"{name}.txt"
        if raw.exists():
            print(summarize(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
