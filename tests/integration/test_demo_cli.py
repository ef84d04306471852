"""`petals demo` as a user runs it: real text through a local swarm, and no daemon left behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

PID_RE = re.compile(r"pid (\d+)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive for our purpose: read its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def test_demo_prints_the_zen_route_and_latency():
    result = subprocess.run([sys.executable, "-m", "petals_client.cli", "demo", "--max-new-tokens", "120"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Beautiful is better than ugly.\nExplicit is better than implicit." in out
    assert re.search(r"route: 0:2 via d1 -> 2:4 via d2 -> 4:6 via d3", out), out
    assert re.search(r"per-token latency median [\d.]+ ms", out), out
    pids = [int(p) for p in PID_RE.findall(out)]
    assert len(pids) == 3
    assert wait_dead(pids) == []


def test_demo_stops_its_daemons_on_ctrl_c():
    # Ctrl-C as a terminal delivers it, even where this suite runs with SIGINT ignored (a shell's
    # background job inherits that, and Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen([sys.executable, "-m", "petals_client.cli", "demo", "--max-new-tokens", "5000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            pids += [int(p) for p in PID_RE.findall(line)]
            if line.startswith("route:"):
                break
        assert len(pids) == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_dead(pids) == []
