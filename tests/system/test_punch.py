"""Hole punching between the lab's two NATed hosts (protocol/p2p/punch.py), in network namespaces.

A relay on the public network; a target behind one NAT, reserved on it; an asker behind the
other NAT reaches the target through the relay, punches a direct TCP connection (simultaneous
open from ports both masquerading routers keep), drops the relayed connection, and still talks
to the target after the relay is killed. Then daemons: a chain across both NATs pushes over a
punched connection; the same inside a `--swarm-key` swarm; and direct, relayed and punched
chains take the paths they are meant to and stay exact (their per-token
times are benchmarks/nat_paths.py's).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chainlab import (PUBLIC, chain_lab, ctl, home_listen, lab_problem, local_tokens, paths, run_client,
                      start_three_chains, wait_all)
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


def _lab(tmp_path: Path, name: str):
    problem = lab_problem()
    if problem == "needs root for network namespaces":
        pytest.skip(problem)
    assert problem is None, problem
    return chain_lab(tmp_path, name)


def test_daemons_behind_two_nats_push_over_a_punched_connection(tmp_path) -> None:
    """A chain A (public, relay) -> B (behind one NAT) -> B2 (behind the other): B's push to B2
    first goes through the relay, then B punches a direct connection and the push link uses it.
    The generated tokens stay exactly local transformers'."""
    with _lab(tmp_path, "pd") as (lab, model, swarms):
        a = swarms["pub"].start("0:2", name="a", args=PUBLIC)
        b = swarms["home"].start("2:4", name="b", initial_peers=a.addrs, wait=False, args=home_listen("home"))
        b2 = swarms["home2"].start("4:6", name="b2", initial_peers=a.addrs, wait=False, args=home_listen("home2"))
        wait_all(b, b2)
        result = run_client(lab, model, a.addrs[0], "--tokens", "20")
        assert [h["peer_id"] for h in result["route_before"]] == [a.peer_id, b.peer_id, b2.peer_id]
        assert result["tokens"] == local_tokens(model, 20)
        punched = [line for line in b.log if "hole punched" in line]
        assert punched and ROUTER_IPS["home2"] in punched[0], "\n".join(list(b.log)[-30:])
        assert any("hole punched" in line for line in b2.log)
        # The control API tells the punched connection from the relayed and direct ones.
        on_b = paths(tmp_path, "b")
        assert on_b.get(b2.peer_id) == "punched", on_b
        assert on_b.get(a.peer_id) == "direct", on_b
        nat = ctl(tmp_path, "b", "status")["nat"]
        assert nat["reachability"] == "private" and nat["observed_ip"] == ROUTER_IPS["home"], nat
        assert [r["relay"] for r in nat["relays"]] == [a.peer_id] and nat["punched"] >= 1, nat


def test_relays_and_punching_inside_a_swarm_key_swarm(tmp_path) -> None:
    """The same chain in a private swarm (`--swarm-key` everywhere): B and B2 reserve on A and
    serve through it, B punches to B2, the output is exact; a peer without the key cannot even
    connect to A. (py-libp2p applies the key only when upgrading inbound connections; relayed
    dials and punches apply it on the outbound side themselves.)"""
    key = tmp_path / "swarm.key"
    key.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{os.urandom(32).hex()}\n")
    keyed = ["--swarm-key", str(key)]
    with _lab(tmp_path, "pk") as (lab, model, swarms):
        a = swarms["pub"].start("0:2", name="a", args=[*PUBLIC, *keyed])
        b = swarms["home"].start("2:4", name="b", initial_peers=a.addrs, wait=False, args=[*home_listen("home"), *keyed])
        b2 = swarms["home2"].start("4:6", name="b2", initial_peers=a.addrs, wait=False,
                                   args=[*home_listen("home2"), *keyed])
        wait_all(b, b2)
        result = run_client(lab, model, a.addrs[0], "--tokens", "20", "--swarm-key", str(key), "--direct", a.addrs[0])
        assert result["direct_dial"][a.addrs[0]].startswith("failed"), result["direct_dial"]  # no key, no connection
        servers = {s["peer_id"]: s for s in result["servers"]}
        for natted in (b, b2):
            addrs = servers[natted.peer_id]["addrs"]
            assert addrs and all(f"/p2p/{a.peer_id}/p2p-circuit/" in x for x in addrs), servers
        assert [h["peer_id"] for h in result["route_before"]] == [a.peer_id, b.peer_id, b2.peer_id]
        assert result["tokens"] == local_tokens(model, 20), "\n".join(list(b.log)[-30:])
        assert any("hole punched" in line for line in b.log), "\n".join(list(b.log)[-30:])
        assert paths(tmp_path, "b").get(b2.peer_id) == "punched"
        nat = ctl(tmp_path, "b", "status")["nat"]
        assert nat["reachability"] == "private" and [r["relay"] for r in nat["relays"]] == [a.peer_id], nat


def test_direct_relayed_and_punched_chains_take_their_paths(tmp_path) -> None:
    """The three chains of benchmarks/nat_paths.py, checked for correctness only (the benchmark
    times them): each generation takes its chain and equals local generation; B punched to B2
    while BX, started with `--no-hole-punching`, stayed relayed."""
    tokens = 8
    with _lab(tmp_path, "pb") as (lab, model, swarms):
        chains = start_three_chains(swarms)
        result = run_client(lab, model, chains.daemons["a"].addrs[0], "--tokens", str(tokens), "--rounds", "1",
                            "--chains", json.dumps(chains.avoid))
        assert all(out == local_tokens(model, tokens) for out in result["outputs"])
        assert {label: route for label, route in result["routes"]} == chains.routes
        # (The connections themselves may be idle-swept by now: the counters and logs stay.)
        b, bx = chains.daemons["b"], chains.daemons["bx"]
        assert ctl(tmp_path, "b", "status")["nat"]["punched"] >= 1
        assert any("hole punched" in line and ROUTER_IPS["home2"] in line for line in b.log)
        assert ctl(tmp_path, "bx", "status")["nat"]["punched"] == 0
        assert not any("hole punch" in line for line in bx.log)
