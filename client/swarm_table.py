"""`petals swarm`: which blocks of a model are served by whom, and where the gaps are.

Joins the swarm as a DHT client, looks the model up by fingerprint and prints one line per daemon
and one per run of blocks with the same servers. A block counts as served only by `online`
daemons (joining ones cannot answer yet, draining ones refuse new sessions); gaps are printed as
"GAP: blocks A:B served by nobody". Exit status 1 when there is a gap, 0 otherwise. Daemons that a
verified evidence report in the DHT proves wrong (petals_protocol.evidence) are listed as FLAGGED:
clients avoid them.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import trio

from petals_protocol.evidence import EvidenceReport
from petals_protocol.models.checkpoint import Checkpoint
from petals_protocol.models.digests import default_cache_dir
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.p2p.host import load_swarm_key, make_host, running_host
from petals_protocol.signing import peer_id_to_text

from .discovery import FoundServer, join_swarm
from .members import client_identity

__all__ = ["show_swarm", "block_runs", "render_table", "swarm_document"]

SERVING_STATE = "online"
_CLIENT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)  # outbound-only in practice; libp2p wants one listener


def short_id(peer_id: str) -> str:
    """The last 8 characters: the start is the same "12D3KooW" for every Ed25519 peer."""
    return f"…{peer_id[-8:]}"


def _via(server: FoundServer) -> str:
    """"direct", or "relay" and the relays' short ids (the record's /p2p-circuit addresses)."""
    if not server.relays:
        return "relay" if server.using_relay else "direct"
    return "relay " + ",".join(short_id(r) for r in server.relays)


def block_runs(servers: Sequence[FoundServer], num_blocks: int) -> list[tuple[int, int, tuple[str, ...]]]:
    """Maximal runs [start, end) of blocks served by the same set of online peers (empty = gap)."""
    holders: list[tuple[str, ...]] = [
        tuple(sorted(s.peer_id for s in servers if s.state == SERVING_STATE and s.start <= block < s.end))
        for block in range(num_blocks)
    ]
    runs: list[tuple[int, int, tuple[str, ...]]] = []
    for block, peers in enumerate(holders):
        if runs and runs[-1][2] == peers:
            runs[-1] = (runs[-1][0], block + 1, peers)
        else:
            runs.append((block, block + 1, peers))
    return runs


def flagged_document(flagged: Sequence[EvidenceReport]) -> list[dict[str, Any]]:
    """What `--json` says about each daemon proven wrong (the report itself stays in the DHT)."""
    return [{"peer_id": r.accused_text, "start": r.start_block, "end": r.end_block,
             "witnesses": [w.peer_id_text for w in r.witnesses], "reporter": peer_id_to_text(r.reporter),
             "expires_at": r.expires_at} for r in flagged]


def swarm_document(fingerprint: str, num_blocks: int, servers: Sequence[FoundServer],
                   flagged: Sequence[EvidenceReport] = ()) -> dict[str, Any]:
    """The `--json` output: servers, per-run coverage and gaps, flagged daemons, machine-readable."""
    runs = block_runs(servers, num_blocks)
    throughput = {s.peer_id: s.throughput for s in servers}
    return {
        "model_fingerprint": fingerprint,
        "num_blocks": num_blocks,
        "servers": [asdict(s) for s in servers],
        "blocks": [
            {"start": a, "end": b, "peers": list(p), "throughput": sum(throughput[x] for x in p)} for a, b, p in runs
        ],
        "gaps": [[a, b] for a, b, p in runs if not p],
        "complete": all(p for _a, _b, p in runs),
        "flagged": flagged_document(flagged),
    }


def render_table(fingerprint: str, num_blocks: int, servers: Sequence[FoundServer], *, now: float,
                 flagged: Sequence[EvidenceReport] = ()) -> str:
    lines = [f"model {fingerprint[:16]}…  {num_blocks} blocks  {len(servers)} servers", ""]
    lines.append(f"{'peer':<10} {'name':<16} {'state':<8} {'blocks':>7} {'steps/s':>8} {'cache':>8}  {'via':<24} {'expires':>7}")
    for s in sorted(servers, key=lambda s: (s.start, s.end, s.peer_id)):
        lines.append(
            f"{short_id(s.peer_id):<10} {s.public_name[:16]:<16} {s.state:<8} {f'{s.start}:{s.end}':>7} "
            f"{s.throughput:>8.1f} {s.cache_tokens_free:>8}  {_via(s):<24} "
            f"{max(0.0, s.expires_at - now):>6.0f}s"
        )
    lines.append("")
    throughput = {s.peer_id: s.throughput for s in servers}
    for start, end, peers in block_runs(servers, num_blocks):
        if not peers:
            lines.append(f"GAP: blocks {start}:{end} served by nobody")
        else:
            who = ", ".join(short_id(p) for p in peers)
            lines.append(f"blocks {start}:{end}  {sum(throughput[p] for p in peers):.1f} block-steps/s  by {who}")
    for report in flagged:
        lines.append(f"FLAGGED: {short_id(report.accused_text)} answered blocks {report.start_block}:{report.end_block} "
                     f"wrong (report by {short_id(peer_id_to_text(report.reporter))}, witnesses "
                     f"{', '.join(short_id(w.peer_id_text) for w in report.witnesses)}; expires in "
                     f"{max(0.0, report.expires_at - now):.0f}s): clients avoid it")
    return "\n".join(lines)


async def _find(initial_peers: Sequence[str], fingerprint: str, psk: bytes | None,
                identity: tuple[Any, Any]) -> tuple[list[FoundServer], list[EvidenceReport]]:
    key_pair, admission = identity
    host = make_host(key_pair, psk=psk, admission=admission)
    async with running_host(host, _CLIENT_LISTEN), trio.open_nursery() as nursery:
        discovery = await join_swarm(host, nursery, initial_peers)
        servers = await discovery.find_servers(fingerprint)
        flagged = await discovery.find_evidence(fingerprint, [s.peer_id for s in servers])
        nursery.cancel_scope.cancel()
    return servers, flagged


def show_swarm(
    model_path: str | Path,
    initial_peers: Sequence[str],
    *,
    as_json: bool = False,
    swarm_key: str | Path | None = None,
    out: TextIO | None = None,
    revision: str | None = None,
    identity: str | Path | None = None,
    swarm_owner: str | None = None,
    member_certificate: str | Path | None = None,
) -> int:
    """Print the swarm's coverage of the model at `model_path` (a folder or a Hub id); 1 if some
    block is unserved. Reads only the model's config and index (and its manifest, if any).
    `identity` / `swarm_owner` / `member_certificate`: join a members-only swarm as a member."""
    joining = client_identity(identity, swarm_owner, member_certificate)  # a bad certificate fails first
    out = out if out is not None else sys.stdout
    checkpoint = Checkpoint(model_path, revision=revision, cache_dir=default_cache_dir())
    fingerprint = model_fingerprint(checkpoint)
    num_blocks = int(checkpoint.config.num_hidden_layers)
    psk = load_swarm_key(Path(swarm_key)) if swarm_key is not None else None
    servers, flagged = trio.run(_find, list(initial_peers), fingerprint, psk, joining)
    if as_json:
        json.dump(swarm_document(fingerprint, num_blocks, servers, flagged), out, indent=2)
        out.write("\n")
    else:
        out.write(render_table(fingerprint, num_blocks, servers, now=time.time(), flagged=flagged) + "\n")
    return 0 if all(peers for _a, _b, peers in block_runs(servers, num_blocks)) else 1
