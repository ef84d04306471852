"""Text <-> token ids for the `petals` command: the checkpoint's own Hugging Face tokenizer.

Loaded with `AutoTokenizer` from the tokenizer files of a local folder or a Hub model (only those
files are fetched, through the Hugging Face cache). The shipped demo model has a standard
`tokenizer.json` (byte-level) like any other.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from petals_protocol.models.source import open_source

#: the files a Hugging Face tokenizer may consist of; those that exist are fetched before loading it
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class Tokenizer:
    """A Hugging Face tokenizer with the few calls the command needs."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.eos_token_id: int | None = hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids of a conversation rendered by the tokenizer's chat template, ready for the reply."""
        rendered = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.hf(rendered, add_special_tokens=False)["input_ids"])

    def incremental(self) -> Callable[[list[int]], str]:
        """A decoder fed ids as they come that returns the new text, holding back an unfinished
        character (byte-level vocabularies split UTF-8 characters over several tokens)."""
        ids: list[int] = []
        printed = 0

        def feed(new: list[int]) -> str:
            nonlocal printed
            ids.extend(new)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                return ""
            out, printed = text[printed:], len(text)
            return out

        return feed


def load_tokenizer(model: str | Path, *, revision: str | None = None, token: str | bool | None = None) -> Tokenizer:
    """The tokenizer of a local checkpoint folder or Hub model id."""
    from transformers import AutoTokenizer

    source = open_source(model, revision=revision, token=token)
    for name in TOKENIZER_FILES:
        source.fetch_optional(name)
    folder = source.fetch("config.json").parent
    try:
        return Tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # one line, not HF's essay
        raise ValueError(f"{model} has no usable tokenizer files: {reason}") from exc
