"""Fixtures that start real `petalsd` processes on 127.0.0.1 (free ports) serving tiny random models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from petals_client.localswarm import LocalSwarm
from swarmlib import make_model, start_swarm


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session")
def bloom_path(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models"), "bloom")


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
