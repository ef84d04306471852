"""The unit files: `systemd-analyze verify` accepts them and their exposure score is <= 2.0."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from petals_client import ctl
from petalsd.config import load_config

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install -y systemd)")


def unit_copy(tmp_path: Path, *, gpu: bool) -> Path:
    """The unit (with the GPU drop-in appended, as systemd would merge it) under its own name,
    ExecStart pointed at an executable that exists here: verify checks that it does, and the
    daemon is not installed in /usr/local/bin on a build machine."""
    text = (SYSTEMD / "petalsd.service").read_text()
    if gpu:
        text += "\n" + (SYSTEMD / "petalsd-gpu.conf").read_text()
    text, n = re.subn(r"^ExecStart=/usr/local/bin/petalsd ", "ExecStart=/bin/true ", text,
                      flags=re.M)
    assert n == 1
    path = tmp_path / "petalsd.service"
    path.write_text(text)
    return path


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_verify(tmp_path: Path, gpu: bool) -> None:
    r = subprocess.run([ANALYZE, "verify", str(unit_copy(tmp_path, gpu=gpu))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


@needs_analyze
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_security_exposure(tmp_path: Path, gpu: bool) -> None:
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager",
                        str(unit_copy(tmp_path, gpu=gpu))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_unit_matches_the_daemon() -> None:
    d = directives((SYSTEMD / "petalsd.service").read_text())
    assert d["Type"] == ["notify"] and d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["ExecStart"] == ["/usr/local/bin/petalsd --config /etc/petalsd/petalsd.toml"]
    assert d["DynamicUser"] == ["yes"] and d["CapabilityBoundingSet"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    # The RuntimeDirectory gives the daemon its default socket, which is where ctl looks.
    assert d["RuntimeDirectory"] == ["petalsd"] and d["StateDirectory"] == ["petalsd"]
    config = load_config(["--model", "m", "--new-swarm"],
                         environ={"RUNTIME_DIRECTORY": "/run/petalsd",
                                  "STATE_DIRECTORY": "/var/lib/petalsd"})
    assert str(config.control_socket) == ctl.DEFAULT_SOCKET
    # The stop timeout leaves room for the default drain.
    assert int(d["TimeoutStopSec"][0]) > config.drain_grace
