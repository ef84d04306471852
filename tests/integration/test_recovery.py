"""Fault tolerance with real daemons: a daemon killed (SIGKILL) or hung (SIGSTOP) mid-generation,
an idle close, a vanished client. The output stays token for token what local transformers gives.

Killing tests share one pool of six daemons (two per span); before each test, replacements are
started only for the spans whose daemons that test will hurt (fewer processes than a swarm per test).
Recovery times (kill -> next token) are printed; run with -s to see them.
"""
from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dataclasses import dataclass

import pytest
import torch
import trio
from libp2p.peer.id import ID
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.ctl import request as control_request
from petals_client.localswarm import DaemonProcess, LocalSwarm
from petals_client.session import SessionFailed
from petals_protocol.messages import InfoRequest
from petals_protocol.p2p.host import connect, listen_multiaddrs, make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.streams import open_framed, open_stream
from petalsd.idle import IdleConnections

from swarmlib import KillWhenRouted, make_model, start_swarm

pytestmark = pytest.mark.integration

SPANS = ["0:2", "2:4", "4:6"]
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
NEW_TOKENS = 110
FAIL_AFTER = 30  # tokens generated before the failure
# Generous for 2 shared cores, short enough that a hung daemon (SIGSTOP) is detected quickly.
STEP_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    # No eos token: greedy generation runs the full max_new_tokens.
    return make_model(tmp_path_factory.mktemp("models"), "llama", eos_token_id=None, bos_token_id=None,
                      pad_token_id=None)


@pytest.fixture(scope="module")
def local_generate(model_path) -> Callable[[torch.Tensor, int], torch.Tensor]:
    local = AutoModelForCausalLM.from_pretrained(model_path)

    def generate(ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return local.generate(ids, max_new_tokens=new_tokens, do_sample=False)

    return generate


class Pool:
    """Daemons for each span, two where a test needs a replacement. Tests `hurt` daemons (kill or
    stop them); the fixture removes the hurt ones after the test; `ensure_two` starts replacements."""

    def __init__(self, swarm: LocalSwarm) -> None:
        self.swarm = swarm
        self.hurt: list[DaemonProcess] = []

    def live(self) -> list[DaemonProcess]:
        return [d for d in self.swarm.daemons if d not in self.hurt and d.process.poll() is None]

    def serving(self, blocks: str) -> list[DaemonProcess]:
        return [d for d in self.live() if d.blocks == blocks]

    def addrs(self) -> list[str]:
        return [d.addrs[0] for d in self.live()]

    def daemon_of(self, peer_id: str) -> DaemonProcess:
        return next(d for d in self.swarm.daemons if d.peer_id == peer_id)

    def hurt_daemon(self, daemon: DaemonProcess, signum: int) -> None:
        self.hurt.append(daemon)
        daemon.signal(signum)

    def remove_hurt(self) -> None:
        for daemon in self.hurt:
            daemon.signal(signal.SIGCONT)  # a stopped daemon must not linger
            daemon.signal(signal.SIGKILL)
            daemon.process.wait()

    def ensure_two(self, *spans: str) -> None:
        """Start replacements so that each of `spans` has two live daemons (every span keeps at
        least one between tests): a test pays only for the redundancy it is about to use up."""
        missing = [blocks for blocks in SPANS for _ in range(2 - len(self.serving(blocks)))
                   if blocks in spans or not self.serving(blocks)]
        peers = self.addrs()[:1]
        started = [self.swarm.start(blocks, initial_peers=peers, wait=False) for blocks in missing]
        for daemon in started:
            daemon.wait_ready(self.swarm.ready_timeout)


def kill_all(swarm: LocalSwarm) -> None:
    """Teardown: these tests need no clean drain, and SIGKILL saves seconds per daemon."""
    for daemon in swarm.daemons:
        daemon.signal(signal.SIGCONT)
        daemon.signal(signal.SIGKILL)
    swarm.stop()


@pytest.fixture(scope="module")
def shared_pool(model_path) -> Iterator[Pool]:
    swarm = start_swarm(model_path, SPANS + SPANS)
    yield Pool(swarm)
    kill_all(swarm)


@pytest.fixture
def pool(shared_pool: Pool) -> Iterator[Pool]:
    yield shared_pool
    shared_pool.remove_hurt()


def connect_client(path: Path, peers: list[str], **options) -> AutoDistributedModelForCausalLM:
    opts = dict(step_timeout=STEP_TIMEOUT, connect_timeout=3.0, max_retries=3)
    opts.update(options)
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, **opts)


class FailAfter:
    """A streamer that calls `action` once `tokens` new tokens have come out, and times tokens.

    `put` gets the prompt first, then each new token: so the action runs between two steps, and
    the next step is the first to meet the failure.
    """

    def __init__(self, tokens: int, action: Callable[[], None]) -> None:
        self.tokens = tokens
        self.action = action
        self.stamps: list[float] = []
        self.failed_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) - 1 == self.tokens:
            self.action()
            self.failed_at = time.perf_counter()

    def end(self) -> None:
        pass

    def recovery_seconds(self) -> float:
        """From the failure to the next token."""
        assert self.failed_at is not None
        return next(t for t in self.stamps if t > self.failed_at) - self.failed_at

    def usual_token_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps[2:], self.stamps[3:]) if a > (self.failed_at or 0) + 0.5 or
                b < (self.failed_at or 0)]
        return statistics.median(gaps)


def hurt_hops(pool: Pool, session, hops: list[int], signum: int) -> Callable[[], None]:
    def action() -> None:
        for index in hops:
            pool.hurt_daemon(pool.daemon_of(session.route[index].server.peer_id), signum)
    return action


def report(label: str, streamer: FailAfter) -> None:
    print(f"\nrecovery {label}: {streamer.recovery_seconds() * 1000:.0f} ms from failure to next token "
          f"(usual token: {streamer.usual_token_seconds() * 1000:.0f} ms)")


# ------------------------------------------------------------------------------- daemon failures

@pytest.mark.parametrize("hops, signum", [
    ([1], signal.SIGKILL),
    ([1], signal.SIGSTOP),
    ([0, 2], signal.SIGKILL),
], ids=["middle-killed", "middle-hung", "first-and-last-killed"])
def test_generation_survives_daemon_failure(pool, model_path, local_generate, hops, signum):
    pool.ensure_two(*(SPANS[i] for i in hops))
    expected = local_generate(PROMPT, NEW_TOKENS)
    with connect_client(model_path, pool.addrs()) as model, \
            model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
        streamer = FailAfter(FAIL_AFTER, hurt_hops(pool, session, hops, signum))
        before = [h.server.peer_id for h in session.route]
        out = model.generate(PROMPT, session=session, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        after = [h.server.peer_id for h in session.route]
        assert [(h.start, h.end) for h in session.route] == [(0, 2), (2, 4), (4, 6)]
        assert session.recoveries == len(hops)
        assert model.swarm.banned() == {before[i] for i in hops}
    assert out.tolist() == expected.tolist()
    for i in range(3):
        assert (after[i] != before[i]) == (i in hops)
    report(f"{'+'.join(SPANS[i] for i in hops)} {signal.Signals(signum).name}", streamer)
    if signum == signal.SIGKILL:
        assert streamer.recovery_seconds() < 3.0
    else:  # a hang is found by the step timeout
        assert STEP_TIMEOUT <= streamer.recovery_seconds() < STEP_TIMEOUT + 3.0


def test_multi_turn_session_survives_kills_between_and_during_turns(pool, model_path, local_generate):
    pool.ensure_two("2:4", "4:6")
    turn2 = torch.tensor([[7, 7, 21]])
    with connect_client(model_path, pool.addrs()) as model, model.inference_session(max_length=128) as session:
        first = model.generate(PROMPT, session=session, max_new_tokens=40, do_sample=False)
        hurt_hops(pool, session, [2], signal.SIGKILL)()  # dies while the user reads the answer
        # Dies mid-turn: its replacement replays turn 1 and this turn's tokens, chunk by chunk.
        streamer = FailAfter(30, hurt_hops(pool, session, [1], signal.SIGKILL))
        second = model.generate(turn2, session=session, max_new_tokens=60, do_sample=False, streamer=streamer)
        assert session.recoveries == 2
    ref1 = local_generate(PROMPT, 40)
    assert first.tolist() == ref1.tolist()
    ref2 = local_generate(torch.cat([ref1, turn2], dim=1), 60)
    assert second.tolist() == ref2[:, ref1.shape[1]:].tolist()
    report("multi-turn 2:4 SIGKILL", streamer)


def test_stateless_forward_retries_on_another_daemon(pool, model_path, monkeypatch):
    pool.ensure_two("2:4")
    with connect_client(model_path, pool.addrs()) as model:
        hidden = model.client_part.embed(PROMPT)
        with torch.no_grad():
            logits = model(PROMPT).logits
            middle = model.layers[2:4](hidden)
        def kill(peer_id: str) -> None:
            daemon = pool.daemon_of(peer_id)
            pool.hurt_daemon(daemon, signal.SIGKILL)
            daemon.process.wait()

        killed = KillWhenRouted(kill, start=2).install(monkeypatch).killed
        with torch.no_grad():
            assert torch.equal(model(PROMPT).logits, logits)
            assert torch.equal(model.layers[2:4](hidden), middle)
        assert len(killed) == 1 and model.swarm.banned() == {killed[0]}


def test_no_replacement_fails_fast_naming_the_blocks(pool, model_path):
    pool.ensure_two()
    with connect_client(model_path, pool.addrs(), max_retries=3) as model, model.inference_session(max_length=64) as session:
        middle = pool.serving("2:4")

        def kill_all_middle() -> None:
            for daemon in middle:
                pool.hurt_daemon(daemon, signal.SIGKILL)

        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                model.generate(PROMPT, session=session, max_new_tokens=30, do_sample=False,
                               streamer=FailAfter(5, kill_all_middle))
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        began = time.monotonic()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "generation hung after its only daemons for blocks 2:4 died"
        elapsed = time.monotonic() - began
    assert isinstance(outcome[0], SessionFailed), outcome
    assert outcome[0].blocks == (2, 4)
    assert "blocks 2:4" in str(outcome[0]) and "3 attempts" in str(outcome[0])
    assert elapsed < 15, elapsed


# ------------------------------------------------------------------------- idle closes, vanished clients

@pytest.fixture(scope="module")
def lone_daemon(model_path) -> Iterator[tuple[LocalSwarm, Path]]:
    """One daemon serving every block (so a ban would leave no route), with a control socket and a
    short session idle timeout."""
    swarm = LocalSwarm(model_path, extra_args=["--num-threads", "1", "--log-level", "info"])
    socket = swarm.workdir / "control.sock"
    try:
        swarm.start("0:6", args=["--control-socket", str(socket), "--session-idle-timeout", "2"])
    except BaseException:
        swarm.stop()
        raise
    yield swarm, socket
    kill_all(swarm)


def daemon_status(socket: Path) -> dict:
    status, _, body = control_request(str(socket), "GET", "/v1/status")
    assert status == 200, body
    return json.loads(body)


def wait_for_status(socket: Path, predicate: Callable[[dict], bool], timeout: float) -> tuple[dict, float]:
    began = time.monotonic()
    while True:
        status = daemon_status(socket)
        if predicate(status) or time.monotonic() - began > timeout:
            return status, time.monotonic() - began
        time.sleep(0.05)


def test_session_resumes_after_the_daemon_timed_it_out(lone_daemon, model_path, local_generate):
    swarm, socket = lone_daemon
    turn2 = torch.tensor([[5, 6]])
    with connect_client(model_path, swarm.addrs) as model, model.inference_session(max_length=64) as session:
        first = model.generate(PROMPT, session=session, max_new_tokens=8, do_sample=False)
        status, _ = wait_for_status(socket, lambda s: s["sessions"] == 0, timeout=6)  # idle timeout: 2 s
        assert status["sessions"] == 0 and status["cache_bytes_used"] == 0
        second = model.generate(turn2, session=session, max_new_tokens=8, do_sample=False)
        assert (session.resumes, session.recoveries) == (1, 0)
        assert not model.swarm.banned()
    ref1 = local_generate(PROMPT, 8)
    assert first.tolist() == ref1.tolist()
    assert second.tolist() == local_generate(torch.cat([ref1, turn2], dim=1), 8)[:, ref1.shape[1]:].tolist()


def test_session_resumes_after_its_connection_closed_while_idle(lone_daemon, model_path, local_generate):
    swarm, socket = lone_daemon
    turn2 = torch.tensor([[9, 1]])
    with connect_client(model_path, swarm.addrs) as model, model.inference_session(max_length=64) as session:
        first = model.generate(PROMPT, session=session, max_new_tokens=8, do_sample=False)
        time.sleep(1.2)  # longer than IDLE_RESUME_AFTER, shorter than the session idle timeout

        async def drop_connection() -> None:  # what the daemon's idle sweeper does, seen from here
            for conn in model.swarm.host.get_network().get_connections(ID.from_base58(swarm.daemons[0].peer_id)):
                await conn.close()

        model.runtime.call(drop_connection)
        status, _ = wait_for_status(socket, lambda s: s["sessions"] == 0, timeout=3)
        assert status["sessions"] == 0 and status["cache_bytes_used"] == 0
        second = model.generate(turn2, session=session, max_new_tokens=8, do_sample=False)
        assert (session.resumes, session.recoveries) == (1, 0)
        assert not model.swarm.banned()
    ref1 = local_generate(PROMPT, 8)
    assert first.tolist() == ref1.tolist()
    assert second.tolist() == local_generate(torch.cat([ref1, turn2], dim=1), 8)[:, ref1.shape[1]:].tolist()


@dataclass
class _FakeSession:
    peer: str
    steps: int = 0


def test_idle_sweeper_closes_only_idle_connections():
    """petalsd.idle with real libp2p hosts: a connection with fresh streams or session steps stays,
    one without either is closed after the timeout, and the server keeps serving."""
    timeout = 0.6

    async def echo(stream) -> None:
        async with open_framed(stream) as channel:
            async for msg in channel:
                await channel.send(msg)

    async def request(host, peer: ID, nursery: trio.Nursery) -> None:
        channel = await open_stream(host, peer, "/test/echo/1", nursery=nursery)
        try:
            await channel.send(InfoRequest())
            assert isinstance(await channel.receive(), InfoRequest)
        finally:
            await channel.aclose()

    async def main() -> None:
        server, busy, quiet = (make_host(ephemeral_identity()) for _ in range(3))
        listen = ["/ip4/127.0.0.1/tcp/0"]
        async with running_host(server, listen), running_host(busy, listen), running_host(quiet, listen), \
                trio.open_nursery() as nursery:
            server.set_stream_handler("/test/echo/1", echo)
            addr = listen_multiaddrs(server)[0]
            for client in (busy, quiet):
                await connect(client, addr)
            server_id = ID.from_base58(addr.rsplit("/p2p/", 1)[1])
            sessions = [_FakeSession(peer=str(quiet.get_id()))]
            sweeper = IdleConnections(server, sessions=lambda: sessions, timeout=lambda: timeout)
            await nursery.start(sweeper.run)

            def connected(client) -> bool:
                return bool(server.get_network().get_connections(client.get_id()))

            began = trio.current_time()
            quiet_closed_at = None
            while trio.current_time() - began < 2.0:
                await request(busy, server_id, nursery)  # a new stream: activity
                if trio.current_time() - began < 0.4:
                    sessions[0].steps += 1  # session steps: activity without new streams
                if quiet_closed_at is None and not connected(quiet):
                    quiet_closed_at = trio.current_time() - began
                await trio.sleep(0.1)
            assert connected(busy)
            # Closed after the timeout, and not much later (one sweep period, plus slack for a loaded machine).
            assert quiet_closed_at is not None and 0.4 + timeout <= quiet_closed_at <= 0.4 + 1.25 * timeout + 1.0
            with trio.fail_after(2 * timeout + 1):
                while connected(busy):  # now idle too
                    await trio.sleep(0.05)
            await request(quiet, server_id, nursery)  # a closed connection is simply re-dialled
            nursery.cancel_scope.cancel()

    trio.run(main)


CLIENT_SCRIPT = """
import sys, time, torch
from petals_client import AutoDistributedModelForCausalLM
torch.set_num_threads(1)
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
session = model.inference_session(max_length=64)
model.generate(torch.tensor([[1, 2, 3]]), session=session, max_new_tokens=2, do_sample=False)
print("open", flush=True)
time.sleep(600)
"""


def start_client(model_path: Path, addrs: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(model_path), *addrs],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_daemon_frees_vanished_clients_sessions(lone_daemon, model_path):
    """A killed client resets its streams: its session is freed at once. A hung one (SIGSTOP)
    keeps its connection open: its session is freed by the 2 s session idle timeout."""
    swarm, socket = lone_daemon
    wait_for_status(socket, lambda s: s["sessions"] == 0, timeout=5)
    clients = [start_client(model_path, swarm.addrs) for _ in range(2)]
    try:
        for client in clients:
            assert client.stdout is not None and client.stdout.readline().strip() == "open"
        status = daemon_status(socket)
        assert status["sessions"] == 2 and status["cache_bytes_used"] > 0
        per_session = status["cache_bytes_used"] // 2
        killed, hung = clients
        killed.send_signal(signal.SIGKILL)
        hung.send_signal(signal.SIGSTOP)
        status, took_killed = wait_for_status(socket, lambda s: s["sessions"] <= 1, timeout=5)
        assert status["sessions"] == 1 and status["cache_bytes_used"] == per_session
        assert took_killed < 1.0
        status, took_hung = wait_for_status(socket, lambda s: s["sessions"] == 0, timeout=6)
        assert status["sessions"] == 0 and status["cache_bytes_used"] == 0
        print(f"\nvanished clients: killed one freed after {took_killed:.2f} s, "
              f"hung one after {took_killed + took_hung:.2f} s (session idle timeout 2 s)")
    finally:
        for client in clients:
            client.send_signal(signal.SIGCONT)
            client.kill()
            client.wait()
