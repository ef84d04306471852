"""Span semantics: chunked prefill, rollback, beam reorder, sub-spans, training forward and backward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from petals_protocol.errors import ErrorCode
from petals_protocol.models.client_part import load_client_part
from petals_protocol.models.span import SpanUsageError, load_span

FAMILIES = ["llama", "mistral", "qwen2", "bloom", "falcon", "falcon-alibi"]


def hidden_input(batch_size: int, length: int, hidden_size: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, length, hidden_size, generator=torch.Generator().manual_seed(seed))


def run_in_chunks(span, cache, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([span.forward(hidden[:, i : i + chunk], cache) for i in range(0, hidden.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_chunking_does_not_change_results(checkpoint: Callable[[str], Path], name: str) -> None:
    span = load_span(checkpoint(name), 1, 5)
    prefix, steps = hidden_input(2, 9), hidden_input(2, 3, seed=3)
    results = []
    for chunk in (1, 3, 9):
        cache = span.new_cache(2, 16)
        prefill = run_in_chunks(span, cache, prefix, chunk)
        after = run_in_chunks(span, cache, steps, 1)
        assert cache.length == 12
        results.append(torch.cat([prefill, after], dim=1))
    # Different chunkings run different matmul shapes, so equality is up to float rounding
    # (measured: about 1e-6 of the hidden states' magnitude, fp32).
    scale = results[0].abs().max().item()
    for other in results[1:]:
        assert (other - results[0]).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("name", FAMILIES)
def test_crop_then_restep_equals_original(checkpoint: Callable[[str], Path], name: str) -> None:
    span = load_span(checkpoint(name), 0, 6)
    prefix, steps = hidden_input(1, 6), hidden_input(1, 5, seed=4)
    cache = span.new_cache(1, 16)
    span.forward(prefix, cache)
    original = run_in_chunks(span, cache, steps, 1)  # 11 tokens: past mistral's 5-token window
    cache.crop(7)
    assert cache.length == 7
    again = run_in_chunks(span, cache, steps[:, 1:], 1)
    assert torch.equal(again, original[:, 1:])
    # a wrong continuation after a rollback is overwritten by a second rollback
    cache.crop(8)
    span.forward(hidden_input(1, 2, seed=9), cache)
    cache.crop(8)
    assert torch.equal(run_in_chunks(span, cache, steps[:, 2:], 1), original[:, 2:])
    with pytest.raises(SpanUsageError):
        cache.crop(cache.length + 1)


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_reorder_follows_hypotheses(checkpoint: Callable[[str], Path], name: str) -> None:
    span = load_span(checkpoint(name), 0, 3)
    prefix, step = hidden_input(3, 4), hidden_input(3, 1, seed=5)
    hypo_ids = torch.tensor([2, 2, 0])

    cache = span.new_cache(3, 8)
    span.forward(prefix, cache)
    cache.reorder(hypo_ids)
    reordered = span.forward(step, cache)

    fresh = span.new_cache(3, 8)
    span.forward(prefix[hypo_ids], fresh)
    assert torch.equal(reordered, span.forward(step, fresh))
    with pytest.raises(SpanUsageError):
        cache.reorder(torch.tensor([0, 1, 3]))


def test_sub_span_cache_matches_separate_spans(checkpoint: Callable[[str], Path]) -> None:
    path = checkpoint("qwen2")
    whole = load_span(path, 0, 6)
    first, second = load_span(path, 0, 2), load_span(path, 2, 6)
    hidden = hidden_input(1, 5)
    cache_a, cache_b = whole.new_cache(1, 8, 0, 2), whole.new_cache(1, 8, 2, 6)
    via_sub_spans = whole.forward(whole.forward(hidden, cache_a), cache_b)
    via_spans = second.forward(first.forward(hidden, first.new_cache(1, 8)), second.new_cache(1, 8))
    assert torch.equal(via_sub_spans, via_spans)
    with pytest.raises(SpanUsageError):
        whole.forward(hidden, cache_a, 0, 3)
    with pytest.raises(SpanUsageError):
        first.new_cache(1, 8, 1, 3)


def test_cache_limits_are_enforced(checkpoint: Callable[[str], Path]) -> None:
    span = load_span(checkpoint("llama"), 0, 2)
    cache = span.new_cache(2, 4)
    with pytest.raises(SpanUsageError):
        span.forward(hidden_input(1, 2), cache)  # wrong batch size
    span.forward(hidden_input(2, 3), cache)
    with pytest.raises(SpanUsageError) as too_long:
        span.forward(hidden_input(2, 2), cache)  # 3 + 2 > max_length 4
    assert too_long.value.code is ErrorCode.TOO_LONG
    assert cache.length == 3
    with pytest.raises(SpanUsageError):
        span.forward(torch.zeros(2, 1, 32), cache)  # wrong hidden size


def test_cache_bytes_per_token(checkpoint: Callable[[str], Path]) -> None:
    # llama-sharded: 2 kv heads of head_dim 16, fp32: per block 2 (k, v) * 2 * 16 * 4 bytes
    span = load_span(checkpoint("llama-sharded"), 1, 4)
    assert span.cache_bytes_per_token(1) == 3 * 2 * 2 * 16 * 4
    assert span.cache_bytes_per_token(3, 2, 3) == 3 * 2 * 2 * 16 * 4
    # falcon (old architecture) is multi-query: one kv head
    falcon = load_span(checkpoint("falcon"), 0, 2, dtype=torch.bfloat16)
    assert falcon.cache_bytes_per_token(2) == 2 * 2 * 2 * 1 * 16 * 2
    cache = falcon.new_cache(2, 8)
    falcon.forward(hidden_input(2, 5), cache)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.dynamic.layers)
    assert held == 5 * falcon.cache_bytes_per_token(2)


def capture_span_of_full_model(
    model: transformers.PreTrainedModel, start: int, end: int, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the full model without cache; return (leaf input of block start, output of block end-1)."""
    layers = model.get_decoder().layers if hasattr(model.get_decoder(), "layers") else model.get_decoder().h
    captured: dict[str, torch.Tensor] = {}

    def make_leaf(module, args, kwargs):
        captured["input"] = args[0].detach().requires_grad_(True)
        return (captured["input"], *args[1:]), kwargs

    def keep_output(module, args, output):
        captured["output"] = output[0] if isinstance(output, tuple) else output

    handles = [
        layers[start].register_forward_pre_hook(make_leaf, with_kwargs=True),
        layers[end - 1].register_forward_hook(keep_output),
    ]
    try:
        model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured["input"], captured["output"]


@pytest.mark.parametrize("name", FAMILIES)
def test_training_forward_and_backward_match_full_model(
    checkpoint: Callable[[str], Path], reference: Callable[..., transformers.PreTrainedModel], name: str
) -> None:
    path = checkpoint(name)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    start, end = 2, 5
    block_input, block_output = capture_span_of_full_model(reference(path), start, end, ids)
    span = load_span(path, start, end)

    out = span.forward(block_input.detach())
    assert torch.equal(out, block_output.detach())

    grad_output = torch.randn(block_output.shape, generator=torch.Generator().manual_seed(7))
    (expected_grad,) = torch.autograd.grad(block_output, block_input, grad_output)
    grad, no_prompt_grad = span.backward(block_input.detach(), grad_output)
    assert no_prompt_grad is None
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in span.blocks.parameters())


def test_forward_without_cache_is_differentiable(checkpoint: Callable[[str], Path]) -> None:
    path = checkpoint("llama")
    span, client = load_span(path, 0, 6), load_client_part(path)
    hidden = client.embed(torch.tensor([[1, 2, 3]])).requires_grad_(True)
    client.logits(span.forward(hidden)).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def _drive(steps):
    """Run a span's blockwise generator to the end; return (value, pieces)."""
    pieces = 0
    while True:
        try:
            next(steps)
            pieces += 1
        except StopIteration as done:
            return done.value, pieces + 1


@pytest.mark.parametrize("name", FAMILIES)
def test_blockwise_forward_and_backward_equal_the_whole_span(checkpoint: Callable[[str], Path], name: str) -> None:
    """What daemons run for forward/backward requests (one block per compute job, so decode steps
    of other sessions interleave) is bit-identical to the span's one-piece forward and backward."""
    span = load_span(checkpoint(name), 1, 6)
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    grad_output = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out, pieces = _drive(span.forward_blocks(hidden, 2, 6))
        assert torch.equal(out, span.forward(hidden, None, 2, 6)) and pieces == 4
    (grad, no_prompts), pieces = _drive(span.backward_blocks(hidden, grad_output, 2, 6))
    assert torch.equal(grad, span.backward(hidden, grad_output, 2, 6)[0]) and no_prompts is None and pieces == 8
    # With deep prompts (one per block, on the first positions): outputs and both gradients.
    prompts = torch.randn(4, 1, 3, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out, _ = _drive(span.forward_blocks(hidden, 2, 6, prompts))
        assert torch.equal(out, span.forward(hidden, None, 2, 6, prompts))
    (grad, grad_prompts), _ = _drive(span.backward_blocks(hidden, grad_output, 2, 6, prompts))
    expected_grad, expected_prompts = span.backward(hidden, grad_output, 2, 6, prompts)
    assert torch.equal(grad, expected_grad) and torch.equal(grad_prompts, expected_prompts)
    assert span.activation_bytes(2, 7, 2, 6, grad=True) > span.activation_bytes(2, 7, 2, 6) > 2 * 7 * 64 * 4
