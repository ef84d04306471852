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


def test_daemons_behind_two_nats_push_over_a_punched_connection(tmp_path) -> None:
    """A chain A (public, relay) -> B (behind one NAT) -> B2 (behind the other): B's push to B2
    first goes through the relay, then B punches a direct connection and the push link uses it.
    The generated tokens stay exactly local transformers'."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    problem = ensure_tools()
    assert problem is None, problem
    import torch
    from transformers import AutoModelForCausalLM

    from petals_client.localswarm import LocalSwarm
    from petals_protocol.models.synthetic import make_random_checkpoint

    model = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=6, hidden_size=64, num_heads=4,
                                   vocab_size=128, seed=11)
    args = ["--num-threads", "1", "--log-level", "info", "--throughput", "100"]
    prompt = [1, 17, 42, 99, 5, 64, 3]
    swarms: list[LocalSwarm] = []
    with nat_lab(f"pd{os.getpid() % 100000}") as lab:
        try:
            pub, home, home2 = (LocalSwarm(model, workdir=tmp_path, python=lab.python(h, tmp_path), extra_args=args,
                                           echo=bool(os.environ.get("PETALS_TEST_ECHO")))
                                for h in ("pub", "home", "home2"))
            swarms += [home2, home, pub]
            a = pub.start("0:2", name="a", args=["--listen", f"/ip4/{PUBLIC_IP}/tcp/0", "--reachability", "public"])
            b = home.start("2:4", name="b", initial_peers=a.addrs, args=["--listen", f"/ip4/{HOME_IPS['home']}/tcp/0"])
            b2 = home2.start("4:6", name="b2", initial_peers=a.addrs,
                             args=["--listen", f"/ip4/{HOME_IPS['home2']}/tcp/0"])
            client = Path(__file__).with_name("nat_client.py")
            done = subprocess.run([*lab.prefix("pub"), sys.executable, str(client), "--model", str(model),
                                   "--peer", a.addrs[0], "--prompt", json.dumps(prompt), "--tokens", "20"],
                                  capture_output=True, text=True, timeout=300)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            assert lines, done.stderr[-6000:]
            result = json.loads(lines[-1].removeprefix("RESULT "))
            assert [h["peer_id"] for h in result["route_before"]] == [a.peer_id, b.peer_id, b2.peer_id]
            local = AutoModelForCausalLM.from_pretrained(model)
            expected = local.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0].tolist()
            assert result["tokens"] == expected
            punched = [line for line in b.log if "hole punched" in line]
            assert punched and ROUTER_IPS["home2"] in punched[0], "\n".join(list(b.log)[-30:])
            assert any("hole punched" in line for line in b2.log)
            # The control API tells the punched connection from the relayed and direct ones.
            ctl = subprocess.run([sys.executable, "-m", "petals_client.cli", "ctl", "--socket", str(tmp_path / "b.sock"),
                                  "--json", "peers"], capture_output=True, text=True, timeout=60)
            paths = {p["peer_id"]: p["path"] for p in json.loads(ctl.stdout)}
            assert paths.get(b2.peer_id) == "punched", (paths, ctl.stderr)
            assert paths.get(a.peer_id) == "direct", paths
            ctl = subprocess.run([sys.executable, "-m", "petals_client.cli", "ctl", "--socket", str(tmp_path / "b.sock"),
                                  "--json", "status"], capture_output=True, text=True, timeout=60)
            nat = json.loads(ctl.stdout)["nat"]
            assert nat["reachability"] == "private" and nat["observed_ip"] == ROUTER_IPS["home"], nat
            assert [r["relay"] for r in nat["relays"]] == [a.peer_id] and nat["punched"] >= 1, nat
        finally:
            for swarm in swarms:
                for d in swarm.daemons:
                    d.signal(9)
                swarm.stop()
    assert not leftover_namespaces(lab)
