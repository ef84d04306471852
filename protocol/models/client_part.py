"""The client's part of a model: token embeddings, final norm and LM head, and nothing else.

A user's program holds only these modules; the blocks run on daemons. Loading reads only the
client's tensors from the checkpoint. A tied head (Bloom, Falcon, any ``tie_word_embeddings``
model) reuses the embedding matrix: such checkpoints have no ``lm_head.weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn

from .checkpoint import Checkpoint, ModelLoadError
from .families import Family, family_for
from .packed import pack
from .span import build_skeleton, load_modules


class ClientPart(nn.Module):
    """Embeddings, final norm and head of a causal LM, weights frozen."""

    def __init__(
        self,
        config: transformers.PretrainedConfig,
        family: Family,
        embeddings: nn.ModuleList,
        final_norm: nn.Module,
        head: nn.Linear,
    ) -> None:
        super().__init__()
        self.config = config
        self.family = family
        self.embeddings = embeddings
        self.final_norm = final_norm
        self.head = head
        self.num_blocks: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size

    def embed(self, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, H] for the first block.

        ``position`` (tokens before these) is unused by the supported families, whose positions are
        applied inside the blocks (rotary, alibi); it is part of the contract for absolute-position
        families such as GPT-2.
        """
        return self.after_embeddings(self.embeddings[0](input_ids.to(self.embeddings[0].weight.device)))

    def after_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """What the model applies to the token embeddings (transformers' ``inputs_embeds``) before
        the first block: nothing for most families, a layer norm for Bloom."""
        hidden = inputs_embeds
        for module in self.embeddings[1:]:
            hidden = module(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head, in the model's dtype, as the full model returns them for these positions.

        ``generate`` applies the head to the last position only; pass ``hidden[:, -1:]`` to match it.
        """
        hidden = hidden.to(device=self.head.weight.device, dtype=self.head.weight.dtype)
        return self.head(self.final_norm(hidden))

    def packed_logits(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``logits`` on a oneDNN-packed copy of the head's weight, for many rows at once (the
        client's head batching: a fraction of ``F.linear``'s time on CPU, BENCHMARKS.md, "Packed
        weights for batches"; not bit-identical to it, see ``packed.py``). Costs a second copy of the
        head's weight; None where packing is unavailable (then use ``logits``)."""
        packed = pack(self.head.weight, self.head.bias)
        if packed is None:
            return None

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.to(device=self.head.weight.device, dtype=self.head.weight.dtype)
            return packed(self.final_norm(hidden))

        return logits


def _tied(config: transformers.PretrainedConfig) -> bool:
    return bool(getattr(config.get_text_config(decoder=True), "tie_word_embeddings", False))


def load_client_part(
    path: str | Path | Checkpoint, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ClientPart:
    """Load the client's modules of the checkpoint at ``path``, reading only their tensors."""
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
    config = checkpoint.config
    family = family_for(config)
    device = torch.device(device)
    skeleton = build_skeleton(config)
    base = getattr(skeleton, family.base)
    embeddings = nn.ModuleList(getattr(base, name) for name in family.embedding_modules)
    for name, module in zip(family.embedding_modules, embeddings, strict=True):
        load_modules(checkpoint, module, f"{family.base}.{name}.", dtype, device)
    final_norm = getattr(base, family.final_norm)
    load_modules(checkpoint, final_norm, f"{family.base}.{family.final_norm}.", dtype, device)
    head: nn.Linear = getattr(skeleton, family.head)
    if _tied(config):
        if head.bias is not None:
            raise ModelLoadError(checkpoint.path, "a tied LM head with a bias is not supported")
        head.weight = embeddings[0].weight  # the same Parameter, as in the full model
    else:
        load_modules(checkpoint, head, f"{family.head}.", dtype, device)
    return ClientPart(config, family, embeddings, final_norm, head).requires_grad_(False).eval()
