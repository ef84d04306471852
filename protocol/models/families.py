"""The model-partition contract, per model family: which modules are blocks, which are the client's.

A family says where the block list lives in the checkpoint, which modules form the client part
(embeddings, final norm, head), and how to run one block with a KV cache. Running a block means
rebuilding exactly what the full model's ``forward`` builds before its layer loop (position ids,
rotary embeddings, masks from transformers' own mask utilities, alibi), because bit-identical
results with ``model.generate`` are the contract: any deviation would show up as a different token.

The per-step inputs are built *before* any block appends this step's keys and values to the cache,
since their sizes come from the cache length (as in the full model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache, get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.bloom.modeling_bloom import build_alibi_tensor as bloom_alibi
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi

from .checkpoint import ModelLoadError


@dataclass
class StepContext:
    """What every block of a span needs for one forward call, built once per call."""

    cache: Cache | None
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    masks: dict[str, torch.Tensor | None] | None = None  # per layer type ("full_attention", ...)
    mask: torch.Tensor | None = None
    alibi: torch.Tensor | None = None


# prepare(config, hidden, cache, layer_types of the blocks about to run, rotary module or None)
PrepareStep = Callable[
    [transformers.PretrainedConfig, torch.Tensor, Cache | None, Sequence[str], nn.Module | None], StepContext
]
# run(block, hidden, context, layer type of this block) -> hidden
RunBlock = Callable[[nn.Module, torch.Tensor, StepContext, str], torch.Tensor]


@dataclass(frozen=True)
class Family:
    """How one family of architectures is cut into client part and blocks.

    Module paths are relative to the causal-LM class (e.g. ``model.layers``); they are also the
    checkpoint prefixes, since transformers saves state dicts under those names.
    """

    name: str
    model_types: frozenset[str]
    base: str  # "model" for Llama-likes, "transformer" for Bloom / Falcon
    blocks_attr: str  # "layers" or "h"
    embedding_modules: tuple[str, ...]  # applied to token ids, in order (relative to base)
    final_norm: str  # relative to base
    head: str  # relative to the causal-LM class
    has_rotary: bool
    prepare_step: PrepareStep
    run_block: RunBlock
    flat: bool = False  # blocks have the Llama layout that ``flat.FlatBlock`` runs without the modules

    @property
    def block_prefix(self) -> str:
        """Checkpoint prefix of the block list, e.g. ``model.layers``."""
        return f"{self.base}.{self.blocks_attr}"

    def block_tensor_prefix(self, index: int) -> str:
        """Checkpoint prefix of block ``index`` (absolute), e.g. ``model.layers.3.``."""
        return f"{self.block_prefix}.{index}."

    def client_prefixes(self) -> tuple[str, ...]:
        """Checkpoint prefixes of the client's modules (embeddings, final norm, head)."""
        return (
            *(f"{self.base}.{m}." for m in self.embedding_modules),
            f"{self.base}.{self.final_norm}.",
            f"{self.head}.",
        )


def layer_types(config: transformers.PretrainedConfig) -> list[str]:
    """Attention type of every layer ("full_attention", "sliding_attention"), as the cache sees it.

    This is transformers' own inference (``layer_types`` if the config has it, else sliding when
    ``sliding_window`` is set), so masks and cache layers agree with the full model's.
    """
    types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return list(types)


_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def _position_ids(hidden: torch.Tensor, cache: Cache | None) -> torch.Tensor:
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)


def _prepare_rotary(
    config: transformers.PretrainedConfig,
    hidden: torch.Tensor,
    cache: Cache | None,
    types: Sequence[str],
    rotary: nn.Module | None,
) -> StepContext:
    """Llama-likes (llama, mistral, qwen2): as ``LlamaModel`` / ``Qwen2Model`` forward."""
    position_ids = _position_ids(hidden, cache)
    masks: dict[str, torch.Tensor | None] = {}
    for layer_type in dict.fromkeys(types):
        if layer_type not in _MASK_FUNCTIONS:
            raise ModelLoadError(config.name_or_path, f"unsupported attention layer type {layer_type!r}")
        # size the mask against the first local cache layer of this type (the full model does the same)
        masks[layer_type] = _MASK_FUNCTIONS[layer_type](
            config=config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=cache,
            position_ids=position_ids,
            layer_idx=list(types).index(layer_type),
        )
    assert rotary is not None, "llama-like families always have a rotary embedding"
    return StepContext(
        cache=cache,
        position_ids=position_ids,
        position_embeddings=rotary(hidden, position_ids=position_ids),
        masks=masks,
    )


def _run_rotary(block: nn.Module, hidden: torch.Tensor, ctx: StepContext, layer_type: str) -> torch.Tensor:
    assert ctx.masks is not None
    return block(
        hidden,
        attention_mask=ctx.masks[layer_type],
        position_ids=ctx.position_ids,
        position_embeddings=ctx.position_embeddings,
        cache=ctx.cache,
        use_cache=ctx.cache is not None,
    )


def _prepare_bloom(
    config: transformers.PretrainedConfig,
    hidden: torch.Tensor,
    cache: Cache | None,
    types: Sequence[str],
    rotary: nn.Module | None,
) -> StepContext:
    """Bloom: alibi over past+T keys and an additive float mask (eager), as ``BloomModel.forward``."""
    batch_size, seq_length, _ = hidden.shape
    kv_length = cache.get_mask_sizes(seq_length, 0)[0] if cache is not None else seq_length
    ones = torch.ones((batch_size, kv_length), dtype=torch.long, device=hidden.device)
    alibi = bloom_alibi(ones, config.n_head, dtype=hidden.dtype)
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=cache)
    return StepContext(cache=cache, mask=mask, alibi=alibi)


def _run_bloom(block: nn.Module, hidden: torch.Tensor, ctx: StepContext, layer_type: str) -> torch.Tensor:
    out, _ = block(
        hidden, alibi=ctx.alibi, attention_mask=ctx.mask, layer_past=ctx.cache, use_cache=ctx.cache is not None
    )
    return out


def _prepare_falcon(
    config: transformers.PretrainedConfig,
    hidden: torch.Tensor,
    cache: Cache | None,
    types: Sequence[str],
    rotary: nn.Module | None,
) -> StepContext:
    """Falcon (rotary or alibi): as ``FalconModel.forward``, alibi folded into a float mask."""
    batch_size, seq_length, _ = hidden.shape
    past = cache.get_seq_length() if cache is not None else 0
    alibi = None
    if config.alibi:
        ones = torch.ones((batch_size, seq_length + past), device=hidden.device, dtype=torch.long)
        alibi = falcon_alibi(ones, config.num_attention_heads, dtype=hidden.dtype)
    position_ids = _position_ids(hidden, cache)
    mask = create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=cache,
        position_ids=position_ids,
        allow_is_causal_skip=False,
    )
    if alibi is not None and mask is not None and mask.ndim == 4:
        min_dtype = torch.finfo(hidden.dtype).min
        if mask.dtype == torch.bool:
            mask = torch.where(mask, torch.full((), 0.0, device=mask.device, dtype=hidden.dtype), min_dtype)
        alibi = alibi.reshape(batch_size, -1, *alibi.shape[1:])
        mask = torch.masked_fill(
            alibi / math.sqrt(config.hidden_size // config.num_attention_heads), mask < -1, min_dtype
        )
    assert rotary is not None
    return StepContext(
        cache=cache,
        position_ids=position_ids,
        position_embeddings=rotary(hidden, position_ids=position_ids),
        mask=mask,
        alibi=alibi,
    )


def _run_falcon(block: nn.Module, hidden: torch.Tensor, ctx: StepContext, layer_type: str) -> torch.Tensor:
    out, _ = block(
        hidden,
        alibi=ctx.alibi,
        attention_mask=ctx.mask,
        position_ids=ctx.position_ids,
        layer_past=ctx.cache,
        use_cache=ctx.cache is not None,
        position_embeddings=ctx.position_embeddings,
    )
    return out


LLAMA = Family(
    name="llama",
    model_types=frozenset({"llama", "mistral", "qwen2"}),
    base="model",
    blocks_attr="layers",
    embedding_modules=("embed_tokens",),
    final_norm="norm",
    head="lm_head",
    has_rotary=True,
    prepare_step=_prepare_rotary,
    run_block=_run_rotary,
    flat=True,
)
BLOOM = Family(
    name="bloom",
    model_types=frozenset({"bloom"}),
    base="transformer",
    blocks_attr="h",
    embedding_modules=("word_embeddings", "word_embeddings_layernorm"),
    final_norm="ln_f",
    head="lm_head",
    has_rotary=False,
    prepare_step=_prepare_bloom,
    run_block=_run_bloom,
)
FALCON = Family(
    name="falcon",
    model_types=frozenset({"falcon"}),
    base="transformer",
    blocks_attr="h",
    embedding_modules=("word_embeddings",),
    final_norm="ln_f",
    head="lm_head",
    has_rotary=True,
    prepare_step=_prepare_falcon,
    run_block=_run_falcon,
)
FAMILIES: tuple[Family, ...] = (LLAMA, BLOOM, FALCON)


def supported_model_types() -> list[str]:
    """Every ``model_type`` this module can partition."""
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(config: transformers.PretrainedConfig) -> Family:
    """The family of ``config.model_type``; a ModelLoadError naming the supported types otherwise."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    raise ModelLoadError(
        getattr(config, "name_or_path", "") or "<config>",
        f"model_type {config.model_type!r} is not supported; supported: {', '.join(supported_model_types())}",
    )
