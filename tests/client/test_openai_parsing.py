"""The OpenAI API's sans-IO parts: request validation, error mapping, stop-sequence scanning."""
from __future__ import annotations

import pytest

from petals_client.completion import StopScanner
from transformers import GenerationConfig

from petals_client.openai_requests import ApiError, ServedModel, error_for, parse_chat, parse_completion, sampling_defaults
from petals_client.routing import NoRoute
from petals_client.session import SessionFailed
from petals_protocol.errors import ErrorCode, RemoteError

class ByteLevel:
    """A byte-level tokenizer (id = byte + 3; bos 1, eos 2), as a byte-level BPE without merges."""

    eos_token_id = 2
    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        return [1] + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        raise AssertionError("a tokenizer without a chat template must not be asked to render one")


TOKENIZER = ByteLevel()
SERVED = ServedModel(model_id="m", tokenizer=TOKENIZER, context_limit=lambda: 64, max_tokens=32)


def scan(pieces: list[str], stop: list[str]) -> tuple[list[str], str, bool]:
    """Feed text one piece per token (as byte ids); returns what was released per step."""
    scanner = StopScanner(TOKENIZER.decode, stop)
    ids: list[int] = []
    released = []
    for piece in pieces:
        ids += TOKENIZER.encode(piece)[1:]
        released.append(scanner.update(ids))
        if scanner.stopped:
            break
    released.append(scanner.finish())
    return released, scanner.text, scanner.stopped


def test_stop_scanner_holds_back_possible_stop_prefixes():
    released, text, stopped = scan(["Hel", "lo ", "wo", "rld"], ["o w", "xyz"])
    assert text == "Hell" and stopped
    assert "".join(released) == "Hell"
    assert released[0] == "Hel"  # nothing that could start a stop sequence yet
    assert released[1] == "l"  # "o " is held back: it may become "o w"


def test_stop_scanner_releases_everything_without_a_stop():
    released, text, stopped = scan(["ab", "c", "de"], ["cdx"])
    assert "".join(released) == text == "abcde" and not stopped
    assert released[1] == ""  # "c" may start "cdx"
    assert released[2] == "cde"  # "cde" cannot


def test_stop_scanner_waits_for_whole_utf8_characters():
    scanner = StopScanner(TOKENIZER.decode, [])
    euro = [b + 3 for b in "€".encode()]
    assert scanner.update(euro[:1]) == "" and scanner.update(euro[:2]) == ""
    assert scanner.update(euro) == "€"


def test_parse_completion_defaults_and_limits():
    job = parse_completion({"model": "m", "prompt": "hi"}, SERVED)
    assert job.prompt_ids == TOKENIZER.encode("hi") and job.max_tokens == 16 and job.temperature == 1.0
    job = parse_completion({"model": "m", "prompt": ["hi"], "temperature": 0, "stop": "x", "seed": 3,
                            "presence_penalty": 0, "user": "someone"}, SERVED)
    assert job.temperature == 0.0 and job.stop == ("x",) and job.seed == 3
    assert parse_completion({"model": "m", "prompt": [5, 6, 7]}, SERVED).prompt_ids == [5, 6, 7]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "other", "prompt": "hi"}, 404, "model"),
    ({"model": "m"}, 400, "prompt"),
    ({"model": "m", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "m", "prompt": "hi", "temperature": True}, 400, "temperature"),
    ({"model": "m", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": "m", "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": "m", "prompt": "hi", "max_tokens": 33}, 400, "max_tokens"),
    ({"model": "m", "prompt": "x" * 60, "max_tokens": 10}, 400, "max_tokens"),
    ({"model": "m", "prompt": "x" * 80}, 400, "prompt"),
    ({"model": "m", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": "m", "prompt": "hi", "echo": True}, 400, "echo"),
    ({"model": "m", "prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
])
def test_parse_completion_refuses(body, status, param):
    with pytest.raises(ApiError) as info:
        parse_completion(body, SERVED)
    assert info.value.status == status and info.value.param == param
    assert info.value.body()["error"]["message"]


def test_parse_chat_needs_a_template():
    with pytest.raises(ApiError) as info:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, SERVED)
    assert info.value.status == 400 and info.value.code == "no_chat_template"


def test_error_statuses():
    busy = RemoteError(ErrorCode.BUSY, "all 4 session slots are in use", peer="12D3KooX")
    assert error_for(busy).status == 429
    failed = SessionFailed((0, 4), "every retry failed")
    failed.__cause__ = busy
    assert error_for(failed).status == 429
    assert error_for(NoRoute([(4, 6)])).status == 503
    assert error_for(SessionFailed((0, 4), "gone")).status == 503
    assert error_for(RemoteError(ErrorCode.TOO_LONG, "too long")).status == 400
    assert error_for(ConnectionRefusedError("refused")).status == 503
    internal = error_for(KeyError("boom"))
    assert internal.status == 500 and internal.type == "server_error"


def test_sampling_defaults_follow_the_checkpoint():
    assert sampling_defaults(None) == (1.0, 1.0)  # OpenAI's
    assert sampling_defaults(GenerationConfig()) == (0.0, 1.0)  # greedy checkpoint: greedy unless asked
    assert sampling_defaults(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9)) == (0.6, 0.9)
    greedy = ServedModel(model_id="m", tokenizer=TOKENIZER, context_limit=lambda: 64, max_tokens=32, temperature=0.0)
    assert parse_completion({"model": "m", "prompt": "hi"}, greedy).temperature == 0.0
    assert parse_completion({"model": "m", "prompt": "hi", "temperature": 0.7}, greedy).temperature == 0.7
