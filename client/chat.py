"""`petals chat`: an interactive conversation with a chat model served by a swarm.

Each turn renders the whole conversation with the tokenizer's chat template and streams the reply.
The turns share one inference session: when the new rendering starts with everything the session
has already seen (the usual case), only the new tokens are sent; otherwise (a template that
rewrites earlier turns, or a full cache) the conversation is replayed into a fresh session, so
the reply is always what the full rendering gives.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TextIO

import torch

from .model import DistributedModelForCausalLM, RemoteInferenceSession
from .tokenizer import Tokenizer


class _Printer:
    """A streamer printing the reply's text as its tokens arrive (the prompt is not echoed)."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO) -> None:
        self._feed = tokenizer.incremental()
        self._out = out
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self._out.write(self._feed([int(value.reshape(-1)[0])]))
        self._out.flush()

    def end(self) -> None:
        self._out.write("\n")
        self._out.flush()


def require_chat_template(tokenizer: Tokenizer) -> None:
    if not tokenizer.has_chat_template:
        raise ValueError("this model's tokenizer has no chat template; use `petals generate` for plain text")


def chat_loop(lm: DistributedModelForCausalLM, tokenizer: Tokenizer, lines: Iterable[str], out: TextIO, *,
              system: str | None = None, max_length: int = 2048, prompt: str = "> ",
              **options: Any) -> list[dict[str, str]]:
    """Answer each line of `lines` as a user turn; returns the conversation. `options` go to generate."""
    require_chat_template(tokenizer)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    session: RemoteInferenceSession | None = None
    try:
        out.write(prompt)
        out.flush()
        for line in lines:
            text = line.rstrip("\n")
            if not text.strip():
                out.write(prompt)
                out.flush()
                continue
            messages.append({"role": "user", "content": text})
            ids = tokenizer.chat(messages)
            seen = session.ids[0].tolist() if session is not None and session.ids is not None else None
            if seen is None or ids[:len(seen)] != seen:
                if session is not None:
                    session.close()
                session = lm.inference_session(max_length=max_length)
                seen = []
            if len(ids) >= max_length:
                raise ValueError(f"the conversation ({len(ids)} tokens) no longer fits max_length {max_length}")
            new = torch.tensor([ids[len(seen):]])
            budget = min(max_length - len(ids), options.get("max_new_tokens") or max_length)
            reply = lm.generate(new, session=session, streamer=_Printer(tokenizer, out),
                                **{**options, "max_new_tokens": budget})
            messages.append({"role": "assistant", "content": tokenizer.decode(reply[0, new.shape[1]:].tolist())})
            out.write(prompt)
            out.flush()
    finally:
        if session is not None:
            session.close()
    out.write("\n")
    return messages
