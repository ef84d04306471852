"""Hole punching between the lab's two NATed hosts (protocol/p2p/punch.py), in network namespaces.

A relay on the public network; a target behind one NAT, reserved on it; an asker behind the
other NAT reaches the target through the relay, punches a direct TCP connection (simultaneous
open from ports both masquerading routers keep), drops the relayed connection, and still talks
to the target after the relay is killed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from natlab import HOME_IPS, PUBLIC_IP, ROUTER_IPS, ensure_tools, leftover_namespaces, nat_lab

pytestmark = [pytest.mark.system]

PEER = str(Path(__file__).with_name("punch_peer.py"))


def _start(lab, host: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*lab.prefix(host), sys.executable, PEER, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(proc: subprocess.Popen[str]) -> str:
    line = proc.stdout.readline()
    assert line.startswith("ready "), f"peer did not start: {line!r} {proc.stderr.read() if proc.poll() else ''}"
    return line.split()[1]


def test_two_natted_peers_punch_a_direct_connection() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    problem = ensure_tools()
    assert problem is None, problem
    procs: list[subprocess.Popen[str]] = []
    with nat_lab(f"pp{os.getpid() % 100000}") as lab:
        try:
            relay = _start(lab, "pub", "relay", f"/ip4/{PUBLIC_IP}/tcp/0")
            procs.append(relay)
            relay_addr = _ready(relay)
            target = _start(lab, "home2", "target", f"/ip4/{HOME_IPS['home2']}/tcp/0", ROUTER_IPS["home2"], relay_addr)
            procs.append(target)
            circuit = _ready(target)
            asker = _start(lab, "home", "asker", f"/ip4/{HOME_IPS['home']}/tcp/0", ROUTER_IPS["home"], circuit)
            procs.append(asker)
            line = asker.stdout.readline()
            assert line.strip() == "punched", f"{line!r}\n{asker.stderr.read() if asker.poll() is not None else ''}"
            relay.kill()
            relay.wait()
            out, err = asker.communicate("go\n", timeout=60)
            lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
            assert lines, err[-3000:]
            result = json.loads(lines[-1].removeprefix("RESULT "))
            print("\npunch:", result)
            assert result["relayed_echo"] and result["direct_echo"], result
            assert result["punched_remote"][0] == ROUTER_IPS["home2"], result  # the other NAT's public side
            assert result["connections_left"] == 1
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    assert not leftover_namespaces(lab)
