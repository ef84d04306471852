"""The daemon as an operator meets it: sd_notify, SIGTERM drain, SIGHUP reload, control API, fatal errors."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client import ctl
from petals_client.localswarm import LocalSwarm


pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])


class NotifyListener:
    """A NOTIFY_SOCKET stand-in: collects (time, message) datagrams in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def wait_for(self, prefix: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if m.startswith(prefix):
                    return t
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_notify_ready_watchdog_and_drain_with_active_session(llama_path, tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    swarm = LocalSwarm(llama_path, extra_args=["--num-threads", "1"])
    try:
        env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}
        d = swarm.start("0:6", env=env, wait=False)
        d.wait_ready(120)
        ready_at = listener.wait_for("READY=1")
        loaded = [m for _, m in listener.messages if m.startswith("STATUS=loading")]
        assert loaded, "STATUS=loading... must come before READY=1"
        time.sleep(2.0)
        pings = [t for t, m in listener.messages if m == "WATCHDOG=1" and t > ready_at]
        assert 6 <= len(pings) <= 14, f"expected ~10 watchdog pings in 2 s at 0.2 s, got {len(pings)}"

        # SIGTERM while a session generates: the session finishes correctly, then the daemon exits 0.
        ref = AutoModelForCausalLM.from_pretrained(llama_path).generate(PROMPT, max_new_tokens=30, do_sample=False)
        with AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=swarm.addrs) as model:
            sent = []

            class KillAfterFive:
                def put(self, value):
                    sent.append(value)
                    if len(sent) == 6:
                        d.signal(signal.SIGTERM)

                def end(self):
                    pass

            out = model.generate(PROMPT, max_new_tokens=30, do_sample=False, streamer=KillAfterFive())
        assert out.tolist() == ref.tolist()
        assert d.process.wait(30) == 0
        listener.wait_for("STOPPING=1", timeout=5)
        deadline = time.monotonic() + 5  # the reader thread may still be draining the pipe
        while time.monotonic() < deadline and not any("draining" in line for line in list(d.log)):
            time.sleep(0.1)
        assert any("draining" in line for line in list(d.log))
    finally:
        swarm.stop()
        listener.close()


def test_control_api_reload_and_stop(llama_path, tmp_path):
    sock = tmp_path / "control.sock"
    config = tmp_path / "petalsd.toml"
    config.write_text('public_name = "alpha"\nmax_sessions = 4\n')
    swarm = LocalSwarm(llama_path, extra_args=["--num-threads", "1"])
    try:
        d = swarm.start("0:3", args=["--config", str(config), "--control-socket", str(sock)], public_name=False)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        status = json.loads(ctl.request(str(sock), "GET", "/v1/status")[2])
        assert status["blocks"] == [0, 3] and status["public_name"] == "alpha" and status["state"] == "online"
        assert status["peer_id"] == d.peer_id and d.addrs[0] in status["addresses"]
        assert json.loads(ctl.request(str(sock), "GET", "/v1/sessions")[2]) == []
        code, ctype, body = ctl.request(str(sock), "GET", "/v1/metrics")
        assert code == 200 and b"petalsd_sessions 0" in body and b"# TYPE petalsd_sessions gauge" in body

        # `petals ctl status` renders a readable table
        result = subprocess.run([sys.executable, "-m", "petals_client.cli", "ctl", "--socket", str(sock), "status"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "alpha" in result.stdout and d.peer_id in result.stdout

        # SIGHUP reloads the file: a live key applies, a restart-only key is reported
        config.write_text('public_name = "beta"\nmax_sessions = 4\nmax_length = 99\n')
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = json.loads(ctl.request(str(sock), "GET", "/v1/status")[2])
            if status["public_name"] == "beta":
                break
            time.sleep(0.1)
        assert status["public_name"] == "beta"
        # The log line reaches us through a pipe and a reader thread: give it a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("reloaded" in line for line in list(d.log)):
            time.sleep(0.1)
        reloaded = [line for line in list(d.log) if "reloaded" in line]
        assert reloaded and "max_length" in reloaded[-1], reloaded

        reply = json.loads(ctl.request(str(sock), "POST", "/v1/stop")[2])
        assert reply == {"stopping": True}
        assert d.process.wait(30) == 0
        assert not sock.exists()
    finally:
        swarm.stop()


@pytest.mark.parametrize("case", ["bad-model", "port-in-use", "bad-identity", "bad-config"])
def test_fatal_errors_exit_nonzero_with_one_line(llama_path, tmp_path, case):
    args = ["--model", str(llama_path), "--new-swarm", "--identity", str(tmp_path / "id.key"),
            "--listen", "/ip4/127.0.0.1/tcp/0"]
    busy = None
    if case == "bad-model":
        args[1] = str(tmp_path / "missing-model")
    elif case == "port-in-use":
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args[-1] = f"/ip4/127.0.0.1/tcp/{busy.getsockname()[1]}"
    elif case == "bad-identity":
        (tmp_path / "id.key").write_bytes(b"not a key")
        os.chmod(tmp_path / "id.key", 0o600)
    elif case == "bad-config":
        (tmp_path / "c.toml").write_text("max_sesions = 3\n")
        args += ["--config", str(tmp_path / "c.toml")]
    try:
        result = subprocess.run([sys.executable, "-m", "petalsd", *args], capture_output=True, text=True, timeout=120)
    finally:
        if busy is not None:
            busy.close()
    assert result.returncode in (1, 2), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("petalsd: "), result.stderr
    assert "Traceback" not in result.stderr
    expected = {"bad-model": "missing-model", "port-in-use": "in use", "bad-identity": "id.key",
                "bad-config": "max_sessions"}[case]
    assert expected in last
