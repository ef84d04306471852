"""petalsd.notify against a real AF_UNIX datagram socket playing systemd."""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from petalsd.notify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def messages(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram waiting on `sock`, each parsed into its KEY=VALUE fields."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096).decode()
            assert data.endswith("\n")
            out.append(dict(line.split("=", 1) for line in data.splitlines()))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2.0)


def test_messages(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.ready(status="serving blocks 0:4")
    assert n.status("2 sessions\nactive")
    assert n.reloading()
    assert n.ready()
    assert n.stopping()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = messages(sock)
    assert got[0] == {"READY": "1", "STATUS": "serving blocks 0:4"}
    assert got[1] == {"STATUS": "2 sessions active"}
    assert got[2]["RELOADING"] == "1" and before <= int(got[2]["MONOTONIC_USEC"]) <= after
    assert got[3:] == [{"READY": "1"}, {"STOPPING": "1"}]
    n.close()


def test_abstract_socket() -> None:
    name = f"petalsd-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(100) == b"WATCHDOG=1\n"
    finally:
        sock.close()


def test_unset_is_a_noop() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready() and n.watchdog_interval() is None
    trio.run(n.run_watchdog)  # returns at once


def test_watchdog_interval_honours_pid() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "200000"}
    assert Notifier.from_env(env).watchdog_interval() == pytest.approx(0.1)
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() \
        == pytest.approx(0.1)
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() \
        is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None


def test_watchdog_pings_at_half_the_period(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})

    async def main() -> None:
        with trio.move_on_after(0.55):
            await n.run_watchdog()

    trio.run(main)
    pings = messages(sock)
    assert all(p == {"WATCHDOG": "1"} for p in pings)
    # One ping at once, then one every 0.1 s for 0.55 s: 6, give or take scheduling.
    assert 5 <= len(pings) <= 7


def test_watchdog_stops_pinging_while_unhealthy(receiver: tuple[str, socket.socket]) -> None:
    """A hung compute job (the daemon reports itself unhealthy) stops the pings, so systemd
    restarts a daemon whose event loop still runs; pings resume once it is healthy again."""
    path, sock = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    healthy = [False]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: n.run_watchdog(healthy=lambda: healthy[0]))
            await trio.sleep(0.35)
            assert messages(sock) == []
            healthy[0] = True
            await trio.sleep(0.15)
            nursery.cancel_scope.cancel()

    trio.run(main)
    pings = messages(sock)
    assert pings and all(p == {"WATCHDOG": "1"} for p in pings)


def test_send_failure_logged_once_and_not_fatal(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.DEBUG, logger="petalsd.notify"):
        assert not n.ready()
        assert not n.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gone.sock" in warnings[0].getMessage()
