"""One decode step of several sessions through a span, as one batched forward (Llama-likes).

Concurrent sessions each hold their own ``SpanCache`` at their own position. Running them one after
another costs one [1, 1, H] matrix-vector product per linear layer per session, which leaves the
CPU memory-bound on the weights; stacking the sessions' rows lets every linear layer (q/k/v/o, the
MLP) read its weights once for all of them. Attention cannot be stacked (each session attends to
its own cache, of its own length), so it runs per session, with rotary embeddings at the session's
own position and ``cache.update`` on the session's own cache.

Parity: the norms, rotary, attention and residuals are row-wise, so they compute exactly what the
per-session path computes. The linear layers do not: CPU matmul kernels reduce in a different order
for M=1 (matrix-vector) and M>1 (matrix-matrix), so outputs differ by a few ulps (measured max
abs difference on the 271M shape: ~1e-6 in fp32, up to ~4e-3 in bf16 per linear layer). That is why
the daemon's batcher is opt-in: a batched session is not bit-identical to local ``transformers``.
After ``Span.pack_for_batching`` (the daemon calls it when batching is on) the linear layers run
oneDNN's matmul on packed weights (``packed.py``), faster for several rows on CPU, with
rounding differences of the same kind.

Only decode steps (one token per sequence) of the Llama family (llama, mistral, qwen2) are batched;
``can_batch`` says whether a step qualifies, and anything else goes through ``Span.forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from petals_protocol.errors import ErrorCode

from .families import layer_types
from .span import Span, SpanCache, SpanUsageError


@dataclass
class DecodeItem:
    """One session's step: ``hidden`` [b, 1, H] continuing ``cache`` (over the cache's blocks)."""

    hidden: torch.Tensor
    cache: SpanCache


def can_batch(span: Span, hidden: torch.Tensor, cache: SpanCache | None) -> bool:
    """Whether this step can join a batched decode: a Llama-family span, one token, a cache."""
    return cache is not None and span.flat is not None and hidden.ndim == 3 and hidden.shape[1] == 1


def check_item(span: Span, item: DecodeItem) -> torch.Tensor:
    """Validate a step as ``Span.forward`` does; return its hidden state in the span's dtype/device.

    Raises ``SpanUsageError`` (with the code a daemon replies with) before anything is computed, so
    a bad step is refused alone and never joins a batch.
    """
    cache, hidden = item.cache, item.hidden
    if cache.dynamic.offset != cache.start - span.start or not span.start <= cache.start < cache.end <= span.end:
        raise SpanUsageError(
            f"cache is for blocks [{cache.start}, {cache.end}) at offset {cache.dynamic.offset}, "
            f"not part of this span [{span.start}, {span.end})"
        )
    if hidden.ndim != 3 or hidden.shape[1] != 1 or hidden.shape[-1] != span.hidden_size:
        raise SpanUsageError(f"a batched decode step must be [batch, 1, {span.hidden_size}], got {tuple(hidden.shape)}")
    if hidden.shape[0] != cache.batch_size:
        raise SpanUsageError(f"cache batch size is {cache.batch_size}, hidden has {hidden.shape[0]} sequences")
    if cache.length + 1 > cache.max_length:
        raise SpanUsageError(
            f"{cache.length} cached + 1 new token exceed max_length {cache.max_length}", ErrorCode.TOO_LONG
        )
    return hidden.to(device=span.device, dtype=span.dtype)


def batched_decode(span: Span, items: Sequence[DecodeItem]) -> list[torch.Tensor]:
    """Run one decode step of every item through its cache's blocks; each item's output, in order.

    All items must cover the same blocks ``[start, end)`` (the batcher groups them). Each cache
    grows by one token, exactly as ``span.forward(hidden, cache)`` would make it grow.
    """
    if not items:
        return []
    if span.flat is None:
        raise SpanUsageError(f"batched decode supports the llama family (its block layout), not {span.family.name}")
    start, end = items[0].cache.start, items[0].cache.end
    if any((it.cache.start, it.cache.end) != (start, end) for it in items):
        raise SpanUsageError("a batched decode needs every session over the same blocks")
    if len({id(it.cache) for it in items}) != len(items):
        raise SpanUsageError("a session can join a batched decode only once")
    hiddens = [check_item(span, it) for it in items]
    types = layer_types(span.config)[start:end]
    # every session's masks and rotary embeddings come from its own cache length, built before
    # any block appends this step (as the per-session path does)
    with torch.no_grad():
        contexts = [
            span.family.prepare_step(span.config, h, it.cache.dynamic, types, span.rotary)
            for h, it in zip(hiddens, items, strict=True)
        ]
        rows = [0]
        for h in hiddens:
            rows.append(rows[-1] + h.shape[0])
        hidden = torch.cat(hiddens, dim=0)
        blocks = span.batch_blocks if span.batch_blocks is not None else span.flat
        for block, layer_type in zip(blocks[start - span.start : end - span.start], types, strict=True):
            q, k, v = block.project(hidden)
            attended = torch.cat([block.attend(q[lo:hi], k[lo:hi], v[lo:hi], ctx, layer_type)
                                  for (lo, hi), ctx in zip(zip(rows, rows[1:]), contexts, strict=True)], dim=0)
            hidden = block.finish(hidden, attended)
    for it in items:
        it.cache.length += 1
    return [hidden[lo:hi] for lo, hi in zip(rows, rows[1:])]
