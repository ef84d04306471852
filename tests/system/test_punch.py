"""Hole punching between the lab's two NATed hosts (protocol/p2p/punch.py), in network namespaces.

A relay on the public network; a target behind one NAT, reserved on it; an asker behind the
other NAT reaches the target through the relay, punches a direct TCP connection (simultaneous
open from ports both masquerading routers keep), drops the relayed connection, and still talks
to the target after the relay is killed. Then daemons: a chain across both NATs pushes over a
punched connection; the same inside a `--swarm-key` swarm; and the per-token latency of direct,
relayed and punched chains in one run (BENCHMARKS.md).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from natlab import HOME_IPS, PUBLIC_IP, ROUTER_IPS, NatLab, ensure_tools, leftover_namespaces, nat_lab

pytestmark = [pytest.mark.system]

PEER = str(Path(__file__).with_name("punch_peer.py"))
CLIENT = str(Path(__file__).with_name("nat_client.py"))
DAEMON_ARGS = ["--num-threads", "1", "--log-level", "info", "--throughput", "100"]
PROMPT = [1, 17, 42, 99, 5, 64, 3]


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


@contextmanager
def _chain_lab(tmp_path: Path, name: str) -> Iterator[tuple[NatLab, Path, dict[str, Any]]]:
    """The lab, a 6-block model, and a LocalSwarm per lab host ("pub", "home", "home2") whose
    daemons are all killed, and the namespaces removed, however the test ends."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    problem = ensure_tools()
    assert problem is None, problem
    from petals_client.localswarm import LocalSwarm
    from petals_protocol.models.synthetic import make_random_checkpoint

    model = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=6, hidden_size=64, num_heads=4,
                                   vocab_size=128, seed=11)
    with nat_lab(f"{name}{os.getpid() % 100000}") as lab:
        swarms = {h: LocalSwarm(model, workdir=tmp_path, python=lab.python(h, tmp_path), extra_args=DAEMON_ARGS,
                                echo=bool(os.environ.get("PETALS_TEST_ECHO")))
                  for h in ("pub", "home", "home2")}
        try:
            yield lab, model, swarms
        finally:
            for swarm in swarms.values():
                for d in swarm.daemons:
                    d.signal(9)
                swarm.stop()
    assert not leftover_namespaces(lab)


def _wait_all(*daemons: Any) -> None:
    """Wait for daemons started with wait=False (they probe and reserve in parallel)."""
    for d in daemons:
        d.wait_ready(300)


def _client(lab: NatLab, model: Path, peer: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    done = subprocess.run([*lab.prefix("pub"), sys.executable, CLIENT, "--model", str(model), "--peer", peer,
                           "--prompt", json.dumps(PROMPT), *args], capture_output=True, text=True, timeout=timeout)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, done.stderr[-6000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _local(model: Path, tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model)
    return local.generate(torch.tensor([PROMPT]), max_new_tokens=tokens, do_sample=False)[0].tolist()


def _ctl(tmp_path: Path, daemon: str, what: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "petals_client.cli", "ctl", "--socket", str(tmp_path / f"{daemon}.sock"),
                           "--json", what], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _paths(tmp_path: Path, daemon: str) -> dict[str, str]:
    return {p["peer_id"]: p["path"] for p in _ctl(tmp_path, daemon, "peers")}


def test_daemons_behind_two_nats_push_over_a_punched_connection(tmp_path) -> None:
    """A chain A (public, relay) -> B (behind one NAT) -> B2 (behind the other): B's push to B2
    first goes through the relay, then B punches a direct connection and the push link uses it.
    The generated tokens stay exactly local transformers'."""
    with _chain_lab(tmp_path, "pd") as (lab, model, swarms):
        a = swarms["pub"].start("0:2", name="a", args=["--listen", f"/ip4/{PUBLIC_IP}/tcp/0", "--reachability", "public"])
        b = swarms["home"].start("2:4", name="b", initial_peers=a.addrs, wait=False,
                                 args=["--listen", f"/ip4/{HOME_IPS['home']}/tcp/0"])
        b2 = swarms["home2"].start("4:6", name="b2", initial_peers=a.addrs, wait=False,
                                   args=["--listen", f"/ip4/{HOME_IPS['home2']}/tcp/0"])
        _wait_all(b, b2)
        result = _client(lab, model, a.addrs[0], "--tokens", "20")
        assert [h["peer_id"] for h in result["route_before"]] == [a.peer_id, b.peer_id, b2.peer_id]
        assert result["tokens"] == _local(model, 20)
        punched = [line for line in b.log if "hole punched" in line]
        assert punched and ROUTER_IPS["home2"] in punched[0], "\n".join(list(b.log)[-30:])
        assert any("hole punched" in line for line in b2.log)
        # The control API tells the punched connection from the relayed and direct ones.
        paths = _paths(tmp_path, "b")
        assert paths.get(b2.peer_id) == "punched", paths
        assert paths.get(a.peer_id) == "direct", paths
        nat = _ctl(tmp_path, "b", "status")["nat"]
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
    with _chain_lab(tmp_path, "pk") as (lab, model, swarms):
        a = swarms["pub"].start("0:2", name="a", args=["--listen", f"/ip4/{PUBLIC_IP}/tcp/0", "--reachability",
                                                       "public", *keyed])
        b = swarms["home"].start("2:4", name="b", initial_peers=a.addrs, wait=False,
                                 args=["--listen", f"/ip4/{HOME_IPS['home']}/tcp/0", *keyed])
        b2 = swarms["home2"].start("4:6", name="b2", initial_peers=a.addrs, wait=False,
                                   args=["--listen", f"/ip4/{HOME_IPS['home2']}/tcp/0", *keyed])
        _wait_all(b, b2)
        result = _client(lab, model, a.addrs[0], "--tokens", "20", "--swarm-key", str(key), "--direct", a.addrs[0])
        assert result["direct_dial"][a.addrs[0]].startswith("failed"), result["direct_dial"]  # no key, no connection
        servers = {s["peer_id"]: s for s in result["servers"]}
        for natted in (b, b2):
            addrs = servers[natted.peer_id]["addrs"]
            assert addrs and all(f"/p2p/{a.peer_id}/p2p-circuit/" in x for x in addrs), servers
        assert [h["peer_id"] for h in result["route_before"]] == [a.peer_id, b.peer_id, b2.peer_id]
        assert result["tokens"] == _local(model, 20), "\n".join(list(b.log)[-30:])
        assert any("hole punched" in line for line in b.log), "\n".join(list(b.log)[-30:])
        assert _paths(tmp_path, "b").get(b2.peer_id) == "punched"
        nat = _ctl(tmp_path, "b", "status")["nat"]
        assert nat["reachability"] == "private" and [r["relay"] for r in nat["relays"]] == [a.peer_id], nat


@pytest.mark.slow
def test_per_token_latency_direct_relayed_punched(tmp_path) -> None:
    """Three chains of three daemons in one lab, one client alternating between them (BENCHMARKS.md):
    direct A -> P1 -> P2 (all public); relayed A -> BX -> B2 (BX behind one NAT with
    `--no-hole-punching`, B2 behind the other: BX pushes to B2 through a relay); punched
    A -> B -> B2 (B, beside BX, punches to B2). Prints the per-token medians against local."""
    tokens, rounds = 40, 3
    with _chain_lab(tmp_path, "pb") as (lab, model, swarms):
        public = ["--listen", f"/ip4/{PUBLIC_IP}/tcp/0", "--reachability", "public"]
        a = swarms["pub"].start("0:2", name="a", args=public)
        p1 = swarms["pub"].start("2:4", name="p1", initial_peers=a.addrs, args=public, wait=False)
        p2 = swarms["pub"].start("4:6", name="p2", initial_peers=a.addrs, args=public, wait=False)
        _wait_all(p1, p2)  # relays for the daemons behind NAT
        home = ["--listen", f"/ip4/{HOME_IPS['home']}/tcp/0"]
        b = swarms["home"].start("2:4", name="b", initial_peers=a.addrs, args=home, wait=False)
        bx = swarms["home"].start("2:4", name="bx", initial_peers=a.addrs, args=[*home, "--no-hole-punching"],
                                  wait=False)
        b2 = swarms["home2"].start("4:6", name="b2", initial_peers=a.addrs, wait=False,
                                   args=["--listen", f"/ip4/{HOME_IPS['home2']}/tcp/0"])
        _wait_all(b, bx, b2)
        chains = {"direct": [b.peer_id, bx.peer_id, b2.peer_id], "relayed": [p1.peer_id, p2.peer_id, b.peer_id],
                  "punched": [p1.peer_id, p2.peer_id, bx.peer_id]}
        result = _client(lab, model, a.addrs[0], "--tokens", str(tokens), "--rounds", str(rounds), "--warmup", "5",
                         "--chains", json.dumps(chains))
        expected = _local(model, tokens)
        assert all(out == expected for out in result["outputs"])
        routes = {label: route for label, route in result["routes"]}
        assert routes == {"direct": [a.peer_id, p1.peer_id, p2.peer_id], "relayed": [a.peer_id, bx.peer_id, b2.peer_id],
                          "punched": [a.peer_id, b.peer_id, b2.peer_id]}, routes
        # B punched (to B2, its only NATed next hop); BX, told not to, stayed relayed. (The
        # connections themselves may be idle-swept by now: the counters and logs stay.)
        assert _ctl(tmp_path, "b", "status")["nat"]["punched"] >= 1
        assert any("hole punched" in line and ROUTER_IPS["home2"] in line for line in b.log)
        assert _ctl(tmp_path, "bx", "status")["nat"]["punched"] == 0
        assert not any("hole punch" in line for line in bx.log)
        from nat_client import local_token_ms

        local_ms = local_token_ms(str(model), PROMPT, tokens, rounds)
        ms = {label: statistics.median(result[label]) * 1000 for label in chains}
        print(f"\nper-token median, {rounds} x {tokens} tokens each: local {local_ms:.2f} ms; "
              + "; ".join(f"{label} chain {v:.2f} ms ({v / local_ms:.1f}x local, {v / ms['direct']:.2f}x direct)"
                          for label, v in ms.items()))
