"""Thread defaults for a shared machine (protocol/threads.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from petals_protocol.threads import default_num_threads, quiet_openmp_waits, usable_cores


def test_quiet_waits_sets_passive_only_when_nobody_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    env: dict[str, str] = {}
    assert quiet_openmp_waits(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"KMP_BLOCKTIME": "200"}):
        env = dict(chosen)
        assert not quiet_openmp_waits(env) and env == chosen


def test_quiet_waits_is_a_no_op_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", object())
    env: dict[str, str] = {}
    assert not quiet_openmp_waits(env) and env == {}


@pytest.mark.parametrize(("cores", "load", "threads"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 4.0, 1), (16, 1.3, 15), (16, 0.0, 16), (1.5, 0.0, 1),
])
def test_default_threads_are_the_free_cores(cores: float, load: float, threads: int) -> None:
    assert default_num_threads(load_average=load, cores=cores) == threads


def test_usable_cores_respects_a_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path) == min(1.5, usable_cores(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == usable_cores(tmp_path / "none")


def test_importing_the_client_before_torch_makes_openmp_waits_passive() -> None:
    code = "import os, petals_client, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                                          "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "PASSIVE", out.stderr
