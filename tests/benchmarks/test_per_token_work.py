"""The per-token work counts (benchmarks/per_token_work.py) on the tiny model, through 3 daemons
with push: exact counts, so what a daemon does per decode token is pinned here (issue 18, serialize
once). The client's side is the session's business; only what the protocol saves it is checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_each_daemon_serializes_and_hashes_once_per_token(tmp_path: Path) -> None:
    out = tmp_path / "work.json"
    # A process of its own: the counters wrap functions process-wide.
    subprocess.run([sys.executable, "-m", "benchmarks.per_token_work", "--model-size", "tiny", "--daemons", "3",
                    "--new-tokens", "6", "--settle", "0.5", "--cache-dir", str(tmp_path / "models"),
                    "--json", str(out)], cwd=REPO_ROOT, check=True, timeout=600)
    parties = json.loads(out.read_text())["parties"]
    client, *daemons = parties.values()
    assert len(daemons) == 3
    for index, daemon in enumerate(daemons):
        pushes = index < 2  # the last daemon answers the client only
        assert daemon["thread crossings"] == 2  # into the compute thread and back
        assert daemon["bytes->tensor (loop)"] == daemon["tensor->bytes (loop)"] == 0
        assert daemon["bytes->tensor (other thread)"] == daemon["tensor->bytes (other thread)"] == 1
        assert daemon["msgpack decodes (step, result)"] == 1
        assert daemon["msgpack encodes (step, result)"] == (2 if pushes else 1)
        assert daemon["tensor data packed into msgpack"] == 1  # the push and the answer share it
        assert daemon["SHA-256 over tensor data"] == 2  # its input (received) and its output
        assert daemon["Ed25519 sign"] == 1
    # Three hops' outputs and its own input: a hop's output is not hashed again as the next input.
    assert client["SHA-256 over tensor data"] == 4
    assert client["Ed25519 verify"] == 3
