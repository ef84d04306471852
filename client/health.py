"""The swarm health page: who serves which blocks, gaps, load, latency, and how to join.

`swarm_snapshot` gathers the data from the swarm as a client sees it: the daemons' signed DHT
records (state, reachability) and a direct info probe of each (version, and the client's own
measured round-trip time). `render_page` puts that data into one self-contained HTML page
(client/health.html: plain HTML, a small script, no external resources, so it works offline);
the script draws the tables from the data embedded in the page and, when the page is served
live by `petals serve`, re-fetches `health.json` periodically. `petals swarm --html FILE` writes
the same page once.
"""
from __future__ import annotations

import json
import shlex
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import trio

from petals_protocol.models.checkpoint import Checkpoint
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.p2p.host import load_swarm_key, make_host, running_host

from .swarm import SwarmClient
from .swarm_table import block_runs

__all__ = ["swarm_snapshot", "render_page", "write_health_page"]

#: Seconds between the live page's refreshes.
REFRESH_SECONDS = 5
_CLIENT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)


def _command(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _most_needed(runs: list[tuple[int, int, tuple[str, ...]]], throughput: dict[str, float]) -> tuple[int, int] | None:
    """The blocks a new daemon should serve: the widest gap, else the run with the least throughput."""
    gaps = [(a, b) for a, b, peers in runs if not peers]
    if gaps:
        return max(gaps, key=lambda g: g[1] - g[0])
    if not runs:
        return None
    a, b, _ = min(runs, key=lambda r: (sum(throughput.get(p, 0.0) for p in r[2]), r[0]))
    return a, b


def how_to_join(model: str, initial_peers: Sequence[str], needed: tuple[int, int] | None,
                api_url: str | None, api_key_required: bool = False) -> dict[str, str]:
    """The command lines shown on the page, with this swarm's bootstrap addresses."""
    peers = list(initial_peers)
    blocks = ["--blocks", f"{needed[0]}:{needed[1]}"] if needed else []
    lines = {
        "daemon": _command("petalsd", "--model", model, *blocks, "--initial-peers", *peers),
        "generate": _command("petals", "generate", "--model", model, "--initial-peers", *peers, "Hello"),
        "python": (f"model = AutoDistributedModelForCausalLM.from_pretrained({model!r}, initial_peers={peers!r})"),
        "serve": _command("petals", "serve", "--model", model, "--initial-peers", *peers, "--port", "8000"),
    }
    if api_url:
        auth = ' -H "Authorization: Bearer $PETALS_API_KEY"' if api_key_required else ""
        lines["curl"] = f"curl{auth} {api_url}/v1/models"
        key = "os.environ['PETALS_API_KEY']" if api_key_required else "'none'"
        lines["openai"] = f"client = openai.OpenAI(base_url={api_url + '/v1'!r}, api_key={key})"
    return lines


async def swarm_snapshot(swarm: SwarmClient, *, model: str, num_blocks: int, api_url: str | None = None,
                         api_key_required: bool = False, live: bool = False) -> dict[str, Any]:
    """What the page shows, as JSON-ready data (also served as /health.json). Probes every daemon."""
    await swarm.refresh()
    records = {r.peer_id: r for r in swarm.records}
    probed = {s.peer_id: s for s in swarm.servers()}
    servers = []
    for peer in sorted(set(records) | set(probed)):
        record, info = records.get(peer), probed.get(peer)
        known = info or record
        assert known is not None
        servers.append({
            "peer_id": peer,
            "name": known.public_name,
            "state": known.state,
            "start": known.start,
            "end": known.end,
            "throughput": known.throughput,
            "cache_tokens_free": known.cache_tokens_free,
            "reachability": ("relayed" if record.using_relay else "direct") if record else "unknown",
            "version": info.version if info else "",
            "latency_ms": round(info.rtt * 1000, 1) if info and info.rtt is not None else None,
            "addrs": list(known.addrs),
            "answered": info is not None,
        })
    servers.sort(key=lambda s: (s["start"], s["end"], s["peer_id"]))
    listed = [probed.get(s["peer_id"]) or records[s["peer_id"]] for s in servers]
    runs = block_runs(listed, num_blocks)
    throughput = {s["peer_id"]: s["throughput"] for s in servers}
    needed = _most_needed(runs, throughput)
    return {
        "model": model,
        "model_name": Path(model).name or model,
        "model_fingerprint": swarm.model_fingerprint,
        "num_blocks": num_blocks,
        "servers": servers,
        "blocks": [{"start": a, "end": b, "peers": list(p), "throughput": sum(throughput[x] for x in p)}
                   for a, b, p in runs],
        "gaps": [[a, b] for a, b, p in runs if not p],
        "complete": all(p for _a, _b, p in runs),
        "most_needed": list(needed) if needed else None,
        "join": how_to_join(model, swarm.initial_peers, needed, api_url, api_key_required),
        "generated_at": time.time(),
        "live": live,
        "refresh_seconds": REFRESH_SECONDS,
    }


def render_page(data: dict[str, Any]) -> str:
    """The page with `data` embedded (escaped so that no value can end the script element)."""
    template = resources.files(__package__).joinpath("health.html").read_text(encoding="utf-8")
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return template.replace("__SWARM_DATA__", payload)


async def _collect(model: str, initial_peers: Sequence[str], psk: bytes | None,
                   identity: tuple[Any, Any]) -> dict[str, Any]:
    path = Path(model)
    key_pair, admission = identity
    host = make_host(key_pair, psk=psk, admission=admission)
    async with running_host(host, _CLIENT_LISTEN), trio.open_nursery() as nursery:
        from .discovery import join_swarm

        swarm = SwarmClient(host=host, nursery=nursery, model_fingerprint=model_fingerprint(path),
                            initial_peers=list(initial_peers))
        swarm.discovery = await join_swarm(host, nursery, initial_peers)
        data = await swarm_snapshot(swarm, model=model, num_blocks=int(Checkpoint(path).config.num_hidden_layers))
        nursery.cancel_scope.cancel()
    return data


def write_health_page(model: str, initial_peers: Sequence[str], out: str | Path, *,
                      swarm_key: str | Path | None = None, identity: str | Path | None = None,
                      swarm_owner: str | None = None, member_certificate: str | Path | None = None) -> int:
    """`petals swarm --html FILE`: write the page once; exit status 1 if some block is unserved.
    `identity` / `swarm_owner` / `member_certificate`: join a members-only swarm as a member."""
    from .members import client_identity

    joining = client_identity(identity, swarm_owner, member_certificate)
    psk = load_swarm_key(Path(swarm_key)) if swarm_key is not None else None
    data = trio.run(_collect, model, list(initial_peers), psk, joining)
    Path(out).write_text(render_page(data), encoding="utf-8")
    return 0 if data["complete"] else 1
