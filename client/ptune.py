"""Prompt tuning as in Petals: trainable prompts on the client, frozen blocks in the swarm.

`ptune`: K prefix embeddings put before the tokens' embeddings (the model sees K more positions;
their outputs are dropped before the head). `deep_ptune`: also one [K, hidden] prompt per block,
added to the hidden states of positions [0, K) at that block's input, on the daemons (the
prompts travel with each forward/backward request and inference step; their gradients come
back with the backward replies).

The prompts are kept in float32 (as Petals does, for the optimizer's sake) and cast to the
model's dtype where they are used, so their gradients are float32 too.
"""
from __future__ import annotations

import torch
from torch import nn

TUNING_MODES = ("ptune", "deep_ptune")


class PromptTuning(nn.Module):
    """The trainable prompts of one model; `model.ptune` (saved in the model's `state_dict()`)."""

    def __init__(self, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int, init_std: float) -> None:
        super().__init__()
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        if pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be at least 1 for prompt tuning, got {pre_seq_len}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        self.num_blocks = num_blocks
        self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden_size, dtype=torch.float32)
        nn.init.normal_(self.prompt_embeddings.weight, std=init_std)
        self.intermediate_prompt_embeddings: nn.Embedding | None = None
        if mode == "deep_ptune":
            # zeros: a fresh deep-prompt model computes exactly what the plain ptune one does
            self.intermediate_prompt_embeddings = nn.Embedding(pre_seq_len, num_blocks * hidden_size,
                                                               dtype=torch.float32)
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    def prefix(self, batch_size: int) -> torch.Tensor:
        """The prefix embeddings [batch, K, hidden] put before the tokens' embeddings."""
        return self.prompt_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def deep_prompts(self) -> torch.Tensor | None:
        """Per-block prompts [blocks, 1, K, hidden] (the daemons broadcast them over the batch), or
        None for plain `ptune`."""
        if self.intermediate_prompt_embeddings is None:
            return None
        weight = self.intermediate_prompt_embeddings.weight
        return weight.view(self.pre_seq_len, self.num_blocks, -1).permute(1, 0, 2).unsqueeze(1)
