"""The OpenAI-compatible HTTP API over a swarm (`petals serve`), as an ASGI app (Starlette).

    GET  /v1/models                 the one model this server generates with
    POST /v1/completions            prompt -> text
    POST /v1/chat/completions       messages -> the tokenizer's chat template -> text
    GET  /                          the swarm health page (client/health.py); /health.json its data

Requests are validated here (`parse_completion`, `parse_chat`) into a `CompletionJob`; each job
runs in a worker thread with its own inference session (client/completion.py), at most
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

from petals_protocol.errors import ErrorCode, RemoteError

from .completion import CompletionJob, Delta, Finished
from .routing import NoRoute
from .swarm import NETWORK_ERRORS
from .tokenizer import NoChatTemplate, Tokenizer

__all__ = ["ApiError", "ServedModel", "Generations", "build_app", "parse_completion", "parse_chat"]

log = logging.getLogger("petals_client.openai_api")

#: OpenAI's default for /v1/completions when `max_tokens` is not given.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_STOP_SEQUENCES = 4
MAX_BODY_BYTES = 4 << 20


class ApiError(Exception):
    """An error answered to the HTTP client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _remote_code(exc: BaseException) -> ErrorCode | None:
    """The daemon's error code somewhere in `exc`'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RemoteError):
            return current.code
        current = current.__cause__ or current.__context__
    return None


def error_for(exc: BaseException) -> ApiError:
    """What the HTTP client is told when generation fails with `exc`."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NoChatTemplate):
        return ApiError(400, str(exc), param="messages", code="no_chat_template")
    if isinstance(exc, NoRoute):
        return ApiError(503, f"no route through the swarm: {exc}", type="service_unavailable", code="no_route")
    code = _remote_code(exc)
    if code == ErrorCode.BUSY:
        return ApiError(429, f"the swarm's daemons are busy, retry later: {exc}", type="rate_limit_error",
                        code="daemons_busy")
    if code in (ErrorCode.TOO_LONG, ErrorCode.BAD_REQUEST):
        return ApiError(400, f"a daemon refused the request: {exc}", code=code.value)
    if isinstance(exc, NETWORK_ERRORS):
        return ApiError(503, f"the swarm could not serve the request: {exc}", type="service_unavailable",
                        code="swarm_failed")
    if isinstance(exc, RuntimeError) and "runtime is closed" in str(exc):
        return ApiError(503, "the server is shutting down", type="service_unavailable", code="shutting_down")
    log.error("completion failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal")


# --------------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class ServedModel:
    """What the API needs to know of the model it serves."""

    model_id: str
    tokenizer: Tokenizer
    context_limit: Callable[[], int]  # most tokens a session may hold now (prompt + completion)
    max_tokens: int  # the most tokens one request may generate (and the chat default)
    # What a request that leaves them out gets: the checkpoint's generation_config (as vLLM does),
    # so that a model meant to be decoded greedily is, else OpenAI's defaults (see `sampling_defaults`).
    temperature: float = 1.0
    top_p: float = 1.0


def sampling_defaults(config: Any) -> tuple[float, float]:
    """(temperature, top_p) for requests that give none, from a transformers GenerationConfig."""
    if config is None:
        return 1.0, 1.0
    if not config.do_sample:
        return 0.0, 1.0
    return float(config.temperature or 1.0), float(config.top_p or 1.0)


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"`{name}` must be {' or '.join(k.__name__ for k in kinds)}, got a boolean", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"`{name}` must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}",
                       param=name)
    return value


def _check_model(body: dict[str, Any], served: ServedModel) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required (GET /v1/models lists it)", param="model")
    if model != served.model_id:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served.model_id}`",
                       param="model", code="model_not_found")


def _job(body: dict[str, Any], served: ServedModel, prompt_ids: list[int], default_max: int) -> CompletionJob:
    for unsupported in ("logprobs", "top_logprobs", "tools", "functions", "suffix", "logit_bias"):
        if body.get(unsupported) not in (None, False, [], {}):
            raise ApiError(400, f"`{unsupported}` is not supported by this server", param=unsupported)
    if body.get("echo"):
        raise ApiError(400, "`echo` is not supported by this server", param="echo")
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "only `n`=1 is supported", param="n")
    best_of = _field(body, "best_of", (int,), 1)
    if best_of != 1:
        raise ApiError(400, "only `best_of`=1 is supported", param="best_of")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _field(body, penalty, (int, float), 0) != 0:
            raise ApiError(400, f"`{penalty}` is not supported by this server (only 0)", param=penalty)
    temperature = float(_field(body, "temperature", (int, float), served.temperature))
    if not 0.0 <= temperature <= 2.0 or math.isnan(temperature):
        raise ApiError(400, "`temperature` must be between 0 and 2", param="temperature")
    top_p = float(_field(body, "top_p", (int, float), served.top_p))
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "`top_p` must be in (0, 1]", param="top_p")
    seed = _field(body, "seed", (int,), None)
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them",
                       param="stop")
    limit = served.context_limit()
    room = limit - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this swarm's sessions hold at most {limit}",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    max_tokens = _field(body, "max_completion_tokens", (int,), None)
    max_tokens = _field(body, "max_tokens", (int,), max_tokens)
    if max_tokens is None:
        max_tokens = min(default_max, served.max_tokens, room)
    if max_tokens < 1:
        raise ApiError(400, "`max_tokens` must be at least 1", param="max_tokens")
    if max_tokens > served.max_tokens or len(prompt_ids) + max_tokens > limit:
        raise ApiError(400, f"`max_tokens`={max_tokens} is too many: this server generates at most "
                       f"{min(served.max_tokens, room)} tokens after this {len(prompt_ids)}-token prompt "
                       f"(sessions hold at most {limit})", param="max_tokens", code="context_length_exceeded")
    return CompletionJob(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         seed=seed, stop=tuple(stop))


def parse_completion(body: dict[str, Any], served: ServedModel) -> CompletionJob:
    _check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, str) and prompt:
        ids = served.tokenizer.encode(prompt)
    else:
        raise ApiError(400, "`prompt` must be a non-empty string (or one list of token ids)", param="prompt")
    return _job(body, served, ids, COMPLETIONS_DEFAULT_MAX_TOKENS)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, "a message's `content` must be a string or a list of text parts", param="messages")


def parse_chat(body: dict[str, Any], served: ServedModel) -> CompletionJob:
    _check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    chat: list[dict[str, str]] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a `role` and a `content`", param="messages")
        chat.append({"role": m["role"], "content": _message_text(m.get("content"))})
    return _job(body, served, served.tokenizer.chat_ids(chat), served.max_tokens)


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
                return error.response()

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
        stream = _field(body, "stream", (bool,), False)
        options = _field(body, "stream_options", (dict,), {})
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
        return ApiError(status, f"{message}: {request.method} {request.url.path}").response()

    routes = [
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(one_model), methods=["GET"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/", endpoint(index, auth=False), methods=["GET"]),
        Route("/health.json", endpoint(health_json, auth=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})
