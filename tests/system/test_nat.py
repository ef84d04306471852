"""A daemon behind a masquerading NAT serves the swarm through Circuit Relay v2 (network namespaces).

Lab (tests/system/natlab.py): on the public network, daemon A (first of the swarm) and daemon C,
both `--reachability public` (TEST-NET addresses are not globally routable, so the dial-back
probe alone would call them "unknown") and so relays; behind the NAT, daemon B with the default
`--reachability auto`, which must find out by itself that nobody can dial it, reserve on both
relays and announce `/p2p-circuit` addresses. A client on the public side generates through
A or C (blocks 0:3) and B (3:6), token for token what local transformers gives, and a direct
dial to B fails. Then the relay the client reaches B through is killed mid-generation: the
client re-opens B through the other relay and the output is still exact.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from petals_client.localswarm import DaemonProcess, LocalSwarm
from petals_protocol.p2p.relay import is_circuit, relay_peer_of
from petals_protocol.models.synthetic import make_random_checkpoint

from natlab import HOME_IPS, PUBLIC_IP, ROUTER_IPS, NatLab, ensure_tools, leftover_namespaces, nat_lab

pytestmark = [pytest.mark.system, pytest.mark.slow]

CLIENT = Path(__file__).with_name("nat_client.py")
DAEMON_ARGS = ["--num-threads", "1", "--log-level", "info", "--throughput", "100"]
PROMPT = [1, 17, 42, 99, 5, 64, 3]


class Lab:
    def __init__(self, lab: NatLab, model: Path, pub: LocalSwarm, home: LocalSwarm,
                 a: DaemonProcess, c: DaemonProcess, b: DaemonProcess) -> None:
        self.lab, self.model, self.pub, self.home = lab, model, pub, home
        self.a, self.c, self.b = a, c, b

    def live_peer(self) -> list[str]:
        """A public daemon still running (a test kills one of the relays)."""
        return next(d.addrs for d in (self.a, self.c) if d.process.poll() is None)

    def client(self, tokens: int, *extra: str, timeout: float = 300) -> dict:
        cmd = [*self.lab.prefix("pub"), sys.executable, str(CLIENT), "--model", str(self.model),
               "--peer", self.live_peer()[0], "--prompt", json.dumps(PROMPT), "--tokens", str(tokens),
               "--direct", *self.b.addrs, f"/ip4/{ROUTER_IPS['home']}/tcp/{self.b.addrs[0].split('/tcp/')[1].split('/')[0]}/p2p/{self.b.peer_id}",
               *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert done.returncode == 0 and lines, f"client failed ({done.returncode}):\n{done.stderr[-12000:]}"
        return json.loads(lines[-1].removeprefix("RESULT "))

    def logs(self) -> str:
        return "\n".join(f"--- {d.name}\n" + "\n".join(list(d.log)[-40:]) for d in (*self.pub.daemons, *self.home.daemons))


@pytest.fixture(scope="module")
def nat_swarm(tmp_path_factory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    problem = ensure_tools()
    assert problem is None, problem
    folder = tmp_path_factory.mktemp("nat")
    model = make_random_checkpoint(folder / "llama", "llama", num_layers=6, hidden_size=64, num_heads=4,
                                   vocab_size=128, seed=11)
    lab_name = f"pn{os.getpid() % 100000}"
    with nat_lab(lab_name) as lab:
        pub = LocalSwarm(model, workdir=folder, python=lab.python("pub", folder), extra_args=DAEMON_ARGS,
                         echo=bool(os.environ.get("PETALS_TEST_ECHO")))
        home = LocalSwarm(model, workdir=folder, python=lab.python("home", folder), extra_args=DAEMON_ARGS,
                          echo=bool(os.environ.get("PETALS_TEST_ECHO")))
        public = ["--listen", f"/ip4/{PUBLIC_IP}/tcp/0", "--reachability", "public"]
        try:
            a = pub.start("0:3", name="a", args=public)
            c = pub.start("0:3", name="c", initial_peers=a.addrs, args=public)
            b = home.start("3:6", name="b", initial_peers=a.addrs,
                           args=["--listen", f"/ip4/{HOME_IPS['home']}/tcp/0", "--announce-period", "2"])
            yield Lab(lab, model, pub, home, a, c, b)
        finally:
            for swarm in (home, pub):
                for d in swarm.daemons:
                    d.signal(9)
                swarm.stop()
    assert not leftover_namespaces(lab)


@pytest.fixture(scope="module")
def local_tokens(nat_swarm: Lab):
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(nat_swarm.model)

    def generate(tokens: int) -> list[int]:
        return local.generate(torch.tensor([PROMPT]), max_new_tokens=tokens, do_sample=False)[0].tolist()

    return generate


def test_natted_daemon_serves_through_relays_token_exact(nat_swarm: Lab, local_tokens) -> None:
    result = nat_swarm.client(30)
    b = nat_swarm.b.peer_id
    # Nobody on the public side can dial B: neither its own address nor its router's.
    assert result["direct_dial"] and all(v.startswith("failed") for v in result["direct_dial"].values()), \
        result["direct_dial"]
    # B learnt it is private and announces only relayed addresses, through both public daemons.
    record = next(s for s in result["servers"] if s["peer_id"] == b)
    assert record["addrs"] and all(is_circuit(a) for a in record["addrs"]), record
    assert {relay_peer_of(a) for a in record["addrs"]} == {nat_swarm.a.peer_id, nat_swarm.c.peer_id}
    assert [h["peer_id"] for h in result["route_before"]][-1] == b
    assert result["tokens"] == local_tokens(30), nat_swarm.logs()
    assert result["recoveries"] == 0


def test_routing_prefers_the_direct_daemon_and_both_chains_are_exact(nat_swarm: Lab, local_tokens) -> None:
    """With a public daemon D for B's blocks the client routes around the relay; a chain through B
    (D avoided) and one through D (B avoided) both give local generation's tokens. (Their
    per-token times: benchmarks/nat_paths.py.)"""
    tokens = 12
    d = nat_swarm.pub.start("3:6", name="d", initial_peers=nat_swarm.live_peer(),
                            args=["--listen", f"/ip4/{PUBLIC_IP}/tcp/0", "--reachability", "public"])
    try:
        # Routing is what this checks, not how fast a new record spreads on a loaded machine: wait
        # until the client has seen D's record (a client run lists the servers it knew).
        for _ in range(5):
            preferred = nat_swarm.client(tokens)
            if d.peer_id in {s["peer_id"] for s in preferred["servers"]}:
                break
        compared = nat_swarm.client(tokens, "--compare", nat_swarm.b.peer_id, d.peer_id, "--rounds", "1")
    finally:
        d.signal(signal.SIGKILL)
        d.process.wait()
        nat_swarm.pub.daemons.remove(d)
    assert d.peer_id in {s["peer_id"] for s in preferred["servers"]}, f"no client saw D: {preferred['servers']}"
    assert preferred["route_before"][-1]["peer_id"] == d.peer_id, (preferred["route_before"], preferred["servers"])
    expected = local_tokens(tokens)
    assert preferred["tokens"] == expected and all(out == expected for out in compared["outputs"])
    assert [r[1][-1] for r in compared["routes"]] == [nat_swarm.b.peer_id, d.peer_id]


def test_relay_lost_mid_generation_is_recovered(nat_swarm: Lab, local_tokens) -> None:
    pids = {d.peer_id: d.pid for d in nat_swarm.pub.daemons}
    result = nat_swarm.client(40, "--kill-after", "15", "--pids", json.dumps(pids))
    assert result["killed_relay"], result
    assert result["tokens"] == local_tokens(40), nat_swarm.logs()
    assert result["route_after"][-1]["peer_id"] == nat_swarm.b.peer_id  # same daemon, through the other relay
    assert result["resumes"] + result["recoveries"] >= 1


GO_RELAY_WHEEL = "hivemind==1.1.12"  # ships go-libp2p's daemon, p2pd, with Circuit Relay v2 hop


def _p2pd(folder: Path) -> Path | None:
    """go-libp2p's daemon from hivemind's wheel on the package index (None if it cannot be had)."""
    binary = folder / "p2pd"
    if binary.exists():
        return binary
    wheels = folder / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", GO_RELAY_WHEEL, "-d",
                           str(wheels)], capture_output=True, text=True, timeout=600)
    found = list(wheels.glob("hivemind-*.whl")) if done.returncode == 0 else []
    if not found:
        return None
    with zipfile.ZipFile(found[0]) as wheel:
        binary.write_bytes(wheel.read("hivemind/hivemind_cli/p2pd"))
    binary.chmod(0o755)
    return binary


def test_go_libp2p_relay_serves_a_natted_daemon(nat_swarm: Lab, local_tokens, tmp_path_factory) -> None:
    """Any Circuit Relay v2 implementation works: a daemon behind the second NAT reserves on
    go-libp2p's p2pd (given with --relay) and the client reaches it through that relay first."""
    folder = tmp_path_factory.mktemp("go")
    binary = _p2pd(folder)
    if binary is None:
        pytest.skip(f"go-libp2p's p2pd is not available (pip download {GO_RELAY_WHEEL} failed)")
    lab = nat_swarm.lab
    port = 40000 + os.getpid() % 20000
    go = subprocess.Popen([*lab.prefix("pub"), str(binary), "-hostAddrs", f"/ip4/{PUBLIC_IP}/tcp/{port}",
                           "-relayService", "-noise", "-muxer", "yamux", "-listen", f"/unix{folder}/p2pd.sock"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert go.stdout is not None
        go_id = ""
        deadline = time.monotonic() + 30
        while not go_id and time.monotonic() < deadline:
            line = go.stdout.readline()
            match = re.search(r"Peer ID: (\S+)", line)
            go_id = match.group(1) if match else ""
        assert go_id, "p2pd printed no peer id"
        relay = f"/ip4/{PUBLIC_IP}/tcp/{port}/p2p/{go_id}"
        home2 = LocalSwarm(nat_swarm.model, workdir=folder, python=lab.python("home2", folder),
                           extra_args=DAEMON_ARGS, echo=bool(os.environ.get("PETALS_TEST_ECHO")))
        try:
            b2 = home2.start("3:6", name="b2", initial_peers=nat_swarm.live_peer(),
                             args=["--listen", f"/ip4/{HOME_IPS['home2']}/tcp/0", "--relay", relay])
            nat_swarm.b.signal(signal.SIGKILL)  # the only other daemon of 3:6: the client must use b2
            nat_swarm.b.process.wait()
            result = nat_swarm.client(20)
            record = next(s for s in result["servers"] if s["peer_id"] == b2.peer_id)
            assert relay_peer_of(record["addrs"][0]) == go_id, record  # --relay first: reached through p2pd
            assert result["route_before"][-1]["peer_id"] == b2.peer_id
            assert result["tokens"] == local_tokens(20), "\n".join(b2.log)
        finally:
            for d in home2.daemons:
                d.signal(signal.SIGKILL)
            home2.stop()
    finally:
        go.kill()
        go.wait()
