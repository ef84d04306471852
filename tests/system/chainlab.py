"""Chains of daemons across the NAT lab's two NATed homes: shared by tests/system/test_punch.py
(correctness) and benchmarks/nat_paths.py (per-token time of direct, relayed and punched chains).

The lab (natlab.py) has a public network and two homes behind masquerading routers; a 6-block
Llama (hidden 64) is served by daemons with one torch thread, launched per lab host by a
LocalSwarm and all killed, and the namespaces removed, however the caller ends.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natlab import HOME_IPS, PUBLIC_IP, NatLab, ensure_tools, leftover_namespaces, nat_lab

CLIENT = str(Path(__file__).with_name("nat_client.py"))
DAEMON_ARGS = ["--num-threads", "1", "--log-level", "info", "--throughput", "100"]
PROMPT = [1, 17, 42, 99, 5, 64, 3]
PUBLIC = ["--listen", f"/ip4/{PUBLIC_IP}/tcp/0", "--reachability", "public"]


def lab_problem() -> str | None:
    """Why the lab cannot be built here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    return ensure_tools()


@contextmanager
def chain_lab(tmp_path: Path, name: str) -> Iterator[tuple[NatLab, Path, dict[str, Any]]]:
    """The lab, the model, and a LocalSwarm per lab host ("pub", "home", "home2")."""
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


def home_listen(host: str) -> list[str]:
    return ["--listen", f"/ip4/{HOME_IPS[host]}/tcp/0"]


def wait_all(*daemons: Any) -> None:
    """Wait for daemons started with wait=False (they probe and reserve in parallel)."""
    for d in daemons:
        d.wait_ready(300)


@dataclass
class ThreeChains:
    """Nine daemons making three chains that differ in their paths (see start_three_chains)."""
    daemons: dict[str, Any]
    avoid: dict[str, list[str]]  # chain label -> the peers a generation bans to take that chain
    routes: dict[str, list[str]]  # chain label -> the route it must take


def start_three_chains(swarms: dict[str, Any]) -> ThreeChains:
    """direct A -> P1 -> P2 (all public); relayed A -> BX -> B2 (BX behind one NAT with
    `--no-hole-punching`, B2 behind the other: BX pushes to B2 through a relay); punched
    A -> B -> B2 (B, beside BX, punches to B2)."""
    a = swarms["pub"].start("0:2", name="a", args=PUBLIC)
    p1 = swarms["pub"].start("2:4", name="p1", initial_peers=a.addrs, args=PUBLIC, wait=False)
    p2 = swarms["pub"].start("4:6", name="p2", initial_peers=a.addrs, args=PUBLIC, wait=False)
    wait_all(p1, p2)  # relays for the daemons behind NAT
    b = swarms["home"].start("2:4", name="b", initial_peers=a.addrs, args=home_listen("home"), wait=False)
    bx = swarms["home"].start("2:4", name="bx", initial_peers=a.addrs, wait=False,
                              args=[*home_listen("home"), "--no-hole-punching"])
    b2 = swarms["home2"].start("4:6", name="b2", initial_peers=a.addrs, args=home_listen("home2"), wait=False)
    wait_all(b, bx, b2)
    ids = {name: d.peer_id for name, d in (("a", a), ("p1", p1), ("p2", p2), ("b", b), ("bx", bx), ("b2", b2))}
    return ThreeChains(
        daemons={"a": a, "p1": p1, "p2": p2, "b": b, "bx": bx, "b2": b2},
        avoid={"direct": [ids["b"], ids["bx"], ids["b2"]], "relayed": [ids["p1"], ids["p2"], ids["b"]],
               "punched": [ids["p1"], ids["p2"], ids["bx"]]},
        routes={"direct": [ids["a"], ids["p1"], ids["p2"]], "relayed": [ids["a"], ids["bx"], ids["b2"]],
                "punched": [ids["a"], ids["b"], ids["b2"]]})


def run_client(lab: NatLab, model: Path, peer: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """tests/system/nat_client.py in the public namespace; its RESULT line."""
    done = subprocess.run([*lab.prefix("pub"), sys.executable, CLIENT, "--model", str(model), "--peer", peer,
                           "--prompt", json.dumps(PROMPT), *args], capture_output=True, text=True, timeout=timeout)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"nat_client gave no result:\n{done.stderr[-6000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def local_tokens(model: Path, tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model)
    return local.generate(torch.tensor([PROMPT]), max_new_tokens=tokens, do_sample=False)[0].tolist()


def ctl(workdir: Path, daemon: str, what: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "petals_client.cli", "ctl", "--socket", str(workdir / f"{daemon}.sock"),
                           "--json", what], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"petals ctl {what} on {daemon} failed: {done.stderr}")
    return json.loads(done.stdout)


def paths(workdir: Path, daemon: str) -> dict[str, str]:
    """peer id -> direct / relayed / punched, from the daemon's `petals ctl peers`."""
    return {p["peer_id"]: p["path"] for p in ctl(workdir, daemon, "peers")}
