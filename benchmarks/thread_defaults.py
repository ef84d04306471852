"""Thread defaults on a shared machine: swarm_vs_local with torch's old defaults vs ours, no flags.

    .venv/bin/python -m benchmarks.thread_defaults --model-size 6.8m --daemons 3 --rounds 2

Each round runs `benchmarks.swarm_vs_local` twice, one after the other (so load from other users
of the machine hits both alike), and prints each pair's decode and prefill ratios to local and
the speedup of concurrent sessions:

- before: what every process did before the defaults changed: torch's default thread count (one
  per core) in the daemons, the client and the local reference, and OpenMP threads that spin
  before they sleep (`GOMP_SPINCOUNT=300000`, GNU OpenMP's own default, which also keeps
  petalsd from choosing passive waits);
- after: no thread flag and no OpenMP variable anywhere: daemons pick the cores free at start and
  sleep while waiting; the benchmark process imports petals_client before torch, as a client
  program may, so its waits sleep too (its thread count stays torch's default).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")
#: The "after" run imports petals_client first, then runs the benchmark unchanged.
AFTER = "import sys, petals_client; from benchmarks.swarm_vs_local import main; sys.exit(main(sys.argv[1:]))"


def one_run(label: str, common: list[str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    cores = str(os.cpu_count() or 1)
    if label == "before":
        env["GOMP_SPINCOUNT"] = "300000"
        cmd = [sys.executable, "-m", "benchmarks.swarm_vs_local", *common, "--daemon-threads", cores,
               "--local-threads", cores]
    else:
        cmd = [sys.executable, "-c", AFTER, *common, "--daemon-threads", "0", "--local-threads", "0"]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        done = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"thread_defaults: {label} run failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def summary(r: dict[str, Any]) -> dict[str, float]:
    return {"decode_ratio": r["decode"]["ratio"], "prefill_ratio": r["prefill"]["ratio"],
            "concurrency_speedup": r["concurrency"]["speedup"], "local_ms_per_token": r["decode"]["local_median_s"] * 1e3,
            "swarm_ms_per_token": r["decode"]["swarm_median_s"] * 1e3, "load_start": r["machine"]["load_average_1m"],
            "load_end": r["machine"]["load_average_1m_end"], "tokens_match": r["decode"]["tokens_match"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.thread_defaults", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="6.8m")
    p.add_argument("--daemons", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="swarm_vs_local's repeats within each run")
    p.add_argument("--rounds", type=int, default=2, help="before/after pairs")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    common = ["--model-size", args.model_size, "--daemons", str(args.daemons), "--repeats", str(args.repeats)]
    rounds = []
    for i in range(args.rounds):
        pair = {label: summary(one_run(label, common)) for label in ("before", "after")}
        rounds.append(pair)
        for label, s in pair.items():
            print(f"round {i + 1} {label:6}: decode {s['swarm_ms_per_token']:.1f} ms/token vs local "
                  f"{s['local_ms_per_token']:.1f} ({s['decode_ratio']:.2f}x), prefill {s['prefill_ratio']:.2f}x local, "
                  f"8 sessions {s['concurrency_speedup']:.2f}x one; tokens match {s['tokens_match']}; "
                  f"load {s['load_start']:.1f} -> {s['load_end']:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "rounds": rounds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
