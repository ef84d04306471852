"""The daemon's answers to the control API (petalsd/control.py serves them over the Unix socket)."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .control import ControlError, Metric

if TYPE_CHECKING:
    from .daemon import Daemon


def _path(daemon: Daemon, peer: str, conns: Any) -> str:
    """How we are connected to `peer`: "relayed", "punched" (a hole-punched direct connection) or "direct"."""
    circuit = any("/p2p-circuit" in str(a) for c in conns for a in c.get_transport_addresses())
    if circuit:
        return "relayed"
    punch = daemon.nat.punch if daemon.nat is not None else None
    return "punched" if punch is not None and peer in punch.peers else "direct"


class DaemonControl:
    """Implements control.ControlBackend by reading (and poking) the running Daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def status(self) -> dict[str, Any]:
        d = self.daemon
        ctx = d.ctx
        return {
            "peer_id": ctx.peer_id,
            "addresses": d.addrs or [],
            "model": d.config.model,
            "model_name": ctx.model_name,
            "fingerprint": ctx.fingerprint,
            "blocks": [ctx.span.start, ctx.span.end],
            "num_blocks": ctx.span.num_blocks_total,
            "dtype": ctx.dtype_name,
            "device": str(ctx.span.device),
            "state": ctx.state,
            "public_name": ctx.public_name,
            "version": ctx.version,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - d.started_at, 3),
            "sessions": len(ctx.sessions),
            "max_sessions": ctx.sessions.max_sessions,
            "cache_bytes_used": ctx.sessions.budget.used,
            "cache_bytes_total": ctx.sessions.budget.total,
            "cache_tokens_free": ctx.cache_tokens_free(),
            "throughput": ctx.throughput,
            "load": {"compute_utilisation": round(ctx.worker.stats.utilisation(), 4),
                     "queued_jobs": ctx.worker.queued,
                     "hung_seconds": ctx.worker.hung_seconds(),
                     "bulk_jobs": ctx.worker.stats.bulk_jobs,
                     "max_bulk_ahead_of_inference": ctx.worker.stats.max_bulk_ahead_of_inference},
            "limits": ctx.gate.limits.describe(),
            "peer_use": {**ctx.gate.describe(), "buffered_bytes": ctx.buffers.used,
                         "buffer_refusals": ctx.buffers.refused},
            # reachability (public/private/unknown), hop service, relays held (petalsd/reachability.py)
            "nat": d.nat.describe() if d.nat is not None else None,
            "membership": d.admission.describe() if d.admission is not None else None,
            "contributors": {**d.contributors.describe(), "served_first": ctx.worker.served_first},
            "announced_addresses": d.announce_addrs(),
        }

    async def sessions(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.daemon.ctx.sessions]

    async def peers(self) -> list[dict[str, Any]]:
        host = self.daemon.host
        if host is None:
            return []
        out = []
        for peer_id, conns in host.get_network().get_connections_map().items():
            addrs = [str(a) for a in host.get_peerstore().addrs(peer_id)] if conns else []
            out.append({"peer_id": str(peer_id), "connections": len(conns), "addresses": addrs,
                        "path": _path(self.daemon, str(peer_id), conns)})
        return out

    async def metrics(self) -> list[Metric]:
        ctx = self.daemon.ctx
        stats = ctx.worker.stats
        return [
            Metric("petalsd_sessions", "gauge", "Open inference sessions.", len(ctx.sessions)),
            Metric("petalsd_cache_bytes_used", "gauge", "KV-cache bytes reserved by sessions.", ctx.sessions.budget.used),
            Metric("petalsd_cache_bytes_total", "gauge", "KV-cache budget in bytes.", ctx.sessions.budget.total),
            Metric("petalsd_compute_jobs_total", "counter", "Torch jobs run.", stats.jobs),
            Metric("petalsd_compute_seconds_total", "counter", "Seconds spent computing.", stats.busy_seconds),
            Metric("petalsd_tokens_total", "counter", "Tokens processed (batch x length).", stats.tokens),
            *(Metric("petalsd_requests_total", "counter", "Requests served by kind.", n, {"kind": kind})
              for kind, n in ctx.stats.items()),
            Metric("petalsd_throughput", "gauge", "Announced block-steps per second.", ctx.throughput),
            Metric("petalsd_batches_total", "counter", "Batched forwards run (two steps or more).",
                   ctx.batcher.batches),
            Metric("petalsd_batched_steps_total", "counter", "Session steps that ran inside a batched forward.",
                   ctx.batcher.batched_steps),
            Metric("petalsd_pushes_total", "counter", "Steps forwarded to the next daemon of a chain.",
                   ctx.forwarder.pushes_sent if ctx.forwarder else 0),
            Metric("petalsd_push_writes_total", "counter", "Stream writes that carried them (a batch's "
                   "pushes share one).", ctx.forwarder.push_writes if ctx.forwarder else 0),
            Metric("petalsd_pushes_landed_total", "counter", "Large pushes (prefills) the next daemon confirmed "
                   "whole; the client was answered after each.", ctx.forwarder.pushes_landed if ctx.forwarder else 0),
            Metric("petalsd_timed_steps_total", "counter", "Inference steps that produced an output (the count "
                   "behind petalsd_step_seconds_total).", ctx.step_times.steps),
            *(Metric("petalsd_step_seconds_total", "counter", "Seconds inference steps spent here, by phase "
                     "(petalsd/step_times.py).", seconds, {"phase": phase})
              for phase, seconds in ctx.step_times.seconds.items()),
            Metric("petalsd_uptime_seconds", "gauge", "Seconds since start.", time.time() - self.daemon.started_at),
        ]

    async def drain(self) -> dict[str, Any]:
        d = self.daemon
        if not d.ctx.sessions.accepting:
            raise ControlError(409, "draining", "the daemon is already draining")
        assert d._nursery is not None
        d._nursery.start_soon(d.drain)
        return {"draining": True, "sessions": len(d.ctx.sessions), "grace_seconds": d.config.drain_grace}

    async def reload(self) -> dict[str, Any]:
        return await self.daemon.reload()

    async def stop(self) -> dict[str, Any]:
        self.daemon.stop()
        return {"stopping": True}
