"""Text <-> token ids for the `petals` command.

A checkpoint either ships a Hugging Face tokenizer (loaded with `AutoTokenizer`, offline) or, like
the demo model, a `petals_tokenizer.json` describing a byte-level scheme: token = byte + offset.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

BYTE_TOKENIZER_FILE = "petals_tokenizer.json"


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def has_chat_template(self) -> bool: ...

    def chat(self, messages: list[dict[str, str]]) -> list[int]: ...


@dataclass
class ByteTokenizer:
    offset: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256).decode("utf-8", "replace")

    def incremental(self) -> Any:
        """A decoder that turns ids into text as they come, never splitting a UTF-8 character."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        offset = self.offset

        def feed(ids: list[int]) -> str:
            return decoder.decode(bytes(i - offset for i in ids if offset <= i < offset + 256))

        return feed

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        raise ValueError(f"this model's {BYTE_TOKENIZER_FILE} has no chat template")


class _HFTokenizer:
    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt for `messages` as transformers builds it: the template already holds the
        special tokens, so the rendered text is encoded without adding them again."""
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    spec_file = path / BYTE_TOKENIZER_FILE
    if spec_file.exists():
        spec = json.loads(spec_file.read_text())
        if spec.get("type") != "bytes":
            raise ValueError(f"{spec_file}: unsupported tokenizer type {spec.get('type')!r}")
        return ByteTokenizer(offset=int(spec["offset"]), bos_token_id=spec.get("bos_token_id"),
                             eos_token_id=spec.get("eos_token_id"), pad_token_id=spec.get("pad_token_id"))
    from transformers import AutoTokenizer

    try:
        return _HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} has no tokenizer (neither {BYTE_TOKENIZER_FILE} nor Hugging Face files): {exc}") from exc
