"""The flat block path (protocol/models/flat.py): bit-identical to the transformers modules, adopted
only when a load-time probe shows it is, and the module path kept otherwise."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from petals_protocol.models import flat
from petals_protocol.models.span import load_span

LLAMA_LAYOUT = ["llama", "llama-sharded", "mistral", "qwen2"]


def _steps(span, flat_steps: bool, hidden: torch.Tensor) -> list[torch.Tensor]:
    """A 3-token prefill of 2 sequences, then one token at a time (past mistral's 5-token window)."""
    span.flat_steps = flat_steps
    cache = span.new_cache(2, hidden.shape[1])
    outputs = [span.forward(hidden[:, :3], cache)]
    outputs += [span.forward(hidden[:, i : i + 1], cache) for i in range(3, hidden.shape[1])]
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", LLAMA_LAYOUT)
def test_flat_steps_equal_module_steps_bit_for_bit(checkpoint: Callable[[str], Path], name: str,
                                                   dtype: torch.dtype) -> None:
    span = load_span(checkpoint(name), 1, 5, dtype=dtype)
    assert span.flat_steps, "the load-time probe should have adopted the flat path"
    hidden = torch.randn(2, 12, span.hidden_size, generator=torch.Generator().manual_seed(5)).to(dtype)
    with_modules, flat_path = _steps(span, False, hidden), _steps(span, True, hidden)
    for step, (a, b) in enumerate(zip(with_modules, flat_path, strict=True)):
        assert torch.equal(a, b), f"step {step}: max difference {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize("name", ["bloom", "falcon"])
def test_other_layouts_keep_the_modules(checkpoint: Callable[[str], Path], name: str) -> None:
    span = load_span(checkpoint(name), 0, 2)
    assert span.flat is None and not span.flat_steps


def test_a_flat_path_that_differs_is_not_adopted(checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Stand-in for a transformers release whose block no longer matches flat.py: one ulp off."""
    original = flat.FlatBlock.finish

    def off_by_a_bit(self: flat.FlatBlock, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        out = original(self, hidden, attended)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(flat.FlatBlock, "finish", off_by_a_bit)
    with caplog.at_level(logging.WARNING, logger="petals_protocol.models.span"):
        span = load_span(checkpoint("llama"), 0, 3)
    assert span.flat is not None and not span.flat_steps
    assert "differs from the transformers modules" in caplog.text
    reference = load_span(checkpoint("llama"), 0, 3)
    reference.flat_steps = False
    hidden = torch.randn(1, 4, span.hidden_size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(span.forward(hidden, span.new_cache(1, 4)), reference.forward(hidden, reference.new_cache(1, 4)))
