"""Helpers shared by the integration tests: tiny random checkpoints and swarms of real daemons.

(A module with a unique name, not conftest: test modules import it directly.)
"""
from __future__ import annotations

import os
from pathlib import Path

from petals_client.localswarm import LocalSwarm
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
