"""Llama-like decoder blocks (llama, mistral, qwen2) as straight-line torch calls.

transformers runs each block through about fifteen ``nn.Module`` calls, two keyword-deprecation
wrappers and a gradient-checkpointing shim. On a decode step that plumbing is a real share of a
span's time, because the tensors are tiny, the more so the smaller the model (figures for this
project's benchmark shapes: BENCHMARKS.md, "Flat blocks"). The local model pays it too, so every
block a daemon runs flat narrows the gap to local generation.

The functions here make the same torch calls, in the same order, with the same arguments as the
modules' own ``forward`` (the norms' float32 upcast, ``F.linear`` with the module's weight and bias,
the modeling module's own ``apply_rotary_pos_emb``, ``cache.update``, the configured attention
function), so the results are bit-identical. That is checked, not assumed: ``Span`` runs a probe
through both paths when it loads and keeps the module path if they differ in any bit (a future
transformers release may change a block), see ``Span._adopt_flat_blocks``.

The batched decode (``batched.py``) uses the same pieces with several sessions' rows stacked, on
``PackedBlock``s where the weights can be packed for oneDNN (``packed.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .families import StepContext
from .packed import PackedLinear, pack

RotaryFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def is_flat_capable(block: nn.Module) -> bool:
    """Whether ``block`` has the Llama layout these functions assume (they are then verified on a probe)."""
    attn = getattr(block, "self_attn", None)
    mlp = getattr(block, "mlp", None)
    norms = (getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None))
    return (
        attn is not None and mlp is not None
        and all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        and all(norm is not None and hasattr(norm, "variance_epsilon") for norm in norms)
        and hasattr(attn, "head_dim") and hasattr(attn, "scaling") and hasattr(attn, "layer_idx")
    )


def rotary_function(attn: nn.Module) -> RotaryFunction:
    """The ``apply_rotary_pos_emb`` the attention module's own forward calls (its modeling module's)."""
    return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")


def attention_function(attn: nn.Module) -> Callable[..., tuple[torch.Tensor, object]]:
    """The attention implementation the module's forward would pick (sdpa, eager, ...)."""
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)


def attention_kwargs(attn: nn.Module) -> dict[str, object]:
    """Extra keyword arguments the family's attention forward passes to the attention function.

    Qwen2 passes its per-layer ``sliding_window``, Mistral its config's; Llama passes none.
    """
    if hasattr(attn, "sliding_window"):
        return {"sliding_window": attn.sliding_window}
    window = getattr(attn.config, "sliding_window", None)
    return {"sliding_window": window} if window is not None else {}


class FlatBlock:
    """One decoder block, its tensors and functions looked up once, run as ``LlamaDecoderLayer.forward``
    runs it (``nn.Module`` attribute lookups alone would cost ~30 per block per step).

    ``project`` / ``attend`` / ``finish`` are the three stages, so that the batched decode can run
    ``project`` and ``finish`` on several sessions' stacked rows and ``attend`` per session.
    """

    def __init__(self, block: nn.Module) -> None:
        attn, ffn = block.self_attn, block.mlp
        self.attn = attn
        self.norm1 = (block.input_layernorm.weight, block.input_layernorm.variance_epsilon)
        self.norm2 = (block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon)
        self.q, self.k, self.v, self.o = ((p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        self.gate, self.up, self.down = ((p.weight, p.bias) for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
        self.act = ffn.act_fn
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scaling
        self.layer_idx: int = attn.layer_idx
        self.rotary = rotary_function(attn)
        self.attention = attention_function(attn)
        self.attention_kwargs = attention_kwargs(attn)

    def __call__(self, hidden: torch.Tensor, ctx: StepContext, layer_type: str) -> torch.Tensor:
        return self.finish(hidden, self.attend(*self.project(hidden), ctx, layer_type))

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, then the q, k, v projections [B, T, heads * head_dim]."""
        normed = _rms_norm(hidden, *self.norm1)
        return self.linear(normed, self.q), self.linear(normed, self.k), self.linear(normed, self.v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext,
               layer_type: str) -> torch.Tensor:
        """One session's attention: rotary at its positions, its cache updated; [B, T, heads * head_dim]."""
        batch, tokens = q.shape[:2]
        shape = (batch, tokens, -1, self.head_dim)
        assert ctx.position_embeddings is not None and ctx.masks is not None
        q, k = self.rotary(q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), *ctx.position_embeddings)
        v = v.view(shape).transpose(1, 2)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.layer_idx)
        out, _ = self.attention(self.attn, q, k, v, ctx.masks[layer_type], dropout=0.0, scaling=self.scaling,
                                **self.attention_kwargs)
        return out.reshape(batch, tokens, -1).contiguous()

    def finish(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, then the post-attention norm, MLP and residual."""
        hidden = hidden + self.linear(attended, self.o)
        normed = _rms_norm(hidden, *self.norm2)
        gated = self.act(self.linear(normed, self.gate)) * self.linear(normed, self.up)
        return hidden + self.linear(gated, self.down)

    @staticmethod
    def linear(x: torch.Tensor, layer: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """The module's own call: ``F.linear`` with its weight and bias."""
        return F.linear(x, *layer)


class PackedBlock(FlatBlock):
    """A ``FlatBlock`` whose linear layers run on oneDNN-packed copies of the weights (``packed.py``):
    for the batched decode only, whose matmuls have several rows (faster on CPU, not
    bit-identical to ``F.linear``). ``packed_block`` builds one where every layer can be packed."""

    @staticmethod
    def linear(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:  # type: ignore[override]
        return layer(x)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed copies (in addition to the module's weights)."""
        return sum(layer.nbytes for layer in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down))


def packed_block(block: nn.Module) -> PackedBlock | None:
    """``block`` with its seven linear layers packed for oneDNN, or None if any cannot be."""
    flat = PackedBlock(block)
    layers = [pack(*wb) for wb in (flat.q, flat.k, flat.v, flat.o, flat.gate, flat.up, flat.down)]
    if any(layer is None for layer in layers):
        return None
    flat.q, flat.k, flat.v, flat.o, flat.gate, flat.up, flat.down = layers  # type: ignore[assignment]
    return flat


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (Mistral's and Qwen2's are the same code)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)
