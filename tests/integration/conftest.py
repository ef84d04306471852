"""Fixtures that start real `petalsd` processes on 127.0.0.1 (free ports) serving tiny random models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from petals_client.localswarm import LocalSwarm
from petals_protocol.models.synthetic import make_random_checkpoint

# Daemons are separate processes; keep each to one torch thread so 3-5 of them share 2 cores well.
DAEMON_ARGS = ["--num-threads", "1", "--log-level", "info"]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_model(root: Path, family: str, **overrides) -> Path:
    params = dict(num_layers=6, hidden_size=64, num_heads=4, vocab_size=128, seed=11)
    params.update(overrides)
    return make_random_checkpoint(root / family, family, **params)


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session")
def bloom_path(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models"), "bloom")


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


@pytest.fixture
def swarm_factory():
    """start_swarm(model, spans, extra_args) for a test's own swarm; all stopped at teardown."""
    started: list[LocalSwarm] = []

    def factory(model: Path, spans: list[str], extra: list[str] | None = None) -> LocalSwarm:
        swarm = start_swarm(model, spans, extra)
        started.append(swarm)
        return swarm

    yield factory
    for swarm in started:
        swarm.stop()


@pytest.fixture(scope="module")
def llama_swarm(llama_path):
    swarm = start_swarm(llama_path, ["0:2", "2:4", "4:6"])
    yield swarm
    swarm.stop()
