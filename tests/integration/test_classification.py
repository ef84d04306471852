"""Sequence classification through the swarm equals transformers' *ForSequenceClassification."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from petals_client import AutoDistributedModelForSequenceClassification

pytestmark = pytest.mark.integration

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4], [9, 9, 8, 7, 6, 5, 4, 3]])
LABELS = torch.tensor([0, 2, 1])


def test_logits_loss_and_head_gradients_equal_local(llama_path, llama_swarm):
    with AutoDistributedModelForSequenceClassification.from_pretrained(
            llama_path, initial_peers=llama_swarm.addrs, num_labels=3) as model:
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]
        # pad_token_id: one that is not in the rows, so that transformers pools each row's last token
        ref = AutoModelForSequenceClassification.from_pretrained(llama_path, num_labels=3, pad_token_id=127)
        ref.requires_grad_(False)
        ref.score.weight.data.copy_(model.score.weight.data)
        ref.score.weight.requires_grad_(True)
        expected = ref(input_ids=IDS, labels=LABELS)
        expected.loss.backward()
        out = model(input_ids=IDS, labels=LABELS)
        out.loss.backward()
        assert out.logits.shape == (3, 3)
        assert (out.logits - expected.logits).abs().max().item() <= 1e-5
        assert abs(out.loss.item() - expected.loss.item()) <= 1e-5
        assert (model.score.weight.grad - ref.score.weight.grad).abs().max().item() <= 1e-5

        optimizer = torch.optim.Adam([model.score.weight], lr=0.05)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = model(input_ids=IDS, labels=LABELS).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
