"""`petals serve`: the OpenAI-compatible API and the health page over a swarm, on one HTTP port.

The server runs Hypercorn on its own trio loop in the main thread; the model (client library)
keeps its runtime thread, and each completion runs in a worker thread (client/openai_api.py).
Once listening it prints one line, `petals serve: ready at http://HOST:PORT/v1 ...`, on stdout.
It stops on SIGINT/SIGTERM: in-flight requests get a short grace period, then running
completions are told to stop and their sessions are closed before the model is.

An API key is required to listen on anything but a loopback address (the swarm's compute is
what would be handed out), unless the operator says otherwise with `--allow-no-api-key`.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from petals_protocol.heap import settle_heap

from .completion import CompletionJob, run_completion
from .health import render_page, swarm_snapshot
from .openai_api import Generations, build_app
from .openai_requests import ServedModel, sampling_defaults
from .tokenizer import Tokenizer

__all__ = ["ServeOptions", "run_server", "is_loopback"]

#: Seconds in-flight requests get to finish when the server is stopped.
GRACEFUL_SECONDS = 3.0
#: How long a health snapshot is reused (every viewer's refresh would otherwise probe every daemon).
HEALTH_CACHE_SECONDS = 2.0


@dataclass(frozen=True)
class ServeOptions:
    model: str
    initial_peers: Sequence[str]
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str | None = None
    api_key: str | None = None
    allow_no_api_key: bool = False
    max_concurrent: int = 8
    max_tokens: int = 1024
    swarm_key: str | None = None
    #: from_pretrained's spot_check_rate / allowed_peers / blocked_peers and identity / swarm_owner /
    #: member_certificate (client/trust_options.py)
    trust: dict[str, Any] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(options: ServeOptions) -> None:
    if options.api_key is None and not options.allow_no_api_key and not is_loopback(options.host):
        raise ValueError(f"refusing to listen on {options.host} without --api-key: anyone who can reach it could "
                         "use the swarm (give --api-key KEY, or --allow-no-api-key if that is intended)")


def _context_limit(model: Any) -> Callable[[], int]:
    """Most tokens a session may hold: the model's positions and every online daemon's max_length."""
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or sys.maxsize

    def limit() -> int:
        known = [s.max_length for s in model.swarm.servers() if s.state == "online" and s.max_length > 0]
        return min([positions, *known])

    return limit


class _SerialTokenizer:
    """The tokenizer used by one thread at a time: requests are parsed on the server's loop while
    worker threads decode, and a Hugging Face fast tokenizer may re-configure itself per call."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.eos_token_id = tokenizer.eos_token_id
        self.has_chat_template = tokenizer.has_chat_template

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self._tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self._tokenizer.decode(ids)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        with self._lock:
            return self._tokenizer.chat(messages)


class _HealthCache:
    """The latest snapshot, refreshed on demand at most every HEALTH_CACHE_SECONDS."""

    def __init__(self, model: Any, options: ServeOptions, api_url: str) -> None:
        self.model, self.options, self.api_url = model, options, api_url
        self._data: dict[str, Any] | None = None
        self._taken = 0.0
        self._lock = trio.Lock()

    async def data(self) -> dict[str, Any]:
        async with self._lock:
            if self._data is None or time.monotonic() - self._taken > HEALTH_CACHE_SECONDS:
                self._data = await trio.to_thread.run_sync(self._snapshot)
                self._taken = time.monotonic()
            return self._data

    def _snapshot(self) -> dict[str, Any]:
        return self.model.runtime.call(lambda: swarm_snapshot(
            self.model.swarm, model=self.options.model, num_blocks=self.model.num_blocks,
            api_url=self.api_url, api_key_required=self.options.api_key is not None, live=True))

    async def page(self) -> str:
        return render_page(await self.data())


async def _serve(model: Any, tokenizer: Tokenizer, options: ServeOptions, out: TextIO) -> None:
    tokenizer = _SerialTokenizer(tokenizer)
    model_id = options.model_id or Path(os.path.abspath(options.model)).name  # a symlink's own name
    temperature, top_p = sampling_defaults(model.generation_config)
    served = ServedModel(model_id=model_id, tokenizer=tokenizer, context_limit=_context_limit(model),
                         max_tokens=options.max_tokens, temperature=temperature, top_p=top_p)

    def run(job: CompletionJob, emit: Callable[[object], None], cancelled: threading.Event) -> None:
        run_completion(model, tokenizer.decode, job, emit, cancelled)

    host = f"[{options.host}]" if ":" in options.host else options.host
    api_url = f"http://{host}:{options.port}"
    health = _HealthCache(model, options, api_url)
    config = HypercornConfig()
    config.bind = [f"{host}:{options.port}"]
    config.graceful_timeout = GRACEFUL_SECONDS
    config.accesslog = None
    config.errorlog = None

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async with trio.open_nursery() as jobs:
        app = build_app(served, Generations(jobs, run, options.max_concurrent), api_key=options.api_key,
                        health_page=health.page, health_data=health.data)
        async with trio.open_nursery() as server:
            binds = await server.start(lambda task_status: hypercorn_serve(
                app, config, shutdown_trigger=shutdown_trigger, task_status=task_status))
            url = binds[0] if binds else api_url
            health.api_url = url
            print(f"petals serve: ready at {url}/v1 (model {model_id}; health page {url}/)", file=out, flush=True)
        jobs.cancel_scope.cancel()  # the server stopped: end running completions (closing their sessions)


def run_server(options: ServeOptions, out: TextIO | None = None) -> int:
    from .model import AutoDistributedModelForCausalLM
    from .tokenizer import load_tokenizer

    check_exposure(options)
    if options.max_concurrent < 1 or options.max_tokens < 1:
        raise ValueError("--max-concurrent and --max-tokens must be at least 1")
    tokenizer = load_tokenizer(options.model)
    with AutoDistributedModelForCausalLM.from_pretrained(options.model, initial_peers=list(options.initial_peers),
                                                         swarm_key=options.swarm_key, **options.trust) as model:
        settle_heap()  # a long-running server: no full garbage collections through the model's objects
        try:
            trio.run(_serve, model, tokenizer, options, out or sys.stdout)
        except BaseExceptionGroup as group:  # nurseries wrap a failed bind (port in use, bad address)
            bind_error = _only(group, OSError)
            if bind_error is None:
                raise
            raise OSError(f"cannot listen on {options.host}:{options.port}: {bind_error.strerror or bind_error}") from None
    return 0


def _only(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` error in `group` when nothing else is in it, else None."""
    matched, rest = group.split(kind)
    if matched is None or rest is not None:
        return None
    error: BaseException = matched
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
