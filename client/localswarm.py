"""Start and stop real `petalsd` processes on 127.0.0.1: for `petals demo`, tests and benchmarks.

Each daemon is a separate process started with the same command an operator would type; we wait
for its `ready` line on stderr (which carries its full multiaddrs) and stop every daemon we
started on exit: SIGTERM first (a clean drain), SIGKILL after a grace period, also when the
caller is interrupted (the context manager's exit runs on KeyboardInterrupt too).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

READY_RE = re.compile(r"\bready\b")
ADDR_RE = re.compile(r"(/ip[46]/\S+/tcp/\d+/p2p/\w+)")


class DaemonStartError(RuntimeError):
    """A daemon exited or stayed silent before printing its ready line; carries its last log lines."""


@dataclass
class DaemonProcess:
    name: str
    args: list[str]
    process: subprocess.Popen[str]
    blocks: str | None = None  # the `--blocks` it was started with (None: it chose them)
    addrs: list[str] = field(default_factory=list)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    ready: threading.Event = field(default_factory=threading.Event)
    echo: bool = False

    @property
    def peer_id(self) -> str:
        return self.addrs[0].rsplit("/p2p/", 1)[1] if self.addrs else ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.log.append(line)
            if self.echo:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
            if not self.ready.is_set() and READY_RE.search(line) and ADDR_RE.search(line):
                self.addrs = ADDR_RE.findall(line)
                self.ready.set()
        self.ready.set()  # EOF: wake waiters; they check whether the process is alive

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or not self.addrs:
            tail = "\n".join(list(self.log)[-15:])
            state = f"exit status {self.process.poll()}" if self.process.poll() is not None else "still silent"
            raise DaemonStartError(f"daemon {self.name} did not become ready within {timeout:.0f} s ({state}):\n{tail}")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot drain
            self.process.terminate()
            try:
                return self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


class LocalSwarm:
    """Daemons on loopback serving one model. Use as a context manager."""

    def __init__(self, model: str | Path, *, workdir: Path | None = None, echo: bool = False,
                 extra_args: list[str] | None = None, python: str = sys.executable,
                 ready_timeout: float = 120.0) -> None:
        self.model = str(model)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="petals-swarm-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.echo = echo
        self.extra_args = extra_args or []
        self.python = python
        self.ready_timeout = ready_timeout
        self.daemons: list[DaemonProcess] = []

    @property
    def addrs(self) -> list[str]:
        return [d.addrs[0] for d in self.daemons if d.addrs]

    def start(self, blocks: str | None = None, *, initial_peers: list[str] | None = None,
              args: list[str] | None = None, name: str | None = None, wait: bool = True,
              env: dict[str, str] | None = None, public_name: bool = True,
              launcher: list[str] | None = None) -> DaemonProcess:
        """Start one daemon. The first joins no one (`--new-swarm`) unless peers are given.
        `launcher`: what the interpreter runs instead of `-m petalsd` (tests start fault-injecting
        daemons this way: a script that patches petalsd, then runs its main)."""
        name = name or f"d{len(self.daemons) + 1}"
        peers = initial_peers if initial_peers is not None else self.addrs[:1]
        cmd = [self.python, *(launcher or ["-m", "petalsd"]), "--model", self.model,
               "--listen", "/ip4/127.0.0.1/tcp/0",
               "--identity", str(self.workdir / f"{name}.key")]
        if not any(a.startswith(("--control-socket", "--no-control-api", "--config")) for a in (args or [])):
            # Each daemon's control socket in the swarm's folder, not in the host-wide default one
            # (where a test's daemons would be listed beside the user's); AF_UNIX paths stop at 108 bytes.
            socket = self.workdir / f"{name}.sock"
            cmd += ["--control-socket", str(socket)] if len(str(socket)) < 100 else ["--no-control-api"]
        if public_name:  # name the daemon after its slot, unless a config file should decide
            cmd += ["--public-name", name]
        if blocks is not None:
            cmd += ["--blocks", blocks]
        cmd += ["--initial-peers", *peers] if peers else ["--new-swarm"]
        cmd += self.extra_args + (args or [])
        base = dict(os.environ, PYTHONUNBUFFERED="1")
        base.pop("NOTIFY_SOCKET", None)
        env = {**base, **(env or {})}
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        daemon = DaemonProcess(name=name, args=cmd, process=process, blocks=blocks, echo=self.echo)
        threading.Thread(target=daemon._read_stderr, name=f"{name}-stderr", daemon=True).start()
        self.daemons.append(daemon)
        if wait:
            daemon.wait_ready(self.ready_timeout)
        return daemon

    def wait_all(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        for d in self.daemons:
            d.wait_ready(max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        for d in self.daemons:
            d.signal(signal.SIGCONT)
            d.signal(signal.SIGTERM)
        for d in self.daemons:
            d.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
