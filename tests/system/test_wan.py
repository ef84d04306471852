"""The WAN lab (tests/system/wanlab.py, linkemu.py): the emulator keeps to its configured link,
and generation through a lossy, slow, delayed lab link is token for token what local gives.

Timing beyond the emulator's own contract is the benchmark's business (benchmarks/wan.py).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from petals_client.localswarm import DaemonProcess, LocalSwarm
from petals_protocol.models.synthetic import make_random_checkpoint

from natlab import LabError, ensure_tools
from wanlab import LinkConfig, WanLab, leftover_namespaces, wan_lab

pytestmark = [pytest.mark.system]

PROBE = Path(__file__).with_name("udp_probe.py")
CLIENT = Path(__file__).with_name("nat_client.py")


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    problem = ensure_tools()
    assert problem is None, problem
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun for the link emulator")


def _probe(lab: WanLab, count: int, gap: float, size: int, timeout: float) -> list[list[float]]:
    """One-way delays of `count` UDP packets from host a to host b, in arrival order."""
    receiver = subprocess.Popen([*lab.prefix("b"), sys.executable, str(PROBE), "recv", "9000", str(count),
                                 str(timeout)], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
    subprocess.run([*lab.prefix("a"), sys.executable, str(PROBE), "send", lab.ip("b"), "9000", str(count),
                    str(gap), str(size)], check=True, timeout=60)
    out, _ = receiver.communicate(timeout=timeout + 10)
    return json.loads(out)


def test_link_emulator_keeps_its_configured_delay_loss_order_and_rate() -> None:
    link = LinkConfig(delay=0.020, jitter=0.004, loss=0.05, rate=10e6, seed=3)
    with wan_lab(f"pe{os.getpid() % 100000}", ["a", "b"], link=link) as lab:
        sparse = _probe(lab, 400, 0.002, 200, timeout=3)
        burst = _probe(lab, 200, 0.0, 1400, timeout=3)
    assert not leftover_namespaces(lab)
    seqs = [int(s) for s, _ in sparse]
    assert seqs == sorted(seqs), "a link reordered packets"
    lost = 1 - len(sparse) / 400
    assert 0.01 <= lost <= 0.12, f"lost {lost:.1%} of packets, configured {link.loss:.0%}"
    delays = sorted(d for _, d in sparse)
    # Never early: each packet is held at least the delay less the jitter, and the middle of
    # the distribution sits at the configured delay (a loaded machine only ever adds).
    assert delays[0] >= link.delay - link.jitter - 0.0005, delays[:5]
    assert link.delay - link.jitter / 2 <= statistics.median(delays) <= link.delay + link.jitter + 0.003, \
        statistics.median(delays)
    # The uplink serialises: 1428-byte IP packets at 10 Mbit/s leave about 1.14 ms apart, so the
    # last of a back-to-back burst arrives that much per packet after the first.
    first, last = burst[0][1], burst[-1][1]
    expected = (len(burst) - 1) * 1428 * 8 / link.rate
    assert last - first >= 0.8 * expected, (last - first, expected)
    # The emulator's own account: it forwarded on time (a late forward is unconfigured delay).
    assert lab.stats["forwarded"] >= len(sparse) + len(burst) and lab.stats["late_median_s"] < 0.002, lab.stats


PROMPT = [1, 17, 42, 99, 5, 64, 3]
DAEMON_ARGS = ["--num-threads", "1", "--log-level", "info", "--throughput", "100", "--reachability", "public"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("wan") / "llama", "llama", num_layers=4, hidden_size=64,
                                  num_heads=4, vocab_size=128, seed=11)


@pytest.fixture
def lossy_lab() -> Iterator[WanLab]:
    # Slow and lossy on purpose: 5% of packets lost, a 2 Mbit/s uplink, 15 +- 5 ms one way.
    link = LinkConfig(delay=0.015, jitter=0.005, loss=0.05, rate=2e6, seed=5)
    with wan_lab(f"pw{os.getpid() % 100000}", ["client", "d0", "d1"], link=link, trace_packets=True) as lab:
        yield lab
    assert not leftover_namespaces(lab)
    assert lab.stats["dropped"] > 0, lab.stats  # the link really lost packets under the generation
    # The packet trace (benchmarks/packet_split.py reads it): data packets only, each held at least
    # the delay less the jitter, on the links the chain used (the client's steps, d0's pushes, d1's
    # results), and never more of them than the emulator forwarded.
    names = {lab.ip(host): host for host in lab.wan_hosts()}
    assert 0 < len(lab.packets) <= lab.stats["forwarded"]
    assert all(payload > 0 and src in names and dst in names for _, _, src, dst, payload in lab.packets)
    assert min(delivered - arrived for arrived, delivered, *_ in lab.packets) >= link.delay - link.jitter - 0.0005
    links = {(names[src], names[dst]) for _, _, src, dst, _ in lab.packets}
    assert {("client", "d0"), ("d0", "d1"), ("d1", "client")} <= links, links


@contextmanager
def _two_daemons(lab: WanLab, model: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    """d0 (the first half of the blocks) and d1 (the rest), each on its own lab host, for the
    block; yields d0, the client's entry point."""
    swarms = [LocalSwarm(model, workdir=tmp_path, python=lab.python(host, tmp_path), extra_args=DAEMON_ARGS)
              for host in ("d0", "d1")]
    try:
        first = swarms[0].start("0:2", name="d0", args=["--listen", f"/ip4/{lab.ip('d0')}/tcp/0"])
        swarms[1].start("2:4", name="d1", initial_peers=first.addrs, args=["--listen", f"/ip4/{lab.ip('d1')}/tcp/0"])
        yield first
    finally:
        for swarm in swarms:
            swarm.stop()


def _run_client(lab: WanLab, model: Path, entry: DaemonProcess, prompt: list[int], tokens: int,
                client_args: tuple[str, ...] = ()) -> dict:
    """Greedy generation by a client on host `client` through the daemon `entry`: its RESULT."""
    done = subprocess.run([*lab.prefix("client"), sys.executable, str(CLIENT), "--model", str(model),
                           "--peer", entry.addrs[0], "--listen", f"/ip4/{lab.ip('client')}/tcp/0",
                           "--prompt", json.dumps(prompt), "--tokens", str(tokens), *client_args],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-8000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _generate(lab: WanLab, model: Path, tmp_path: Path, prompt: list[int], tokens: int,
              client_args: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """One generation through two daemons started for it: the client's RESULT and d0's log lines."""
    with _two_daemons(lab, model, tmp_path) as first:
        return _run_client(lab, model, first, prompt, tokens, client_args), list(first.log)


def _local_tokens(model: Path, prompt: list[int], tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model)
    return local.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)[0].tolist()


def test_generation_is_token_exact_through_a_lossy_slow_link(lossy_lab: WanLab, model: Path, tmp_path) -> None:
    result, _ = _generate(lossy_lab, model, tmp_path, PROMPT, 12)
    assert result["tokens"] == _local_tokens(model, PROMPT, 12)
    assert [h["blocks"] for h in result["route_before"]] == [[0, 2], [2, 4]]


def test_a_prompt_that_takes_seconds_on_a_slow_uplink_is_not_cut_off(tmp_path) -> None:
    """A 200-token prompt of a 512-wide model: 400 KB of activations on every leg, 1.6 s each at a
    2 Mbit/s uplink, and the client's step timeout set to 2 s. Flat deadlines cut this off twice:
    d0's push to d1 (one second) was cut mid-frame, which also left the connection between the
    daemons unusable, and the client gave up on d0's result, which needs three such legs. Either
    way the session failed (no other daemon serves the blocks). Deadlines now count the bytes
    (transfer_allowance); a decode step's deadline stays the step timeout."""
    wide = make_random_checkpoint(tmp_path / "wide", "llama", num_layers=4, hidden_size=512, num_heads=8,
                                  intermediate_size=256, vocab_size=128, seed=12)
    prompt = [(7 * i + 3) % 128 for i in range(200)]
    link = LinkConfig(delay=0.015, rate=2e6, seed=6)
    with wan_lab(f"ps{os.getpid() % 100000}", ["client", "d0", "d1"], link=link) as lab:
        result, d0_log = _generate(lab, wide, tmp_path, prompt, 3, client_args=("--step-timeout", "2"))
    assert not leftover_namespaces(lab)
    assert result["tokens"] == _local_tokens(wide, prompt, 3)
    route = [(h["peer_id"], h["blocks"]) for h in result["route_before"]]
    assert result["recoveries"] == 0 and [(h["peer_id"], h["blocks"]) for h in result["route_after"]] == route, result
    assert not [line for line in d0_log if "push to" in line and "failed" in line], d0_log[-20:]


def test_a_connection_cut_without_a_reset_is_given_up_and_dialled_again(model, tmp_path) -> None:
    """A NAT that forgets its mapping, or a path that fails, leaves a connection dead with no reset
    to either end. Stock TCP keeps retransmitting into it for about fifteen minutes, and pushes
    written into it meanwhile are lost: every session through those two daemons waited out its
    step timeout and banned the next daemon. Every libp2p connection now has TCP keepalives and a
    user timeout (protocol/p2p/compat, `keep_alive`): a dead one is given up within
    DEAD_CONNECTION_AFTER seconds, and the next push dials afresh."""
    from petals_protocol.p2p.compat import DEAD_CONNECTION_AFTER

    link = LinkConfig(delay=0.015, seed=7)
    with wan_lab(f"pk{os.getpid() % 100000}", ["client", "d0", "d1"], link=link) as lab:
        with _two_daemons(lab, model, tmp_path) as first:
            before = _run_client(lab, model, first, PROMPT, 6, ("--step-timeout", "5"))  # d0's push link to d1 is up
            assert lab.cut_connections("d0", "d1"), "no connection between d0 and d1 to cut"
            time.sleep(DEAD_CONNECTION_AFTER + 5)
            after = _run_client(lab, model, first, PROMPT, 6, ("--step-timeout", "5"))
    assert not leftover_namespaces(lab)
    assert lab.stats["cut"] > 0, lab.stats
    expected = _local_tokens(model, PROMPT, 6)
    assert before["tokens"] == expected and after["tokens"] == expected
    assert after["recoveries"] == 0, after  # the push went through: nobody timed out or was banned


def test_lab_hosts_run_the_congestion_control_asked_for() -> None:
    """benchmarks.wan --congestion-control: every host's TCP, or a clear error naming the setting."""
    def chosen(lab: WanLab, host: str) -> str:
        return subprocess.run([*lab.prefix(host), "sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                              capture_output=True, text=True, check=True).stdout.strip()

    with wan_lab(f"pc{os.getpid() % 100000}", ["a", "b"], congestion_control="reno") as lab:
        assert [chosen(lab, host) for host in ("a", "b")] == ["reno", "reno"]
    assert not leftover_namespaces(lab)
    refused = WanLab(f"px{os.getpid() % 100000}", ["a"], congestion_control="no-such-algorithm")
    try:
        with pytest.raises(LabError, match="tcp_congestion_control=no-such-algorithm"):
            refused.up()
    finally:
        refused.down()
    assert not leftover_namespaces(refused)
