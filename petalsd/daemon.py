"""The daemon: one trio nursery that owns the host, the handlers, the announcer and the control API.

Lifecycle (each step logs one line):
  load identity -> load the span (progress bar or log lines) -> fingerprint -> measure throughput
  -> start the libp2p host and handlers -> print `ready` with full multiaddrs, READY=1
  -> serve ... SIGTERM/SIGINT or POST /v1/stop: drain (refuse new sessions, announce OFFLINE,
  let running sessions finish for up to `drain_grace` seconds) -> STOPPING=1 -> exit 0.
SIGHUP (or POST /v1/reload) re-reads the configuration and applies what can change live.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from petals_protocol.errors import ErrorCode, FrameTooLarge, PetalsError, ProtocolError
from petals_protocol.ids import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    __version__,
)
from petals_protocol.messages import ErrorReply, error_reply
from petals_protocol.models.checkpoint import Checkpoint
from petals_protocol.models.digests import default_cache_dir
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.models.source import HubRepo
from petals_protocol.models.span import Span, block_bytes, load_span, span_shards
from petals_protocol.p2p.host import listen_multiaddrs, load_swarm_key, make_host, running_host
from petals_protocol.heap import settle_heap
from petals_protocol.localpaths import default_control_socket
from petals_protocol.threads import set_torch_threads
from petals_protocol.p2p.identity import (
    IdentityClaim,
    claim_free_identity,
    claim_identity,
    ed25519_private_key,
    peer_id as peer_id_of,
)
from petals_protocol.p2p import compat
from petals_protocol.p2p.budget import ByteBudget
from petals_protocol.p2p.admission import AdmissionGate, keep_membership, load_gate, read_certificate
from petals_protocol.p2p.dht import (
    find_model_records,
    find_revocations,
    find_server_record,
    put_record,
    start_dht,
    stored_revocations,
)
from petals_protocol.membership import NotAMember, revocations_key, shown_certificate
from petals_protocol.p2p.streams import StreamClosed, open_framed
from petals_protocol.records import ServerRecord
from petals_protocol.signing import peer_id_from_text

from . import config as config_mod
from .adapters import Adapter, attach, load_adapters
from .announce import Announcer
from .banning import Banning
from .batching import Batcher, BatchingConfig
from .compute import ComputeWorker
from .contributors import Contributors
from .config import DaemonConfig
from .idle import IdleConnections
from .limits import LimitExceeded, PeerGate, ResourceLimits
from .forwarding import Forwarder
from .handlers import Limits, ServingContext, serve_inference, serve_info, serve_stateless
from .notify import Notifier
from .neighbours import NextDaemons
from .placement import choose_span, default_num_blocks, should_move
from .reachability import DIALBACK_PROTOCOL, DialbackServer, NatTraversal
from .sessions import CacheBudget, SessionTable

log = logging.getLogger("petalsd")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Seconds between lookups of the swarm's records for the forwarder (a daemon not yet seen is
#: looked up on its first push anyway).
MEMBERS_PERIOD = 15.0
#: Room in a frame for everything but its tensors (ids, fields, a push list, hypo_ids).
MESSAGE_OVERHEAD = 64 * 1024


class StartupError(PetalsError):
    """A fatal problem before serving (bad model path, port in use, unreadable identity)."""


def default_identity_dir() -> Path:
    """Where key files live when --identity is not given (see `claim_free_identity`)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "petalsd"


def choose_dtype(config: DaemonConfig, checkpoint: Checkpoint, device: str) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    declared = getattr(checkpoint.config, "dtype", None) or getattr(checkpoint.config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    if device == "cpu" and name == "float16":
        return torch.float32  # fp16 matmuls are slow or missing on CPUs
    return DTYPES.get(name, torch.float32)


def parse_blocks(config: DaemonConfig, num_blocks: int) -> tuple[int, int]:
    assert config.blocks is not None
    start, end = (int(x) for x in config.blocks.split(":"))
    if not 0 <= start < end <= num_blocks:
        raise StartupError(f"--blocks {start}:{end} is not within the model's {num_blocks} blocks")
    return start, end


def _progress_reporter(total_label: str) -> Callable[[int, int], None]:
    """A tqdm bar in a terminal; one log line per block under systemd or in a pipe."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: list[Any] = []

        def show(done: int, total: int) -> None:
            if not bar:
                bar.append(tqdm(total=total, desc=total_label, unit="block", file=sys.stderr))
            bar[0].update(done - bar[0].n)
            if done == total:
                bar[0].close()

        return show

    def log_line(done: int, total: int) -> None:
        log.info("%s: block %d/%d", total_label, done, total)

    return log_line


def measure_throughput(span: Span, steps: int = 5) -> float:
    """Block-steps per second of a single-token decode step (what routing divides by)."""
    with torch.inference_mode():
        cache = span.new_cache(1, steps + 1)
        hidden = torch.zeros(1, 1, span.hidden_size, dtype=span.dtype, device=span.device)
        span.forward(hidden, cache)
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            span.forward(hidden, cache)
            times.append(time.perf_counter() - begin)
    return (span.end - span.start) / max(statistics.median(times), 1e-6)


@dataclass
class Daemon:
    config: DaemonConfig
    argv: list[str]
    identity: IdentityClaim
    notifier: Notifier
    started_at: float
    checkpoint: Checkpoint
    fingerprint: str
    dtype: torch.dtype
    blocks: tuple[int, int] | None  # None: chosen from the swarm (--num-blocks or the default)
    device: str  # config.device with "auto" resolved; the config keeps "auto" so reloads compare equal
    ctx: ServingContext | None = None  # set once the span is loaded
    host: Any = None
    addrs: list[str] | None = None
    announcer: Announcer | None = None
    next_daemons: NextDaemons | None = None  # round trips to the next span's daemons, for the record
    serving_shards: set[str] = field(default_factory=set)  # the shards of the loaded span (disk eviction)
    banning: Banning | None = None
    nat: NatTraversal | None = None
    admission: AdmissionGate | None = None  # members-only swarm (--swarm-owner)
    certificate: bytes | None = None  # --member-certificate, shown in info replies
    contributors: Contributors = field(default_factory=Contributors)  # served first when busy
    adapters: list[Adapter] = field(default_factory=list)  # --adapters, checked at start (petalsd/adapters.py)
    _stop: trio.Event | None = None
    _nursery: trio.Nursery | None = None

    def __post_init__(self) -> None:
        self.key_pair = self.identity.key_pair
        self.signer = ed25519_private_key(self.key_pair)
        self.peer_id = peer_id_of(self.key_pair).to_base58()
        self.peer_id_bytes = peer_id_from_text(self.peer_id)
        if self.config.swarm_owner is not None:
            try:
                self.admission = load_gate(self.config.swarm_owner, self.config.member_certificate,
                                           self.peer_id_bytes)
            except NotAMember as exc:
                raise StartupError(f"members-only swarm: {exc}") from exc
            self.certificate = self.admission.membership.certificate
        elif self.config.member_certificate is not None:  # an open swarm: shown to clients choosing by issuer
            try:
                self.certificate = read_certificate(self.config.member_certificate)
                shown_certificate(self.certificate, self.peer_id_bytes, time.time())
            except NotAMember as exc:
                raise StartupError(f"--member-certificate: {exc}") from exc

    # ------------------------------------------------------------------ stream handlers
    def _handler(self, serve: Callable[[ServingContext, Any], Awaitable[None]],
                 large: frozenset[str] = frozenset(), tensors: int = 1) -> Callable[[Any], Awaitable[None]]:
        """A stream handler for `serve`. Frames are checked before their bodies are buffered: none
        may exceed what the largest valid message of this protocol needs (`tensors` hidden-state
        tensors of the largest batch and length allowed, or none), and a frame over 64 KiB must
        be one of the `large` message tags. Every byte buffered is charged to the peer's share."""

        def admit(length: int, tag: str | None) -> None:
            if tag not in large:
                raise FrameTooLarge(f"a {length}-byte frame of {'type ' + repr(tag) if tag else 'no known type'}: "
                                    f"only {', '.join(sorted(large)) or 'no message'} may be that large here")

        async def handle(stream: Any) -> None:
            # libp2p runs handlers inside its connection's service: an exception escaping here would
            # take down the whole daemon. So nothing escapes but cancellation; every outcome is logged.
            ctx = self.ctx
            assert ctx is not None
            limits = ctx.limits
            tensor_bytes = limits.max_batch_size * limits.max_length * ctx.span.hidden_size * ctx.span.dtype.itemsize
            max_frame = min(self.config.max_frame_size, tensors * tensor_bytes + MESSAGE_OVERHEAD)
            try:
                # Requests and replies alternate on our protocols, so a peer never needs more than a
                # couple of frames queued: this bounds what one stream can make us hold to 3 frames.
                async with open_framed(stream, max_frame_size=max_frame, max_buffered_frames=2,
                                       budget=ctx.buffers, admit=admit) as channel:
                    peer = channel.peer_id or "?"
                    if ctx.gate.banned(peer):  # cut off: not a word, and its connection goes too
                        self._cut(peer)
                        await channel.reset()
                        return
                    try:
                        with ctx.gate.stream(peer):
                            await self._serve_channel(serve, channel)
                    except LimitExceeded as exc:  # a per-peer limit: say so (busy), then hang up
                        log.info("refused stream peer=%s: %s", channel.peer_id, exc)
                        self._strike(peer)
                        await self._try_send(channel, error_reply(exc))
            except Exception as exc:  # noqa: BLE001 - closing a dead stream; groups from the pump
                log.debug("stream ended with %r", exc)

        return handle

    async def _serve_channel(self, serve: Callable[[ServingContext, Any], Awaitable[None]], channel: Any) -> None:
        try:
            await serve(self.ctx, channel)
        except StreamClosed:
            return  # the peer went away; its session (if any) was released by the handler
        except ProtocolError as exc:  # the peer sent bytes we cannot parse: say so, then hang up
            log.info("bad input peer=%s: %s", channel.peer_id, exc)
            self._strike(channel.peer_id or "?")
            await self._try_send(channel, error_reply(exc))
        except Exception:  # a bug of ours: the client gets "internal", everyone else keeps being served
            log.exception("internal error serving peer=%s", channel.peer_id)
            await self._try_send(channel, error_reply(ErrorCode.INTERNAL, "internal error in the daemon"))

    def _strike(self, peer: str) -> None:
        """One more protocol error or refusal of `peer`; past its strikes it is cut off."""
        assert self.ctx is not None
        if self.ctx.gate.strike(peer):
            log.warning("peer=%s cut off for %.0f s: more than %d protocol errors or refusals a minute", peer,
                        self.ctx.gate.limits.peer_ban_seconds, self.ctx.gate.limits.peer_strikes)
            self._cut(peer)

    def _cut(self, peer: str) -> None:
        if self.banning is not None:
            self.banning.cut(peer)

    @staticmethod
    async def _try_send(channel: Any, msg: ErrorReply) -> None:
        with trio.move_on_after(1.0):
            try:
                await channel.send(msg)
            except PetalsError:
                pass  # the stream is already gone

    # ------------------------------------------------------------------ lifecycle
    def _compute_healthy(self) -> bool:
        """False while a compute job runs past step_timeout (the watchdog then stops pinging)."""
        return self.ctx is None or self.ctx.worker.hung_seconds() is None

    def status_line(self) -> str:
        if self.ctx is None:
            return "starting"
        hung = self.ctx.worker.hung_seconds()
        if hung is not None:
            return f"compute job running for {hung:.0f} s, past step_timeout: hung"
        return (f"serving blocks {self.ctx.span.start}:{self.ctx.span.end}, "
                f"{len(self.ctx.sessions)} sessions, state {self.ctx.state}")

    async def drain(self) -> None:
        """Refuse new sessions, announce OFFLINE, let running ones finish (up to drain_grace), then stop."""
        if self.ctx is None:
            self.stop()
            return
        if not self.ctx.sessions.accepting:
            return
        log.info("draining: refusing new sessions, %d open, grace %.0f s", len(self.ctx.sessions),
                 self.config.drain_grace)
        self.ctx.sessions.accepting = False
        self.ctx.state = "draining"
        self.notifier.status("draining: " + self.status_line())
        if self.announcer is not None:
            # In the background: the drain proceeds (and may finish) while the record spreads.
            self._nursery.start_soon(self._announce_offline)
        with trio.move_on_after(self.config.drain_grace):
            while len(self.ctx.sessions):
                await trio.sleep(0.05)
        if len(self.ctx.sessions):
            log.info("drain grace over: closing %d sessions", len(self.ctx.sessions))
        with trio.move_on_after(3):  # let the OFFLINE record reach the peers we know
            while self.announcer is not None and self.announcer.last_record is not None \
                    and self.announcer.last_record.state != "offline":
                await trio.sleep(0.05)
        self.stop()

    async def _announce_offline(self) -> None:
        assert self.announcer is not None
        with trio.move_on_after(10):
            stored = await self.announcer.announce_offline()
            log.info("announced OFFLINE peer=%s (%s)", self.peer_id, "stored" if stored else "no peer stored it")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def reload(self) -> dict[str, list[str]]:
        self.notifier.reloading()
        try:
            new = config_mod.load_config(self.argv)
        except config_mod.ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.notifier.ready()
            return {"applied": [], "needs_restart": [], "error": [str(exc)]}  # type: ignore[dict-item]
        applied, needs_restart = config_mod.diff_reload(self.config, new)
        self.config = config_mod.reloaded(self.config, new)
        self.apply_live_config()
        log.info("reloaded: applied %s; needs restart: %s", applied or "nothing", needs_restart or "nothing")
        self.notifier.ready()
        self.notifier.status(self.status_line())
        return {"applied": applied, "needs_restart": needs_restart}

    def apply_live_config(self) -> None:
        c = self.config
        if self.ctx is None:
            return
        self.ctx.limits.max_length = c.max_length
        self.ctx.limits.max_batch_size = c.max_batch_size
        self.ctx.limits.session_idle_timeout = c.session_idle_timeout
        self.ctx.limits.step_timeout = c.step_timeout
        self.ctx.sessions.max_sessions = c.max_sessions
        self.ctx.sessions.max_per_peer = c.max_sessions_per_peer
        self.ctx.sessions.budget.total = c.cache_budget  # may go below what is held: budget.free says 0
        self.ctx.gate.limits = ResourceLimits.from_config(c)
        self.ctx.buffers.per_peer, self.ctx.buffers.total = c.max_buffered_per_peer, c.max_buffered_total
        self.ctx.public_name = c.public_name
        logging.getLogger().setLevel(c.log_level.upper())

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    assert self._nursery is not None
                    self._nursery.start_soon(self.drain)

    async def _status_updates(self) -> None:
        while True:
            self.notifier.status(self.status_line())
            await trio.sleep(5)

    # ------------------------------------------------------------------ discovery
    def make_record(self) -> ServerRecord:
        """What we announce; the announcer sets seq and expiry."""
        ctx = self.ctx
        assert ctx is not None
        return ServerRecord(
            peer_id=peer_id_from_text(ctx.peer_id), model_fingerprint=ctx.fingerprint, model_name=ctx.model_name,
            start_block=ctx.span.start, end_block=ctx.span.end, num_blocks=ctx.span.num_blocks_total,
            state="online" if ctx.state == "online" else ("joining" if ctx.state == "joining" else "offline"),
            throughput=ctx.throughput, cache_tokens_free=ctx.cache_tokens_free(),
            addrs=tuple(self.announce_addrs()[:16]), public_name=ctx.public_name, version=ctx.version,
            expires_at=time.time() + self.config.record_ttl, seq=0,
            using_relay=self.nat is not None and self.nat.using_relay,
            reachability=self.nat.reachability if self.nat is not None else None,
            clients=tuple(peer_id_from_text(p) for p in self.config.own_clients) or None,
            adapters=ctx.adapters or None,
            next_rtts=self.next_daemons.measured() if self.next_daemons is not None else None,
        )

    def announce_addrs(self) -> list[str]:
        """What the record lists: the direct addresses, or relayed ones when we are not reachable."""
        direct = self.direct_addrs()
        return self.nat.announce_addrs(direct) if self.nat is not None else direct

    def direct_addrs(self) -> list[str]:
        """Operator-given announce addresses first, then what we listen on (minus the unspecified)."""
        suffix = f"/p2p/{self.peer_id}"
        given = [a if "/p2p/" in a else a + suffix for a in self.config.announce_addrs]
        listening = [a for a in (self.addrs or []) if "/ip4/0.0.0.0/" not in a and "/ip6/::/" not in a]
        return given + [a for a in listening if a not in given]

    def _nat_traversal(self, dht: Any) -> NatTraversal:
        """Reachability and relays (petalsd/reachability.py), fed from the swarm's records."""
        from petals_protocol.p2p.relay import RelayLimitsConfig, is_circuit

        c = self.config

        async def others() -> list[ServerRecord]:
            return [r for r in await find_model_records(dht, self.fingerprint)
                    if r.peer_id != self.peer_id_bytes and r.state != "offline"]

        def direct(record: ServerRecord) -> list[str]:
            suffix = f"/p2p/{record.peer_id_text}"
            return [a if a.endswith(suffix) else a + suffix for a in record.addrs if not is_circuit(a)]

        async def helpers() -> list[str]:
            found = [a for r in await others() for a in direct(r)[:1]]
            return list(dict.fromkeys([*c.initial_peers, *found]))

        async def relay_candidates() -> list[str]:
            return [a for r in await others() if r.reachability == "public" for a in direct(r)[:1]]

        def on_change() -> None:
            if self.announcer is not None:
                self.announcer.request_announce()

        limits = RelayLimitsConfig(max_reservations=c.relay_max_reservations, max_circuits=c.relay_max_circuits,
                                   circuit_duration=c.relay_circuit_duration, circuit_data=c.relay_circuit_data,
                                   max_bandwidth=c.relay_max_bandwidth, circuit_bandwidth=c.relay_circuit_bandwidth)
        return NatTraversal(self.host, c.reachability, self.direct_addrs,
                            helpers, relay_candidates, on_change, relays=tuple(c.relay),
                            relay_service=c.relay_service, limits=limits, hole_punching=c.hole_punching)

    async def _place(self, dht: Any) -> tuple[int, int]:
        """--num-blocks: the span whose blocks the swarm serves least (by announced throughput)."""
        num_blocks = self.checkpoint.config.num_hidden_layers
        n = min(self.config.num_blocks or self._blocks_that_fit(num_blocks), num_blocks)
        records = [r for r in await find_model_records(dht, self.fingerprint) if r.peer_id != self.peer_id_bytes]
        start, end = choose_span(records, num_blocks, n)
        log.info("placement peer=%s: %d daemons known, chose blocks %d:%d of %d", self.peer_id, len(records),
                 start, end, num_blocks)
        return start, end

    def _blocks_that_fit(self, num_blocks: int) -> int:
        """Default span length: what fits in this machine's memory, leaving headroom."""
        one_block = max(1, block_bytes(self.checkpoint.config, self.dtype))  # from the config: no shard needed
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") - self.config.cache_budget
        return default_num_blocks(max(memory, one_block), one_block)

    async def _rebalance(self, dht: Any, announcer: Announcer) -> None:
        """Every rebalance_period: move if the swarm's weakest block would clearly gain (never uncovering one)."""
        while True:
            await trio.sleep(self.config.rebalance_period)
            ctx = self.ctx
            assert ctx is not None
            if not ctx.sessions.accepting:
                return
            records = [r for r in await find_model_records(dht, self.fingerprint) if r.state != "offline"]
            target = should_move(records, self.make_record(), ctx.span.num_blocks_total, self.config.balance_quality)
            log.debug("rebalance check peer=%s: %d records, move to %s", self.peer_id, len(records), target)
            if target is None:
                continue
            if len(ctx.sessions):
                log.info("rebalance peer=%s: would move to %d:%d but %d sessions are open; later", self.peer_id,
                         target[0], target[1], len(ctx.sessions))
                continue
            log.info("rebalance peer=%s: moving from %d:%d to %d:%d", self.peer_id, ctx.span.start, ctx.span.end,
                     *target)
            span, throughput = await trio.to_thread.run_sync(self.load, *target)
            ctx.span, ctx.throughput = span, throughput
            ctx.batcher = Batcher(ctx.worker, span, BatchingConfig(enabled=self.config.batching))
            announcer.request_announce()

    async def _keep_membership(self, dht: Any, gate: AdmissionGate, *,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Members-only swarm: follow the owner's revocation list, every record period (one period
        is how long a revoked member can keep its connections)."""
        owner = gate.membership.owner
        log.info("members-only swarm peer=%s owner=%s", self.peer_id, gate.describe()["owner"])
        await keep_membership(self.host, gate, fetch=functools.partial(find_revocations, dht, owner),
                              store=functools.partial(put_record, dht, revocations_key(owner)),
                              local=functools.partial(stored_revocations, dht, owner),
                              period=self.config.announce_period, task_status=task_status)

    async def _learn_members(self, dht: Any) -> None:
        """Keep the forwarder's view of the swarm fresh (who may be pushed to, at which addresses)."""
        while True:
            assert self.ctx is not None and self.ctx.forwarder is not None
            with trio.move_on_after(MEMBERS_PERIOD):
                records = await find_model_records(dht, self.fingerprint)
                self.ctx.forwarder.learn(records)
                self.contributors.learn(records)
                if self.next_daemons is not None:
                    self.next_daemons.learn(records, self.ctx.span.end)
            await trio.sleep(MEMBERS_PERIOD)

    # ------------------------------------------------------------------ serving
    def load(self, start: int, end: int) -> tuple[Span, float]:
        """Load blocks [start, end) and measure their throughput (blocking: run in a thread)."""
        self.notifier.status(f"loading blocks {start}:{end}")
        log.info("loading peer=%s model=%s blocks=%d:%d dtype=%s device=%s", self.peer_id, self.config.model,
                 start, end, str(self.dtype).removeprefix("torch."), self.device)
        shards = span_shards(self.checkpoint, start, end)
        self._make_room(shards | self.serving_shards)  # before fetching: the old span serves until replaced
        span = load_span(self.checkpoint, start, end, dtype=self.dtype, device=self.device,
                         progress=_progress_reporter(f"loading blocks {start}:{end}"))
        if self.adapters:
            log.info("adapters peer=%s blocks=%d:%d: %s", self.peer_id, start, end,
                     " ".join(attach(span, self.adapters)))
        self.serving_shards = shards
        self._make_room(shards)
        if self.config.batching:
            packed = span.pack_for_batching()
            log.info("batching peer=%s blocks=%d:%d: %s", self.peer_id, start, end,
                     f"linear weights packed for oneDNN, {packed / 2**20:.1f} MiB more" if packed else
                     "linear weights not packed (needs CPU, fp32/bf16, oneDNN): batches use F.linear")
        throughput = measure_throughput(span) if self.config.throughput == "auto" else float(self.config.throughput)
        log.info("loaded peer=%s blocks=%d:%d weights=%.1f MiB throughput=%.1f block-steps/s", self.peer_id,
                 start, end, span.weight_bytes / 2**20, throughput)
        log.info("heap peer=%s: %d objects frozen, out of full garbage collections", self.peer_id, settle_heap())
        return span, throughput

    def _make_room(self, keep: set[str]) -> None:
        """max_disk_space: delete cached shards of a Hub model outside ``keep`` until under the limit."""
        source = self.checkpoint.source
        if self.config.max_disk_space is None or not isinstance(source, HubRepo):
            return
        evicted = source.evict(keep, self.config.max_disk_space)
        if evicted:
            log.info("disk peer=%s: deleted cached shards %s (max_disk_space %d bytes)", self.peer_id,
                     " ".join(evicted), self.config.max_disk_space)

    def _context(self, span: Span, throughput: float, worker: ComputeWorker) -> ServingContext:
        c = self.config
        return ServingContext(
            span=span, fingerprint=self.fingerprint, model_name=Path(c.model).name, peer_id=self.peer_id,
            signer=self.signer,
            sessions=SessionTable(c.max_sessions, CacheBudget(c.cache_budget), c.max_sessions_per_peer),
            worker=worker, gate=PeerGate(ResourceLimits.from_config(c)),
            buffers=ByteBudget(per_peer=c.max_buffered_per_peer, total=c.max_buffered_total),
            limits=Limits(max_length=c.max_length, max_batch_size=c.max_batch_size,
                          session_idle_timeout=c.session_idle_timeout, step_timeout=c.step_timeout),
            public_name=c.public_name, version=__version__, state="joining", throughput=throughput,
            batcher=Batcher(worker, span, BatchingConfig(enabled=c.batching)),
            adapters=tuple(a.name for a in self.adapters), certificate=self.certificate,
        )

    async def _start_control_api(self, nursery: trio.Nursery) -> Path | None:
        """Serve the control API on the configured socket, else on this daemon's default one
        (petals_protocol.localpaths). A configured socket that cannot be served is fatal; the
        default one only costs a warning, since nobody asked for it by name."""
        if not self.config.control_api:
            return None
        from .control import ControlSocketError, serve_control
        from .control_backend import DaemonControl

        serve = functools.partial(serve_control, backend=DaemonControl(self), group=self.config.control_group)
        if self.config.control_socket is not None:
            return await nursery.start(serve, self.config.control_socket)
        path = default_control_socket(self.peer_id)
        try:
            _private_dir(path.parent)
            return await nursery.start(serve, path)
        except (ControlSocketError, OSError) as exc:
            log.warning("control API off peer=%s: %s (give --control-socket PATH)", self.peer_id, exc)
            return None

    async def serve(self) -> None:
        self._stop = trio.Event()
        psk = load_swarm_key(self.config.swarm_key) if self.config.swarm_key else None
        self.host = make_host(self.key_pair, psk=psk, admission=self.admission)
        async with running_host(self.host, self.config.listen) as host, \
                ComputeWorker(step_timeout=self.config.step_timeout, contributor=self.contributors) as worker, \
                trio.open_nursery() as nursery:
            self._nursery = nursery
            self.addrs = listen_multiaddrs(host)
            nursery.start_soon(self._signals)
            log.info("transport peer=%s %s", self.peer_id, compat.describe())
            dht = await start_dht(host, nursery, server=True,
                                  bootstrap=[] if self.config.new_swarm else self.config.initial_peers)
            if self.admission is not None:
                await nursery.start(self._keep_membership, dht, self.admission)
            blocks = self.blocks or await self._place(dht)
            span, throughput = await trio.to_thread.run_sync(self.load, *blocks)
            self.ctx = self._context(span, throughput, worker)
            self.ctx.forwarder = Forwarder(host, nursery, max_frame_size=self.config.max_frame_size,
                                           members=functools.partial(find_server_record, dht, self.fingerprint,
                                                             local_first=True))
            self.banning = Banning(host, self.ctx.gate)
            await nursery.start(self.banning.run)
            host.set_stream_handler(INFO_PROTOCOL, self._handler(serve_info, tensors=0))
            host.set_stream_handler(INFERENCE_PROTOCOL, self._handler(serve_inference, frozenset({"step"})))
            # a backward request carries hidden states, grad_output and maybe deep prompts
            host.set_stream_handler(FORWARD_PROTOCOL, self._handler(serve_stateless, frozenset({"fwd", "bwd"}),
                                                                    tensors=3))
            host.set_stream_handler(BACKWARD_PROTOCOL, self._handler(serve_stateless, frozenset({"bwd"}), tensors=2))
            # Push links carry steps without new streams: they count as activity like sessions do.
            host.set_stream_handler(DIALBACK_PROTOCOL, DialbackServer(psk=psk).handle)
            self.nat = self._nat_traversal(dht)
            await nursery.start(self.nat.run)  # before the first record: it may carry relayed addresses
            self.ctx.forwarder.direct_path = self.nat.direct_path
            await nursery.start(IdleConnections(host,
                                                sessions=lambda: [*self.ctx.sessions, *self.ctx.link_activity(),
                                                                  *self.nat.keepalive()],
                                                timeout=lambda: self.config.idle_connection_timeout).run)
            control = await self._start_control_api(nursery)
            self.ctx.state = "online"
            self.announcer = Announcer(host, dht, self.signer, self.peer_id, self.make_record,
                                       period=self.config.announce_period, ttl=self.config.record_ttl)
            await self.announcer.announce_once()
            nursery.start_soon(self.announcer.run)
            if self.blocks is None:
                nursery.start_soon(self._rebalance, dht, self.announcer)
            self.next_daemons = NextDaemons(host, self.peer_id_bytes, period=MEMBERS_PERIOD,
                                            on_first=self.announcer.request_announce)
            nursery.start_soon(self.next_daemons.run)
            nursery.start_soon(self._learn_members, dht)
            log.info("ready peer=%s blocks=%d:%d addrs=%s control=%s", self.peer_id, span.start, span.end,
                     " ".join(self.addrs), control or "off")
            self.notifier.ready()
            nursery.start_soon(functools.partial(self.notifier.run_watchdog, healthy=self._compute_healthy))
            nursery.start_soon(self._status_updates)
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping peer=%s", self.peer_id)
            nursery.cancel_scope.cancel()


def build_daemon(config: DaemonConfig, argv: list[str], notifier: Notifier) -> Daemon:
    """Everything that can fail before joining the swarm; raises with a one-line reason."""
    checkpoint = Checkpoint(config.model, revision=config.revision, cache_dir=default_cache_dir())
    identity = claim_identity(config.identity) if config.identity else claim_free_identity(default_identity_dir())
    num_blocks = checkpoint.config.num_hidden_layers
    blocks = parse_blocks(config, num_blocks) if config.blocks is not None else None
    notifier.status("fingerprinting the model's weights")
    fingerprint = model_fingerprint(checkpoint)
    device = config_mod.resolve_device(config.device)
    adapters = load_adapters(config.adapters, checkpoint.config) if config.adapters else []
    daemon = Daemon(config=config, argv=argv, identity=identity, notifier=notifier, started_at=time.time(),
                    checkpoint=checkpoint, fingerprint=fingerprint, dtype=choose_dtype(config, checkpoint, device),
                    blocks=blocks, device=device, adapters=adapters)
    log.info("identity peer=%s key=%s model=%s fingerprint=%s device=%s", daemon.peer_id, identity.path,
             config.model, fingerprint[:16], device)
    # Once everything above has passed: a daemon that cannot start says so in one line, nothing else.
    threads = set_torch_threads(config.num_threads)
    log.info("torch threads=%d%s", threads, "" if config.num_threads else " (cores free at start)")
    return daemon


def _private_dir(folder: Path) -> None:
    """Create `folder` 0700 if missing; refuse one another user owns (a shared /tmp)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise OSError(f"{folder} belongs to uid {info.st_uid}, not to this user")
