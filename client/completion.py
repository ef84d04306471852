"""One text completion through the swarm, as the OpenAI API serves it: tokens in, text pieces out.

`run_completion` runs in a worker thread (generation is blocking torch work and calls into the
client runtime) and reports what happens through `emit`: `Started` once the prompt went through
the swarm and the first token is chosen, `Delta`s of text as it becomes final, then `Finished`.
Each call opens its own inference session (model.generate owns it) and closes it on every exit:
a stop sequence, the end-of-text token, the length budget, an error, or `cancelled` being set
(the HTTP client went away), which is checked before every step.

`StopScanner` is the sans-IO part: it turns the growing list of generated ids into text that
will not change any more, cut at the first stop sequence. Text that could still become a stop
sequence, or ends in an incomplete UTF-8 character, is held back until it is decided.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CompletionJob", "Started", "Delta", "Finished", "StopScanner", "run_completion"]

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class CompletionJob:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """The route is open and the prompt is in every daemon's cache."""


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end-of-text token or stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion (what the deltas add up to)


class StopScanner:
    """Decoded text of the generated ids, cut at the first stop sequence, released when final."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.text = ""  # the decoded text so far (cut at a stop sequence once one is found)
        self.released = 0  # how much of `text` was handed out
        self.stopped = False

    def update(self, ids: list[int]) -> str:
        """Decode `ids` (all generated so far) and return the newly final text."""
        self.text = self._decode(ids)
        hits = [i for i in (self.text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._undecided_tail())

    def finish(self) -> str:
        """Everything not released yet: the generation ended, nothing is undecided any more."""
        return self._release(len(self.text))

    def _undecided_tail(self) -> int:
        text = self.text
        tail = len(text) - len(text.rstrip(REPLACEMENT_CHAR))  # a UTF-8 character still incomplete
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), tail, -1):
                if text.endswith(stop[:k]):
                    tail = k
                    break
        return tail

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        piece, self.released = self.text[self.released:end], end
        return piece


class _Halt(Exception):
    """Raised from the streamer to end generation early (stop sequence or cancelled)."""


class _Streamer:
    """The transformers streamer interface, fed by model.generate: the prompt, then each token."""

    def __init__(self, scanner: StopScanner, emit: Callable[[object], None], cancelled: threading.Event,
                 eos: set[int]) -> None:
        self.scanner = scanner
        self.emit = emit
        self.cancelled = cancelled
        self.eos = eos
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.cancelled.is_set():
                raise _Halt
            return
        token = int(value.reshape(-1)[0])
        if not self.ids:
            self.emit(Started())
        self.ids.append(token)
        piece = self.scanner.update([t for t in self.ids if t not in self.eos])
        if piece:
            self.emit(Delta(piece))
        if self.scanner.stopped or self.cancelled.is_set():
            raise _Halt

    def end(self) -> None:
        pass


def run_completion(model: Any, decode: Callable[[list[int]], str], job: CompletionJob,
                   emit: Callable[[object], None], cancelled: threading.Event) -> None:
    """Generate `job` through the swarm with `model` (a DistributedModelForCausalLM); see the module docstring."""
    from . import generation

    config = generation.resolve_config(model.generation_config, {})
    eos = set(generation.eos_ids(config))
    scanner = StopScanner(decode, job.stop)
    streamer = _Streamer(scanner, emit, cancelled, eos)
    options: dict[str, Any] = {"max_new_tokens": job.max_tokens}
    generator = None
    if job.temperature > 0:
        options.update(do_sample=True, temperature=job.temperature, top_p=job.top_p, top_k=0)
        generator = torch.Generator()
        if job.seed is not None:
            generator.manual_seed(job.seed)
        else:
            generator.seed()
    else:
        options["do_sample"] = False
    try:
        model.generate(torch.tensor([job.prompt_ids]), streamer=streamer, generator=generator, **options)
    except _Halt:
        if not scanner.stopped:
            return  # cancelled: nobody is listening any more
    ended_on_eos = bool(streamer.ids) and streamer.ids[-1] in eos
    reason = "stop" if scanner.stopped or ended_on_eos else "length"
    rest = scanner.finish()
    if rest:
        emit(Delta(rest))
    emit(Finished(reason, len(job.prompt_ids), len(streamer.ids), scanner.text))
