"""`petals swarm`: a real swarm in a background thread, the table and the JSON a user sees."""
from __future__ import annotations

import io
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from petals_client.discovery import FoundServer
from petals_client.swarm_table import block_runs, render_table, show_swarm, swarm_document
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.models.synthetic import make_random_checkpoint
from petalsd.announce import Announcer

from discovery_swarm import make_record, swarm

LAYERS = 6


def found(peer: str, start: int, end: int, state: str = "online", throughput: float = 5.0) -> FoundServer:
    return FoundServer(peer_id=peer, addrs=(), start=start, end=end, throughput=throughput, cache_tokens_free=64,
                       state=state, public_name="vol", using_relay=peer.endswith("R"), expires_at=time.time() + 60)


def test_runs_gaps_and_document() -> None:
    servers = [found("12D3KooWaaaaaaaaA", 0, 3), found("12D3KooWbbbbbbbbR", 2, 4),
               found("12D3KooWccccccccC", 4, 6, state="joining")]
    assert [(a, b, len(p)) for a, b, p in block_runs(servers, LAYERS)] == [(0, 2, 1), (2, 3, 2), (3, 4, 1), (4, 6, 0)]
    text = render_table("ab" * 32, LAYERS, servers, now=time.time())
    assert "GAP: blocks 4:6 served by nobody" in text
    assert "relay" in text and "joining" in text and "…bbbbbbbR" in text
    doc = swarm_document("ab" * 32, LAYERS, servers)
    assert doc["gaps"] == [[4, 6]] and doc["complete"] is False
    assert doc["blocks"][1] == {"start": 2, "end": 3, "peers": ["12D3KooWaaaaaaaaA", "12D3KooWbbbbbbbbR"],
                                "throughput": 10.0}
    json.dumps(doc)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_layers=LAYERS, hidden_size=16,
                                  num_heads=2, vocab_size=32)


def _serve(fingerprint: str, spans: list[tuple[int, int]], ready: queue.Queue, stop: threading.Event) -> None:
    async def main() -> None:
        async with swarm(len(spans) + 1) as sw:
            for daemon, (start, end) in zip(sw.servers[1:], spans, strict=True):
                announcer = Announcer(daemon.host, daemon.dht, daemon.signer, daemon.peer_id_text,
                                      lambda d=daemon, s=start, e=end: make_record(
                                          d, start=s, end=e, fingerprint=fingerprint, num_blocks=LAYERS),
                                      period=30.0, ttl=60.0)
                assert await announcer.announce_once()
            ready.put(sw.servers[0].addr)
            while not stop.is_set():
                await trio.sleep(0.05)

    try:
        trio.run(main)
    except BaseException as exc:
        ready.put(exc)
        raise


@pytest.fixture
def running_swarm(model: Path) -> Iterator[Callable[[list[tuple[int, int]]], str]]:
    threads: list[tuple[threading.Thread, threading.Event]] = []

    def start(spans: list[tuple[int, int]]) -> str:
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        thread = threading.Thread(target=_serve, args=(model_fingerprint(model), spans, ready, stop), daemon=True)
        thread.start()
        threads.append((thread, stop))
        addr = ready.get(timeout=60)
        if isinstance(addr, BaseException):
            raise addr
        return addr

    yield start
    for thread, stop in threads:
        stop.set()
        thread.join(timeout=30)


def test_show_swarm_reports_gaps_with_exit_status_1(model: Path, running_swarm) -> None:
    addr = running_swarm([(0, 2), (1, 4)])
    out = io.StringIO()
    assert show_swarm(model, [addr], out=out) == 1
    text = out.getvalue()
    assert "GAP: blocks 4:6 served by nobody" in text
    assert "blocks 1:2" in text and "2 servers" in text

    out = io.StringIO()
    assert show_swarm(model, [addr], as_json=True, out=out) == 1
    doc = json.loads(out.getvalue())
    assert doc["gaps"] == [[4, 6]] and len(doc["servers"]) == 2 and doc["num_blocks"] == LAYERS


def test_show_swarm_complete_swarm_exits_0(model: Path, running_swarm) -> None:
    addr = running_swarm([(0, 3), (3, 6)])
    out = io.StringIO()
    assert show_swarm(model, [addr], out=out) == 0
    assert "GAP" not in out.getvalue()


def test_relayed_daemons_show_their_relays() -> None:
    """A record with /p2p-circuit addresses: `petals swarm` says relayed and through whom."""
    import dataclasses

    from petals_protocol.p2p.identity import ephemeral_identity, peer_id

    relays = [str(peer_id(ephemeral_identity())) for _ in range(2)]
    keys = ephemeral_identity()
    me = str(peer_id(keys))
    addrs = tuple(f"/ip4/198.51.100.1/tcp/{4000 + i}/p2p/{r}/p2p-circuit/p2p/{me}" for i, r in enumerate(relays))
    record = dataclasses.replace(make_record(keys, addrs=addrs), using_relay=True, reachability="private")
    server = FoundServer.from_record(record)
    assert server.relays == tuple(relays) and server.reachability == "private"
    assert server.via == f"relay {relays[0]},{relays[1]}"
    direct = FoundServer.from_record(make_record(ephemeral_identity()))
    assert direct.relays == () and direct.via == "direct"
    text = render_table("ab" * 32, LAYERS, [server, direct], now=time.time())
    assert f"relay …{relays[0][-8:]},…{relays[1][-8:]}" in text and "direct" in text
