"""Contributors first, with real daemons: two clients on a loaded daemon, one of which also serves
the swarm (a daemon's record names its peer id, --own-clients). The daemon recognises it from the
signed record, shows it in /v1/status, and gives its steps the turn ahead of the consumers' (the
turns counted by the daemon are the assertion; the latencies are printed, for BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from petals_client import ctl
from petals_client.localswarm import LocalSwarm
from petals_protocol.p2p.identity import load_or_create_identity, peer_id

from swarmlib import DAEMON_ARGS, make_model

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).with_name("steady_client.py")
CONSUMERS = 3


def _status(sock: Path) -> dict:
    return json.loads(ctl.request(str(sock), "GET", "/v1/status")[2])


def _spawn(model: Path, addr: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CLIENT), str(model), addr, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=CLIENT.parent)


def _ready(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", f"client exited {proc.poll()}"
    return proc


def _client(model: Path, addr: str, *args: str) -> subprocess.Popen[str]:
    return _ready(_spawn(model, addr, *args))


def _latency(proc: subprocess.Popen[str]) -> dict:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert proc.wait(120) == 0, line
    return json.loads(line)


def test_a_client_that_also_serves_is_served_first_under_load(tmp_path: Path) -> None:
    # Big enough that a step is mostly compute (the queue builds), small enough for a shared CPU.
    model = make_model(tmp_path, "llama", hidden_size=384, num_heads=6, intermediate_size=1024)
    contributor_key = tmp_path / "contributor.key"
    contributor = peer_id(load_or_create_identity(contributor_key)).to_base58()
    work = tmp_path / "swarm"
    work.mkdir()
    swarm = LocalSwarm(model, workdir=work, extra_args=DAEMON_ARGS, echo=bool(os.environ.get("PETALS_TEST_ECHO")))
    procs: list[subprocess.Popen[str]] = []
    with swarm:
        # The contributor's daemon: it serves the swarm, and its record names the contributor's
        # client. Its announced throughput is tiny so that routes go through `busy`. It starts
        # first, so that `busy` finds its record in its first look at the swarm's records (the
        # next one is a records period later).
        swarm.start("0:6", name="helper", args=["--throughput", "0.01", "--own-clients", contributor])
        busy = swarm.start("0:6", name="busy")
        deadline = time.monotonic() + 60
        while contributor not in _status(work / "busy.sock")["contributors"]["peers"]:
            assert time.monotonic() < deadline, _status(work / "busy.sock")["contributors"]
            time.sleep(0.5)
        try:
            idle = {"contributor": _latency(_client(model, busy.addrs[0], "--identity", str(contributor_key))),
                    "consumer": _latency(_client(model, busy.addrs[0]))}
            procs += [_spawn(model, busy.addrs[0], "--loop") for _ in range(CONSUMERS)]
            for proc in procs:
                _ready(proc)
            deadline = time.monotonic() + 60
            while _status(work / "busy.sock")["sessions"] < CONSUMERS:  # the consumers' sessions are stepping
                assert time.monotonic() < deadline, _status(work / "busy.sock")["sessions"]
                time.sleep(0.1)
            before = _status(work / "busy.sock")["contributors"]["served_first"]
            pair = [_client(model, busy.addrs[0], "--identity", str(contributor_key)),
                    _client(model, busy.addrs[0])]
            loaded = {"contributor": _latency(pair[0]), "consumer": _latency(pair[1])}
            status = _status(work / "busy.sock")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    served_first = status["contributors"]["served_first"] - before
    print(f"\ncontributors first: {CONSUMERS} looping consumers on one daemon (hidden 384, 6 blocks, 1 thread)")
    for phase, results in (("idle", idle), ("loaded", loaded)):
        for who, r in results.items():
            print(f"  {phase:6s} {who:11s} median {1000 * r['median_s']:6.1f} ms/token, "
                  f"mean {1000 * r['mean_s']:6.1f} ms/token over {r['tokens']} tokens")
    print(f"  turns given to the contributor ahead of waiting consumers: {served_first}")
    # Every step of the contributor found consumers queued and went first (its 32 steps and the
    # session open), or nearly every: the daemon counted it, not a timer.
    assert served_first >= 16, status["contributors"]
