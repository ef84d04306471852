"""examples/prompt_tuning.py runs end to end: the loss falls, the tuned prompts generate and save."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prompt_tuning.py"


def test_the_prompt_tuning_example_lowers_the_loss_and_generates(tmp_path):
    spec = importlib.util.spec_from_file_location("prompt_tuning_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = io.StringIO()
    losses, text = example.tune(12, save=tmp_path / "prompts.pt", out=out)
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    assert text and "prompt tuning" in out.getvalue() and "loss=" in out.getvalue()
    saved = torch.load(tmp_path / "prompts.pt")
    assert set(saved) == {"ptune.prompt_embeddings.weight", "ptune.intermediate_prompt_embeddings.weight"}
