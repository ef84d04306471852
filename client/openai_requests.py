"""Requests and errors of the OpenAI-compatible API (`petals serve`), sans-IO.

`parse_completion` and `parse_chat` check a request body and turn it into a `CompletionJob`
(client/completion.py), refusing what this server does not do (n > 1, logprobs, penalties...)
rather than ignoring it. `error_for` decides what the HTTP client is told when something fails,
in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the status a client
acts on: 400 its request, 404 an unknown model, 429 busy (this server or the daemons), 503 the
swarm cannot serve it, 500 a bug.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from petals_protocol.errors import ErrorCode, RemoteError

from .completion import CompletionJob
from .routing import NoRoute
from .swarm import NETWORK_ERRORS
from .tokenizer import Tokenizer

__all__ = ["ApiError", "ServedModel", "error_for", "field", "parse_chat", "parse_completion", "sampling_defaults"]

log = logging.getLogger("petals_client.openai_api")

#: OpenAI's default for /v1/completions when `max_tokens` is not given.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error answered to the HTTP client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


def field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
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
    n = field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "only `n`=1 is supported", param="n")
    best_of = field(body, "best_of", (int,), 1)
    if best_of != 1:
        raise ApiError(400, "only `best_of`=1 is supported", param="best_of")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if field(body, penalty, (int, float), 0) != 0:
            raise ApiError(400, f"`{penalty}` is not supported by this server (only 0)", param=penalty)
    temperature = float(field(body, "temperature", (int, float), served.temperature))
    if not 0.0 <= temperature <= 2.0 or math.isnan(temperature):
        raise ApiError(400, "`temperature` must be between 0 and 2", param="temperature")
    top_p = float(field(body, "top_p", (int, float), served.top_p))
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "`top_p` must be in (0, 1]", param="top_p")
    seed = field(body, "seed", (int,), None)
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them",
                       param="stop")
    limit = served.context_limit()
    room = limit - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this swarm's sessions hold at most {limit}",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    max_tokens = field(body, "max_completion_tokens", (int,), None)
    max_tokens = field(body, "max_tokens", (int,), max_tokens)
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
    if not served.tokenizer.has_chat_template:
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages",
                       code="no_chat_template")
    return _job(body, served, served.tokenizer.chat(chat), served.max_tokens)
