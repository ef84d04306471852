"""`AutoDistributedModelForSequenceClassification`: the swarm's blocks under a trainable head.

As transformers' `*ForSequenceClassification` of the decoder families: the final norm, then a
linear `score` head (no bias) on the last token's hidden state; the loss follows
`config.problem_type` (regression for one label, cross-entropy for integer labels, binary
cross-entropy for multi-label targets). The head lives on the client and is trainable; it is read
from the checkpoint when it has `score.weight` (a classification checkpoint), else initialised
as transformers does.

    model = AutoDistributedModelForSequenceClassification.from_pretrained(path, initial_peers=[...],
                                                                          num_labels=3)
    out = model(input_ids=ids, labels=labels)                      # .loss, .logits [B, num_labels]
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from petals_protocol.models.checkpoint import Checkpoint

from .model import DistributedModelBase


class DistributedModelForSequenceClassification(DistributedModelBase):
    def _configure(self, *, checkpoint: Checkpoint, num_labels: int = 2, problem_type: str | None = None,
                   **options: Any) -> None:
        super()._configure(checkpoint=checkpoint, **options)
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.num_labels = num_labels
        self.problem_type = problem_type
        weight = self.get_input_embeddings().weight
        self.score = nn.Linear(self.client_part.hidden_size, num_labels, bias=False, dtype=weight.dtype,
                               device=weight.device)
        if checkpoint.names_with_prefix("score."):
            stored = checkpoint.load(["score.weight"], weight.dtype, weight.device)["score.weight"]
            if stored.shape != self.score.weight.shape:
                raise ValueError(f"the checkpoint's score head is {list(stored.shape)}, not for {num_labels} labels")
            with torch.no_grad():
                self.score.weight.copy_(stored)
        else:
            text = self.config.get_text_config(decoder=True)
            nn.init.normal_(self.score.weight, std=getattr(text, "initializer_range", 0.02))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None) -> SequenceClassifierOutput:
        hidden = self.hidden_states(input_ids, inputs_embeds, attention_mask)
        last = hidden[:, -1].to(self.score.weight.dtype)  # no padding: every row's last token
        logits = self.score(self.client_part.final_norm(last))
        loss = None if labels is None else self._loss(logits, labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' rule for choosing the loss (its `problem_type`)."""
        problem = self.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float()) \
                if self.num_labels == 1 else nn.functional.mse_loss(logits.float(), labels.float())
        if problem == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


AutoDistributedModelForSequenceClassification = DistributedModelForSequenceClassification
