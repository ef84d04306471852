"""Fixtures for the batching tests: tiny random Llama-family checkpoints, built once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from petals_protocol.models.synthetic import make_random_checkpoint

# initializer_range 0.2 gives peaked greedy generations, so a wrong position or cache changes tokens
TINY: dict[str, Any] = dict(num_layers=4, hidden_size=64, num_heads=4, vocab_size=128, initializer_range=0.2)

CHECKPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"num_kv_heads": 2}),
    "mistral": ("mistral", {"sliding_window": 5, "num_kv_heads": 2}),
    "qwen2": ("qwen2", {}),
    "bloom": ("bloom", {}),
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
