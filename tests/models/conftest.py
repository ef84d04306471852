"""Fixtures for the model-partition tests: tiny random checkpoints, built once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from petals_protocol.models.synthetic import make_random_checkpoint

# initializer_range 0.2 (HF default 0.02) gives peaked, varied greedy generations: a wrong mask or
# position changes tokens instead of hiding in near-uniform logits.
TINY: dict[str, Any] = dict(num_layers=6, hidden_size=64, num_heads=4, vocab_size=128, initializer_range=0.2)

# name -> (family, extra arguments); every test module picks from these
CHECKPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-sharded": ("llama", {"shards": 3, "num_kv_heads": 2}),
    "mistral": ("mistral", {"sliding_window": 5, "num_kv_heads": 2}),
    "qwen2": ("qwen2", {}),
    "bloom": ("bloom", {}),
    "bloom-sharded": ("bloom", {"shards": 2}),
    "falcon": ("falcon", {}),
    "falcon-alibi": ("falcon", {"alibi": True}),
    "falcon-gqa": ("falcon", {"num_kv_heads": 2, "shards": 2}),
}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """The test machine's cores are shared; tiny models gain nothing from more threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(name) -> path of the CHECKPOINTS entry, written on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, extra = CHECKPOINTS[name]
            built[name] = make_random_checkpoint(tmp_path_factory.mktemp(name), family, **{**TINY, **extra})
        return built[name]

    return get


@pytest.fixture(scope="session")
def reference() -> Callable[..., transformers.PreTrainedModel]:
    """reference(path, dtype) -> the full transformers model, the ground truth for parity."""

    def load(path: Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    return load
