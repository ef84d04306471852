"""The stock libp2p paths stay correct: the core integration tests (parity, push, recovery) run
again with `PETALS_LIBP2P_STOCK=1`, which makes petals_protocol.p2p.compat take libp2p's public
API everywhere (plain yamux, the stock DHT calls), as it does on a libp2p release it was not
written for. Daemons and clients inherit the variable, and each daemon says which path it took."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from petals_protocol.p2p import compat

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
CORE = [
    "test_inference.py::test_greedy_equals_local_llama",
    "test_inference.py::test_two_concurrent_sessions_stay_correct",
    "test_push.py::test_greedy_with_push_equals_local",
    "test_push.py::test_rollback_with_push_matches_client_driven_hops",
    "test_recovery.py::test_generation_survives_daemon_failure",
    "test_recovery.py::test_session_resumes_after_its_connection_closed_while_idle",
]


def test_core_integration_tests_pass_on_the_stock_libp2p_paths(tmp_path):
    if os.environ.get(compat.STOCK_ENV):
        pytest.skip("already running on the stock paths (this test is what runs them)")
    env = dict(os.environ, **{compat.STOCK_ENV: "1"}, PETALS_TEST_ECHO="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider",
                             *[str(HERE / test) for test in CORE]],
                            cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=1500)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, tail
    assert "stock yamux and DHT paths" in result.stdout + result.stderr, "no daemon reported the stock paths"
    assert "lean yamux" not in result.stdout + result.stderr
