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

Only decode steps (one token per sequence) of the Llama family (llama, mistral, qwen2) are batched;
``can_batch`` says whether a step qualifies, and anything else goes through ``Span.forward``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from petals_protocol.errors import ErrorCode

from .families import LLAMA, StepContext, layer_types
from .span import Span, SpanCache, SpanUsageError


@dataclass
class DecodeItem:
    """One session's step: ``hidden`` [b, 1, H] continuing ``cache`` (over the cache's blocks)."""

    hidden: torch.Tensor
    cache: SpanCache


def can_batch(span: Span, hidden: torch.Tensor, cache: SpanCache | None) -> bool:
    """Whether this step can join a batched decode: a Llama-family span, one token, a cache."""
    return cache is not None and span.family is LLAMA and hidden.ndim == 3 and hidden.shape[1] == 1


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


def _rotary_function(attn: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The ``apply_rotary_pos_emb`` the attention module's own forward calls (its modeling module's)."""
    return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")


def _attention_kwargs(attn: nn.Module) -> dict[str, object]:
    """Extra keyword arguments the family's attention forward passes to the attention function.

    Qwen2 passes its per-layer ``sliding_window``, Mistral its config's; Llama passes none.
    """
    if hasattr(attn, "sliding_window"):
        return {"sliding_window": attn.sliding_window}
    window = getattr(attn.config, "sliding_window", None)
    return {"sliding_window": window} if window is not None else {}


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Sequence[int],
            items: Sequence[DecodeItem], contexts: Sequence[StepContext], layer_type: str) -> torch.Tensor:
    """Per-session attention of the stacked projections ``q, k, v`` [B, 1, heads*hd]; [B, 1, H*hd] out."""
    rotary = _rotary_function(attn)
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    extra = _attention_kwargs(attn)
    outputs: list[torch.Tensor] = []
    for (lo, hi), item, ctx in zip(zip(rows, rows[1:]), items, contexts, strict=True):
        shape = (hi - lo, 1, -1, attn.head_dim)
        qi = q[lo:hi].view(shape).transpose(1, 2)
        ki = k[lo:hi].view(shape).transpose(1, 2)
        vi = v[lo:hi].view(shape).transpose(1, 2)
        assert ctx.position_embeddings is not None and ctx.masks is not None
        cos, sin = ctx.position_embeddings
        qi, ki = rotary(qi, ki, cos, sin)
        ki, vi = item.cache.dynamic.update(ki, vi, attn.layer_idx)
        out, _ = interface(attn, qi, ki, vi, ctx.masks[layer_type], dropout=0.0, scaling=attn.scaling, **extra)
        outputs.append(out.reshape(hi - lo, 1, -1))
    return torch.cat(outputs, dim=0)


def batched_decode(span: Span, items: Sequence[DecodeItem]) -> list[torch.Tensor]:
    """Run one decode step of every item through its cache's blocks; each item's output, in order.

    All items must cover the same blocks ``[start, end)`` (the batcher groups them). Each cache
    grows by one token, exactly as ``span.forward(hidden, cache)`` would make it grow.
    """
    if not items:
        return []
    if span.family is not LLAMA:
        raise SpanUsageError(f"batched decode supports the llama family, not {span.family.name}")
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
        for block, layer_type in zip(span.blocks[start - span.start : end - span.start], types, strict=True):
            attn = block.self_attn
            residual = hidden
            normed = block.input_layernorm(hidden)
            q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
            attended = _attend(attn, q, k, v, rows, items, contexts, layer_type)
            hidden = residual + attn.o_proj(attended)
            residual = hidden
            hidden = residual + block.mlp(block.post_attention_layernorm(hidden))
    for it in items:
        it.cache.length += 1
    return [hidden[lo:hi] for lo, hi in zip(rows, rows[1:])]
