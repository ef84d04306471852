"""The OpenAI-compatible HTTP API over a swarm (`petals serve`), as an ASGI app (Starlette).

    GET  /v1/models                 the one model this server generates with
    POST /v1/completions            prompt -> text
    POST /v1/chat/completions       messages -> the tokenizer's chat template -> text
    GET  /                          the swarm health page (client/health.py); /health.json its data

Requests are checked into a `CompletionJob` (client/openai_requests.py); each job runs in a worker
thread with its own inference session (client/completion.py), at most
`max_concurrent` at once (more get 429, which OpenAI clients retry). With `stream` the text goes
out as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; the response
starts only once the first token is chosen, so that a swarm without a route still gets a proper
503 rather than an empty stream. Every failure is an OpenAI-shaped JSON error
(`{"error": {"message", "type", "param", "code"}}`) with its status, never a traceback.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .completion import CompletionJob, Delta, Finished
from .openai_requests import ApiError, ServedModel, error_for, field, parse_chat, parse_completion

__all__ = ["Generations", "build_app"]

log = logging.getLogger("petals_client.openai_api")

MAX_BODY_BYTES = 4 << 20


# --------------------------------------------------------------------------- generation


@dataclass
class Failed:
    error: BaseException


class Generations:
    """Completion jobs in worker threads, at most `limit` at once, all owned by `nursery`."""

    def __init__(self, nursery: trio.Nursery, run: Callable[[CompletionJob, Callable[[object], None], threading.Event], None],
                 limit: int) -> None:
        self._nursery = nursery
        self._run = run
        self._limiter = trio.CapacityLimiter(limit)
        self.active = 0

    def start(self, job: CompletionJob) -> tuple[trio.MemoryReceiveChannel[object], threading.Event]:
        """Begin `job`; its events arrive on the returned channel. Setting the event (or closing
        the channel) ends it early, closing its session on the daemons."""
        if self.active >= self._limiter.total_tokens:
            raise ApiError(429, f"this server already runs {self.active} completions (its limit); retry later",
                           type="rate_limit_error", code="server_busy")
        send, receive = trio.open_memory_channel[object](math.inf)
        cancelled = threading.Event()
        self.active += 1
        self._nursery.start_soon(self._job, job, send, cancelled)
        return receive, cancelled

    async def _job(self, job: CompletionJob, send: trio.MemorySendChannel[object], cancelled: threading.Event) -> None:
        token = trio.lowlevel.current_trio_token()

        def emit(event: object) -> None:
            trio.from_thread.run_sync(send.send_nowait, event, trio_token=token)  # raises once nobody listens

        try:
            async with send, trio.open_nursery() as nursery:
                nursery.start_soon(_set_when_cancelled, cancelled)
                try:
                    await trio.to_thread.run_sync(self._run, job, emit, cancelled, limiter=self._limiter)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the request went away first
                except Exception as exc:  # noqa: BLE001 - reported to the request as an API error
                    send.send_nowait(Failed(exc))
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.active -= 1


async def _set_when_cancelled(event: threading.Event) -> None:
    """Tell the worker thread to stop when the server shuts down (its nursery is cancelled)."""
    try:
        await trio.sleep_forever()
    finally:
        event.set()


async def _next_event(events: trio.MemoryReceiveChannel[object]) -> object:
    try:
        event = await events.receive()
    except trio.EndOfChannel:
        raise ApiError(503, "the completion ended without a result (the server is shutting down?)",
                       type="service_unavailable") from None
    if isinstance(event, Failed):
        raise error_for(event.error)
    return event


async def _stop_on_disconnect(request: Request, cancelled: threading.Event, scope: trio.CancelScope) -> None:
    """End a non-streamed completion whose client went away (its body is read: what comes next
    from the server is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancelled.set()
    scope.cancel()


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _log_finished(rid: str, f: Finished) -> None:
    log.info("completion done id=%s prompt_tokens=%d completion_tokens=%d finish=%s", rid, f.prompt_tokens,
             f.completion_tokens, f.finish_reason)


def _usage(f: Finished) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


@dataclass(frozen=True)
class _Shape:
    """How one endpoint's responses look (completions and chat differ only in these)."""

    object: str
    chunk_object: str
    prefix: str
    chat: bool

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


COMPLETION = _Shape("text_completion", "text_completion", "cmpl", chat=False)
CHAT = _Shape("chat.completion", "chat.completion.chunk", "chatcmpl", chat=True)


# --------------------------------------------------------------------------- the app


def build_app(served: ServedModel, generations: Generations, *, api_key: str | None = None,
              health_page: Callable[[], Awaitable[str]] | None = None,
              health_data: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> Starlette:
    """The ASGI app; completions run in `generations` (whose nursery outlives the HTTP server)."""

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                           type="authentication_error", code="invalid_api_key")

    def endpoint(fn: Callable[[Request], Awaitable[Response]], *, auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                if auth:
                    authorized(request)
                return await fn(request)
            except Exception as exc:  # noqa: BLE001 - never a traceback to the client
                error = error_for(exc)
                log.info("%s %s -> %d %s", request.method, request.url.path, error.status, error.message)
                return _error_response(error)

        return wrapped

    async def read_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def model_card() -> dict[str, Any]:
        return {"id": served.model_id, "object": "model", "created": 0, "owned_by": "petals"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request) -> Response:
        if request.path_params["model"] != served.model_id:
            raise ApiError(404, f"The model `{request.path_params['model']}` does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(model_card())

    async def complete(request: Request, shape: _Shape, parse: Callable[[dict[str, Any], ServedModel], CompletionJob]) -> Response:
        body = await read_json(request)
        job = parse(body, served)
        stream = field(body, "stream", (bool,), False)
        options = field(body, "stream_options", (dict,), {})
        include_usage = bool(options.get("include_usage")) if stream else False
        events, cancelled = generations.start(job)
        rid, created = f"{shape.prefix}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": shape.object, "created": created, "model": served.model_id}
        try:
            first = await _next_event(events)  # Started, or the error that kept the route from opening
        except BaseException:
            cancelled.set()
            events.close()
            raise
        if not stream:
            event, failure = first, None
            with events:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_stop_on_disconnect, request, cancelled, nursery.cancel_scope)
                        try:
                            while not isinstance(event, Finished):
                                event = await _next_event(events)
                        except ApiError as exc:  # raised outside the nursery, which would wrap it in a group
                            failure = exc
                        nursery.cancel_scope.cancel()
                finally:
                    cancelled.set()
            if failure is not None:
                raise failure
            if not isinstance(event, Finished):  # the client left; nobody reads this
                return Response(status_code=499)
            _log_finished(rid, event)
            return JSONResponse({**head, "choices": [shape.choice(event.text, event.finish_reason)],
                                 "usage": _usage(event)})
        chunk_head = {**head, "object": shape.chunk_object}

        async def chunks() -> AsyncIterator[bytes]:
            with events:
                try:
                    if shape.chat:
                        yield _sse({**chunk_head, "choices": [shape.chunk_choice(None, None, first=True)]})
                    while True:
                        try:
                            event = await _next_event(events)
                        except ApiError as exc:  # the stream has begun: report in-band, as OpenAI does
                            yield _sse(exc.body())
                            break
                        if isinstance(event, Delta):
                            yield _sse({**chunk_head, "choices": [shape.chunk_choice(event.text, None)]})
                        elif isinstance(event, Finished):
                            _log_finished(rid, event)
                            yield _sse({**chunk_head, "choices": [shape.chunk_choice(None, event.finish_reason)]})
                            if include_usage:
                                yield _sse({**chunk_head, "choices": [], "usage": _usage(event)})
                            break
                    yield _sse("[DONE]")
                finally:
                    cancelled.set()  # also when the HTTP client disconnected mid-stream

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request) -> Response:
        return await complete(request, COMPLETION, parse_completion)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, CHAT, parse_chat)

    async def index(request: Request) -> Response:
        if health_page is None:
            raise ApiError(404, "no health page on this server")
        return HTMLResponse(await health_page())

    async def health_json(request: Request) -> Response:
        if health_data is None:
            raise ApiError(404, "no health data on this server")
        return JSONResponse(await health_data())

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return _error_response(ApiError(status, f"{message}: {request.method} {request.url.path}"))

    routes = [
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(one_model), methods=["GET"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/", endpoint(index, auth=False), methods=["GET"]),
        Route("/health.json", endpoint(health_json, auth=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})
