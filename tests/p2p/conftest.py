"""Fixtures for the libp2p glue tests: a real peer in another process (tests/p2p/peer_main.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from petals_protocol.p2p.host import connect, make_host, quiet_libp2p_logs, running_host
from petals_protocol.p2p.identity import ephemeral_identity

PEER_MAIN = Path(__file__).with_name("peer_main.py")
_STARTUP_TIMEOUT = 30.0  # importing libp2p alone takes ~1 s; leave room on a loaded 2-core box


@dataclass
class PeerProcess:
    proc: subprocess.Popen[str]
    addr: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def start_peer(*args: str) -> PeerProcess:
    """Start peer_main.py and wait for its "ready <multiaddr>" line."""
    proc = subprocess.Popen(
        [sys.executable, str(PEER_MAIN), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
    except BaseException:
        proc.kill()
        raise
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"peer process failed to start (exit {proc.wait(timeout=10)}): {line!r}")
    return PeerProcess(proc, line.split()[1])


@pytest.fixture(scope="module")
def remote_peer() -> Iterator[PeerProcess]:
    peer = start_peer()
    yield peer
    peer.stop()


@pytest.fixture
def fresh_peer() -> Iterator[PeerProcess]:
    """A peer process of its own, for tests that kill it."""
    peer = start_peer()
    yield peer
    peer.stop()


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    quiet_libp2p_logs()


ClientBody = Callable[[IHost, ID, trio.Nursery], Awaitable[None]]


def _run_client(peer_addr: str, body: ClientBody, *, timeout: float = 30.0) -> None:
    """Run `body(host, peer_id, nursery)` on a fresh local host connected to `peer_addr`."""

    async def main() -> None:
        host = make_host(ephemeral_identity())
        with trio.fail_after(timeout):
            async with running_host(host, ["/ip4/127.0.0.1/tcp/0"]):
                peer_id = await connect(host, peer_addr)
                async with trio.open_nursery() as nursery:
                    await body(host, peer_id, nursery)

    trio.run(main)


@pytest.fixture
def run_client() -> Callable[..., None]:
    """`run_client(peer_addr, body)`: run an async test body on a client host connected to a peer."""
    return _run_client
