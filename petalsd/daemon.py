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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trio

from petals_protocol.errors import ErrorCode, PetalsError, ProtocolError
from petals_protocol.ids import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    __version__,
)
from petals_protocol.messages import ErrorReply
from petals_protocol.models.checkpoint import Checkpoint
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.models.span import Span, load_span
from petals_protocol.p2p.host import listen_multiaddrs, load_swarm_key, make_host, running_host
from petals_protocol.p2p.identity import ed25519_private_key, load_or_create_identity, peer_id as peer_id_of
from petals_protocol.p2p.streams import StreamClosed, open_framed

from . import config as config_mod
from .compute import ComputeWorker
from .config import DaemonConfig
from .handlers import Limits, ServingContext, serve_inference, serve_info, serve_stateless
from .notify import Notifier
from .sessions import CacheBudget, SessionTable

log = logging.getLogger("petalsd")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StartupError(PetalsError):
    """A fatal problem before serving (bad model path, port in use, unreadable identity)."""


def default_identity_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "petalsd" / "identity.key"


def choose_dtype(config: DaemonConfig, checkpoint: Checkpoint) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    declared = getattr(checkpoint.config, "dtype", None) or getattr(checkpoint.config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    if config.device == "cpu" and name == "float16":
        return torch.float32  # fp16 matmuls are slow or missing on CPUs
    return DTYPES.get(name, torch.float32)


def parse_blocks(config: DaemonConfig, num_blocks: int) -> tuple[int, int]:
    if config.blocks is not None:
        start, end = (int(x) for x in config.blocks.split(":"))
    elif config.num_blocks is not None:
        start, end = 0, min(config.num_blocks, num_blocks)  # refined by discovery when it knows the swarm
    else:
        start, end = 0, num_blocks
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
    ctx: ServingContext
    key_pair: Any
    notifier: Notifier
    started_at: float
    host: Any = None
    addrs: list[str] | None = None
    _stop: trio.Event | None = None
    _nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ stream handlers
    def _handler(self, serve: Callable[[ServingContext, Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        max_frame = self.config.max_frame_size

        async def handle(stream: Any) -> None:
            # libp2p runs handlers inside its connection's service: an exception escaping here would
            # take down the whole daemon. So nothing escapes but cancellation; every outcome is logged.
            try:
                # Requests and replies alternate on our protocols, so a peer never needs more than a
                # couple of frames queued: this bounds what one stream can make us hold to 3 frames.
                async with open_framed(stream, max_frame_size=max_frame, max_buffered_frames=2) as channel:
                    await self._serve_channel(serve, channel)
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
            await self._try_send(channel, ErrorReply(code=exc.code, message=str(exc)[:1000],
                                                     session_id=None, request_id=None))
        except Exception:  # a bug of ours: the client gets "internal", everyone else keeps being served
            log.exception("internal error serving peer=%s", channel.peer_id)
            await self._try_send(channel, ErrorReply(code=ErrorCode.INTERNAL, message="internal error in the daemon",
                                                     session_id=None, request_id=None))

    @staticmethod
    async def _try_send(channel: Any, msg: ErrorReply) -> None:
        with trio.move_on_after(1.0):
            try:
                await channel.send(msg)
            except PetalsError:
                pass  # the stream is already gone

    # ------------------------------------------------------------------ lifecycle
    def status_line(self) -> str:
        return (f"serving blocks {self.ctx.span.start}:{self.ctx.span.end}, "
                f"{len(self.ctx.sessions)} sessions, state {self.ctx.state}")

    async def drain(self) -> None:
        """Refuse new sessions, let running ones finish (up to drain_grace), then stop."""
        if not self.ctx.sessions.accepting:
            return
        log.info("draining: refusing new sessions, %d open, grace %.0f s", len(self.ctx.sessions),
                 self.config.drain_grace)
        self.ctx.sessions.accepting = False
        self.ctx.state = "offline"
        self.notifier.status("draining: " + self.status_line())
        with trio.move_on_after(self.config.drain_grace):
            while len(self.ctx.sessions):
                await trio.sleep(0.05)
        if len(self.ctx.sessions):
            log.info("drain grace over: closing %d sessions", len(self.ctx.sessions))
        self.stop()

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
        self.ctx.limits.max_length = c.max_length
        self.ctx.limits.max_batch_size = c.max_batch_size
        self.ctx.limits.session_idle_timeout = c.session_idle_timeout
        self.ctx.limits.step_timeout = c.step_timeout
        self.ctx.sessions.max_sessions = c.max_sessions
        self.ctx.sessions.budget.total = c.cache_budget
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

    async def serve(self) -> None:
        self._stop = trio.Event()
        psk = load_swarm_key(self.config.swarm_key) if self.config.swarm_key else None
        self.host = make_host(self.key_pair, psk=psk)
        async with running_host(self.host, self.config.listen) as host, trio.open_nursery() as nursery:
            self._nursery = nursery
            host.set_stream_handler(INFO_PROTOCOL, self._handler(serve_info))
            host.set_stream_handler(INFERENCE_PROTOCOL, self._handler(serve_inference))
            host.set_stream_handler(FORWARD_PROTOCOL, self._handler(serve_stateless))
            host.set_stream_handler(BACKWARD_PROTOCOL, self._handler(serve_stateless))
            self.addrs = listen_multiaddrs(host)
            nursery.start_soon(self._signals)
            if self.config.control_socket is not None:
                from .control import serve_control
                from .control_backend import DaemonControl

                await nursery.start(functools.partial(serve_control, self.config.control_socket,
                                                      DaemonControl(self), group=self.config.control_group))
            self.ctx.state = "online"
            log.info("ready peer=%s blocks=%d:%d addrs=%s", self.ctx.peer_id, self.ctx.span.start,
                     self.ctx.span.end, " ".join(self.addrs))
            self.notifier.ready()
            nursery.start_soon(self.notifier.run_watchdog)
            nursery.start_soon(self._status_updates)
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping peer=%s", self.ctx.peer_id)
            nursery.cancel_scope.cancel()


def build_daemon(config: DaemonConfig, argv: list[str], notifier: Notifier) -> Daemon:
    """Everything before serving; raises StartupError with a one-line reason."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    identity_path = config.identity or default_identity_path()
    key_pair = load_or_create_identity(identity_path)
    signer = ed25519_private_key(key_pair)
    peer_id = peer_id_of(key_pair).to_base58()
    checkpoint = Checkpoint(config.model)
    start, end = parse_blocks(config, checkpoint.config.num_hidden_layers)
    dtype = choose_dtype(config, checkpoint)
    notifier.status(f"loading blocks {start}:{end}")
    log.info("loading peer=%s model=%s blocks=%d:%d dtype=%s device=%s", peer_id, config.model, start, end,
             str(dtype).removeprefix("torch."), config.device)
    span = load_span(config.model, start, end, dtype=dtype, device=config.device,
                     progress=_progress_reporter(f"loading blocks {start}:{end}"))
    fingerprint = model_fingerprint(config.model, cache_dir=_cache_dir())
    throughput = (measure_throughput(span) if config.throughput == "auto" else float(config.throughput))
    log.info("loaded peer=%s weights=%.1f MiB fingerprint=%s throughput=%.1f block-steps/s", peer_id,
             span.weight_bytes / 2**20, fingerprint[:16], throughput)
    ctx = ServingContext(
        span=span, fingerprint=fingerprint, model_name=Path(config.model).name, peer_id=peer_id, signer=signer,
        sessions=SessionTable(config.max_sessions, CacheBudget(config.cache_budget)), worker=ComputeWorker(),
        limits=Limits(max_length=config.max_length, max_batch_size=config.max_batch_size,
                      session_idle_timeout=config.session_idle_timeout, step_timeout=config.step_timeout),
        public_name=config.public_name, version=__version__, state="joining", throughput=throughput,
    )
    return Daemon(config=config, argv=argv, ctx=ctx, key_pair=key_pair, notifier=notifier, started_at=time.time())


def _cache_dir() -> Path | None:
    cache = os.environ.get("CACHE_DIRECTORY") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache.split(":")[0]) / "petalsd"
