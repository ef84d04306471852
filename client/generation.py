"""Token selection and stopping, identical to `transformers` generate for the options we support.

The remote model produces logits one step at a time; everything that turns logits into tokens
happens here, on the client. To reproduce local generation exactly (greedy token for token, and
sampling draw for draw under the same seed) we build the same logits processors, in the same
order, and make the same calls (`softmax` then `torch.multinomial`) as transformers 5.x does in
`GenerationMixin._sample`. Beam search is not supported.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria, StoppingCriteriaList

#: generate() keyword arguments we honour; anything else is refused rather than silently ignored.
SUPPORTED_OPTIONS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "eos_token_id", "pad_token_id", "min_new_tokens", "num_beams",
    "stop_strings", "return_dict_in_generate", "output_scores", "output_logits",
})


class Streamer(Protocol):
    """The `transformers` streamer interface: `put` gets the prompt first, then each new token."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class Extras:
    """What transformers' generate takes besides options: custom processors and criteria, the
    tokenizer that `stop_strings` need. Custom ones replace built ones of the same type, as there."""

    logits_processor: LogitsProcessorList | None = None
    stopping_criteria: StoppingCriteriaList | None = None
    tokenizer: Any = None


@dataclass
class Decoded:
    """prompt + generated ids, and per step the processed scores and raw logits [B, vocab] when asked."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None


def resolve_config(base: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    """Merge a model's generation_config with per-call options, as transformers does."""
    unknown = set(options) - SUPPORTED_OPTIONS
    if unknown:
        raise TypeError(
            f"generate() got unsupported option(s) {sorted(unknown)}; supported: {sorted(SUPPORTED_OPTIONS)}"
        )
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.update(**options)
    if config.num_beams not in (None, 1):
        raise ValueError("beam search is not supported by the distributed model; use num_beams=1")
    return config


def eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _merge(default: list[Any], custom: list[Any] | None) -> list[Any]:
    """transformers' merge: a custom item replaces a default one of the same type; the rest follow."""
    custom = list(custom or [])
    merged = [next((c for c in custom if type(c) is type(d)), d) for d in default]
    return merged + [c for c in custom if c not in merged]


def build_logits_processor(config: GenerationConfig, custom: LogitsProcessorList | None = None) -> LogitsProcessorList:
    """The subset of `GenerationMixin._get_logits_processor` we support, in its order (custom
    processors after the built ones and before the sampling warpers, as there)."""
    processors: list[Any] = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    processors = _merge(processors, custom)
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return LogitsProcessorList(processors)


def build_stopping_criteria(config: GenerationConfig, extras: Extras) -> StoppingCriteriaList:
    """Stop strings and custom criteria (length and EOS are handled by `decode` itself)."""
    criteria: list[Any] = []
    if config.stop_strings is not None:
        if extras.tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer= to generate()")
        criteria.append(StopStringCriteria(tokenizer=extras.tokenizer, stop_strings=config.stop_strings))
    return StoppingCriteriaList(_merge(criteria, extras.stopping_criteria))


def max_new_tokens(config: GenerationConfig, prompt_length: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return max(0, int(config.max_length) - prompt_length)


def decode(
    input_ids: torch.Tensor,
    next_logits: Callable[[torch.Tensor], torch.Tensor],
    config: GenerationConfig,
    streamer: Streamer | None = None,
    unseen: torch.Tensor | None = None,
    extras: Extras | None = None,
    generator: torch.Generator | None = None,
) -> Decoded:
    """Extend `input_ids` [B, T] token by token; returns prompt + generated ids (and scores).

    `next_logits(new_ids)` feeds the ids not yet seen by the model (`unseen`, default the whole
    prompt, first; then one token per step) and returns the logits of the last position,
    [B, vocab]. `input_ids` is the whole context the logits processors see (e.g. the repetition
    penalty), which in a multi-turn session is longer than what this call feeds. A row is finished
    by an EOS token or a stopping criterion; with EOS ids, finished rows are padded with
    pad_token_id (defaulting to the first EOS id) while others continue, and the loop stops when
    every row is finished or the length budget is spent. `generator`: the random source for
    sampling (default torch's global one, as transformers uses).
    """
    extras = extras or Extras()
    eos = eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    processors = build_logits_processor(config, extras.logits_processor)
    stopping = build_stopping_criteria(config, extras)
    want = bool(config.return_dict_in_generate)
    scores: tuple[torch.Tensor, ...] | None = () if want and config.output_scores else None
    raw: tuple[torch.Tensor, ...] | None = () if want and config.output_logits else None
    budget = max_new_tokens(config, input_ids.shape[1])
    min_new = config.min_new_tokens or 0
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long)
    eos_tensor = torch.tensor(eos, dtype=torch.long) if eos else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    pending = input_ids if unseen is None else unseen
    for produced in range(budget):
        logits = next_logits(pending).to(dtype=torch.float32, copy=True)
        if raw is not None:
            raw += (logits.clone(),)
        if produced < min_new and eos_tensor is not None:
            logits[:, eos_tensor] = -float("inf")
        step_scores = processors(input_ids, logits)
        if scores is not None:
            scores += (step_scores,)
        if config.do_sample:
            probs = torch.nn.functional.softmax(step_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            next_tokens = torch.argmax(step_scores, dim=-1)
        if eos_tensor is not None and pad is not None:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos_tensor is not None:
            unfinished = unfinished & ~torch.isin(next_tokens, eos_tensor)
        if len(stopping):
            unfinished = unfinished & ~stopping(input_ids, scores).cpu()
        if not bool(unfinished.any()):
            break
        pending = next_tokens[:, None]
    if streamer is not None:
        streamer.end()
    return Decoded(input_ids, scores, raw)
