"""The WAN benchmark's client (benchmarks/wan_client.py) end to end on loopback, no lab.

benchmarks/wan.py needs root and network namespaces and takes minutes, so nothing ran its client
when the client library changed under it (it once read a field that a refactor had removed). Here
it runs against two real daemons on 127.0.0.1 with a tiny model: every phase it measures on the
WAN (decode with the split of a token's time, prefill exact and fp16, a fresh session) produces
sane figures, and the splits of a decode token and of a prefill add up.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.shapes import SHAPES, ensure_model, split_blocks
from benchmarks.swarm_vs_local import random_prompt
from petals_client.localswarm import LocalSwarm

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_wan_client_measures_every_phase_and_splits_a_token(tmp_path: Path) -> None:
    shape = SHAPES["tiny"]
    model = ensure_model(shape, tmp_path / "cache")
    swarm = LocalSwarm(model, workdir=tmp_path / "swarm", extra_args=["--num-threads", "1"])
    try:
        daemons = {}
        for start, end in split_blocks(shape.num_layers, 2):
            daemon = swarm.start(f"{start}:{end}")
            daemons[daemon.name] = daemon
        controls = {name: str(swarm.workdir / f"{name}.sock") for name in daemons}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.wan_client", "--model", str(model), "--peer", swarm.addrs[0],
             "--prompt", json.dumps(random_prompt(shape, 6, seed=1)[0].tolist()),
             "--long-prompt", json.dumps(random_prompt(shape, 40, seed=2)[0].tolist()),
             "--new-tokens", "6", "--repeats", "1", "--sessions", "0", "--controls", json.dumps(controls)],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    finally:
        swarm.stop()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))

    assert len(result["tokens"]) == 6 + 6 and len(result["decode_s"]) == 1
    assert all(t > 0 for key in ("decode_s", "prefill_s", "prefill_fp16_s", "ttft_s") for t in result[key])
    assert result["prefill_window_waits"] == [0]
    assert [hop["blocks"] for hop in result["routes"][0]] == [[0, 2], [2, 4]]

    (split,) = result["split"]
    assert set(split["daemons"]) == set(daemons)
    for d in split["daemons"].values():
        assert d["steps"] == 5  # six new tokens: the prompt's step, then five decode steps
        assert d["to_output"] > 0 and d["sent_on"] > 0 and d["answered"] >= 0
    # The parts add up to the token: the client's own work + the time inside the steps, which is the
    # daemons' part + the network's.
    on_path = sum(d["to_output"] + d["sent_on"] for d in split["daemons"].values())
    assert math.isclose(split["client_s"] + split["in_step_s"], split["per_token_s"], rel_tol=1e-9)
    assert math.isclose(on_path + split["network_s"], split["in_step_s"], rel_tol=1e-9)
    assert 0 < on_path < split["in_step_s"] and split["client_s"] > 0
    # Each decode step's call into the session, on the clock every lab host shares (packet_split.py
    # matches them to the emulator's packets): five, in order, and their lengths are the in-step times.
    windows = split["windows"]
    assert len(windows) == 5 and all(a < b <= c for (a, b), (c, _) in zip(windows, windows[1:]))
    assert math.isclose(sum(b - a for a, b in windows) / 5, split["in_step_s"], rel_tol=0.05, abs_tol=2e-4)

    for key in ("prefill_split", "prefill_fp16_split"):  # the prompt's step alone, split the same way
        (prefill,) = result[key]
        assert set(prefill["daemons"]) == set(daemons)
        assert all(d["steps"] == 1 and d["to_output"] > 0 and d["sent_on"] > 0 for d in prefill["daemons"].values())
        assert math.isclose(prefill["client_s"] + prefill["in_step_s"], prefill["per_token_s"], rel_tol=1e-9)
        assert 0 < prefill["network_s"] < prefill["in_step_s"]
