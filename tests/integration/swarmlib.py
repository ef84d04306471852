"""Helpers shared by the integration tests: tiny random checkpoints and swarms of real daemons.

(A module with a unique name, not conftest: test modules import it directly.)
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from petals_client import remote
from petals_client.ctl import metrics
from petals_client.localswarm import DaemonProcess, LocalSwarm
from petals_protocol.models.synthetic import make_random_checkpoint

# Daemons are separate processes; keep each to one torch thread so 3-5 of them share 2 cores well.
DAEMON_ARGS = ["--num-threads", "1", "--log-level", "info"]


def make_model(root: Path, family: str, **overrides) -> Path:
    params = dict(num_layers=6, hidden_size=64, num_heads=4, vocab_size=128, seed=11)
    params.update(overrides)
    return make_random_checkpoint(root / family, family, **params)


def start_swarm(model: Path, spans: list[str], extra: list[str] | None = None) -> LocalSwarm:
    swarm = LocalSwarm(model, extra_args=DAEMON_ARGS + (extra or []), echo=bool(os.environ.get("PETALS_TEST_ECHO")))
    try:
        first = swarm.start(spans[0], wait=False)
        first.wait_ready(swarm.ready_timeout)
        for blocks in spans[1:]:
            swarm.start(blocks, initial_peers=first.addrs, wait=False)
        swarm.wait_all()
    except BaseException:
        swarm.stop()
        raise
    return swarm


def make_endless_model(root: Path) -> Path:
    """A Llama checkpoint with no eos token: greedy generation runs the full max_new_tokens."""
    return make_model(root, "llama", eos_token_id=None, bos_token_id=None, pad_token_id=None)


def daemon_counters(swarm: LocalSwarm, daemon: DaemonProcess) -> dict[str, float]:
    """A daemon's own counters from its /v1/metrics: requests served by kind ("steps", "forward",
    ...) and "tokens", every token it ran through its blocks for anyone."""
    samples = metrics(str(swarm.workdir / f"{daemon.name}.sock"))
    counts = {name.removeprefix('petalsd_requests_total{kind="').removesuffix('"}'): value
              for name, value in samples.items() if name.startswith("petalsd_requests_total{")}
    counts["tokens"] = samples.get("petalsd_tokens_total", 0.0)
    return counts


@dataclass
class KillWhenRouted:
    """Kills the daemon that a stateless request (forward, backward) routes through for the hop
    starting at `start`, right after the client chose it and before the request leaves: a route
    predicted by the test could differ, since the RTTs it weighs are re-measured all the time."""

    kill: Callable[[str], None]  # peer id -> that daemon dead (waited for)
    start: int
    armed: bool = True
    killed: list[str] = field(default_factory=list)

    def install(self, monkeypatch) -> "KillWhenRouted":
        choose = remote.choose_route

        def choose_then_kill(*args, **kwargs):
            route = choose(*args, **kwargs)
            if self.armed and not self.killed:
                peer = next(h.server.peer_id for h in route if h.start == self.start)
                self.kill(peer)
                self.killed.append(peer)
            return route

        monkeypatch.setattr(remote, "choose_route", choose_then_kill)
        return self
