"""A chain of 3 spans plus the client part reproduces transformers' greedy generation exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from petals_protocol.models.client_part import ClientPart, load_client_part
from petals_protocol.models.span import Span, SpanCache, load_span

CUTS = [(0, 2), (2, 3), (3, 6)]
NEW_TOKENS = 12
# Bit-exact is achievable and is what we measure; the contract's stated tolerance is 1e-5.
TOLERANCE = 1e-5


def prompt(batch_size: int = 1, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (batch_size, length), generator=torch.Generator().manual_seed(1))


def chain_generate(
    client: ClientPart, spans: list[Span], caches: list[SpanCache], ids: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy generation through the chain, as a client would run it: (new tokens, logits per step)."""
    tokens, logits, step_input = [], [], ids
    for _ in range(new_tokens):
        hidden = client.embed(step_input)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.forward(hidden, cache)
        step_logits = client.logits(hidden[:, -1:])[:, -1].float()
        step_input = step_logits.argmax(-1, keepdim=True)
        tokens.append(step_input)
        logits.append(step_logits)
    return torch.cat(tokens, dim=1), logits


def reference_generate(
    model: transformers.PreTrainedModel, ids: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model.generate(
        ids,
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,  # a random model may emit the eos id: generate all tokens
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert len(out.logits) == new_tokens
    return out.sequences[:, ids.shape[1] :], [step.float() for step in out.logits]


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("llama", torch.float32),
        ("llama-sharded", torch.float32),
        ("mistral", torch.float32),
        ("qwen2", torch.float32),
        ("bloom", torch.float32),
        ("bloom-sharded", torch.float32),
        ("falcon", torch.float32),
        ("falcon-alibi", torch.float32),
        ("falcon-gqa", torch.float32),
        ("llama", torch.bfloat16),
        ("mistral", torch.bfloat16),
        ("bloom", torch.bfloat16),
        ("falcon", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_three_spans_reproduce_generate(
    checkpoint: Callable[[str], Path],
    reference: Callable[..., transformers.PreTrainedModel],
    name: str,
    dtype: torch.dtype,
    batch_size: int,
) -> None:
    path = checkpoint(name)
    ids = prompt(batch_size)
    expected_tokens, expected_logits = reference_generate(reference(path, dtype), ids, NEW_TOKENS)

    spans = [load_span(path, a, b, dtype=dtype) for a, b in CUTS]
    client = load_client_part(path, dtype=dtype)
    caches = [span.new_cache(batch_size, max_length=ids.shape[1] + NEW_TOKENS) for span in spans]
    tokens, logits = chain_generate(client, spans, caches, ids, NEW_TOKENS)

    assert torch.equal(tokens, expected_tokens)
    max_diff = max((ours - theirs).abs().max().item() for ours, theirs in zip(logits, expected_logits, strict=True))
    assert max_diff <= TOLERANCE
    assert max_diff == 0.0, f"parity is bit-exact on this setup; got max logit diff {max_diff}"
    assert all(cache.length == ids.shape[1] + NEW_TOKENS - 1 for cache in caches)
