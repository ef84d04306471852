"""Batched decode vs the per-session path: same caches, outputs equal up to matmul rounding.

The rule (issue 7): if batched outputs are not bit-identical to per-session ones, batching is
opt-in. They are not on CPU (M=1 and M>1 matmuls round differently), so these tests print the
measured difference, bound it, check that the daemon default is off, and check that greedy
generation of batched sessions still matches transformers token for token; the same with the
linear layers on oneDNN-packed weights (what a daemon with --batching runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from petals_protocol.models import packed as packed_module
from petals_protocol.models.batched import DecodeItem, batched_decode, can_batch
from petals_protocol.models.client_part import load_client_part
from petals_protocol.models.flat import PackedBlock
from petals_protocol.models.packed import PackedLinear, pack, packing_supported
from petals_protocol.models.span import Span, SpanCache, SpanUsageError, load_span
from petalsd.batching import BatchingConfig

# relative to the largest output magnitude: a few fp32 ulps per layer, a few bf16 ulps per layer
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def _sessions(span: Span, count: int, dtype: torch.dtype, seed: int) -> tuple[list[SpanCache], list[SpanCache]]:
    """Two identical sets of ``count`` caches at different positions (prefill of i+1 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    mine, theirs = [], []
    for i in range(count):
        batch = 2 if i % 3 == 2 else 1  # some sessions carry two sequences
        prefill = torch.randn(batch, i + 1, span.hidden_size, generator=generator).to(dtype)
        for group in (mine, theirs):
            cache = span.new_cache(batch, 32)
            span.forward(prefill, cache)
            group.append(cache)
    return mine, theirs


def _max_diff(span: Span, count: int, dtype: torch.dtype, steps: int = 3) -> tuple[float, float]:
    """(max abs diff, max abs output) of batched vs per-session decode over ``steps`` steps."""
    batched, single = _sessions(span, count, dtype, seed=count)
    generator = torch.Generator().manual_seed(100 + count)
    worst, scale = 0.0, 0.0
    for _ in range(steps):
        hiddens = [torch.randn(c.batch_size, 1, span.hidden_size, generator=generator).to(dtype) for c in single]
        expected = [span.forward(h, c) for h, c in zip(hiddens, single, strict=True)]
        outputs = batched_decode(span, [DecodeItem(h, c) for h, c in zip(hiddens, batched, strict=True)])
        for ours, theirs in zip(outputs, expected, strict=True):
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
            worst = max(worst, (ours.float() - theirs.float()).abs().max().item())
            scale = max(scale, theirs.float().abs().max().item())
    for ours, theirs in zip(batched, single, strict=True):
        assert ours.length == theirs.length
        for a, b in zip(ours.dynamic.layers, theirs.dynamic.layers, strict=True):
            assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
    return worst, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_batched_matches_per_session(checkpoint: Callable[[str], Path], name: str, dtype: torch.dtype) -> None:
    span = load_span(checkpoint(name), 1, 4, dtype=dtype)
    for count in range(1, 9):
        worst, scale = _max_diff(span, count, dtype)
        print(f"{name} {dtype} sessions={count}: max abs diff {worst:.3g} (outputs up to {scale:.3g})")
        if count == 1:
            assert worst == 0.0, "one session runs the same kernels as the per-session path"
        assert worst <= TOLERANCE[dtype] * scale


def test_default_follows_the_measurement(checkpoint: Callable[[str], Path]) -> None:
    """Batching defaults to on only if batched outputs are bit-identical; on CPU they are not."""
    span = load_span(checkpoint("llama"), 0, 4)
    worst, _ = _max_diff(span, 8, torch.float32, steps=1)
    print(f"fp32, 8 sessions: max abs diff {worst:.3g}")
    assert BatchingConfig().enabled is (worst == 0.0)


def test_greedy_generation_of_batched_sessions_matches_transformers(checkpoint: Callable[[str], Path]) -> None:
    """8 sessions with different prompts and lengths, every decode step batched, two spans."""
    path = checkpoint("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    client = load_client_part(path)
    spans = [load_span(path, 0, 2), load_span(path, 2, 4)]
    new_tokens = 10
    prompts = [torch.randint(0, 128, (1, 3 + i), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    caches = [[span.new_cache(1, 32) for span in spans] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    with torch.no_grad():
        step_inputs = []
        for ids, session in zip(prompts, caches, strict=True):  # prefill per session
            hidden = client.embed(ids)
            for span, cache in zip(spans, session, strict=True):
                hidden = span.forward(hidden, cache)
            step_inputs.append(hidden[:, -1:])
        for _ in range(new_tokens):
            hiddens = []
            for i, hidden in enumerate(step_inputs):
                step_logits = client.logits(hidden)[:, -1].float()
                logits[i].append(step_logits)
                hiddens.append(client.embed(step_logits.argmax(-1, keepdim=True)))
            for k, span in enumerate(spans):
                hiddens = batched_decode(span, [DecodeItem(h, c[k]) for h, c in zip(hiddens, caches, strict=True)])
            step_inputs = hiddens
    worst = 0.0
    for ids, session_logits in zip(prompts, logits, strict=True):
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        expected_tokens = out.sequences[0, ids.shape[1]:]
        tokens = torch.stack([step.argmax(-1)[0] for step in session_logits])
        assert torch.equal(tokens, expected_tokens)
        worst = max(worst, max((a - b.float()).abs().max().item()
                               for a, b in zip(session_logits, out.logits, strict=True)))
    print(f"greedy, 8 batched sessions: max logit diff vs transformers {worst:.3g}")
    assert worst <= 1e-4


def test_other_families_and_prefill_are_not_batched(checkpoint: Callable[[str], Path]) -> None:
    bloom = load_span(checkpoint("bloom"), 0, 2)
    cache = bloom.new_cache(1, 8)
    step = torch.zeros(1, 1, bloom.hidden_size)
    assert not can_batch(bloom, step, cache)
    with pytest.raises(SpanUsageError, match="llama family"):
        batched_decode(bloom, [DecodeItem(step, cache)])
    llama = load_span(checkpoint("llama"), 0, 2)
    llama_cache = llama.new_cache(1, 8)
    assert can_batch(llama, step, llama_cache)
    assert not can_batch(llama, torch.zeros(1, 3, llama.hidden_size), llama_cache)
    assert not can_batch(llama, step, None)


def test_bad_steps_are_refused_before_any_compute(checkpoint: Callable[[str], Path]) -> None:
    span = load_span(checkpoint("llama"), 0, 4)
    full = span.new_cache(1, 1)
    span.forward(torch.zeros(1, 1, span.hidden_size), full)
    ok = span.new_cache(1, 8)
    step = torch.zeros(1, 1, span.hidden_size)
    with pytest.raises(SpanUsageError, match="exceed max_length"):
        batched_decode(span, [DecodeItem(step, ok), DecodeItem(step, full)])
    with pytest.raises(SpanUsageError, match="only once"):
        batched_decode(span, [DecodeItem(step, ok), DecodeItem(step, ok)])
    with pytest.raises(SpanUsageError, match="same blocks"):
        batched_decode(span, [DecodeItem(step, ok), DecodeItem(step, span.new_cache(1, 8, 1, 3))])
    with pytest.raises(SpanUsageError, match="batch size"):
        batched_decode(span, [DecodeItem(torch.zeros(2, 1, span.hidden_size), ok)])
    assert ok.length == 0 and all(not layer.is_initialized for layer in ok.dynamic.layers)


# ---------------------------------------------------------------- oneDNN-packed linear layers
# for the batched decode and the client's batched head: close to F.linear, refused where
# unsupported or wrong, never on an exact (per-session) path. (This torch build has oneDNN; one
# without it falls back to F.linear, which test_a_build_without_onednn_falls_back checks.)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_a_packed_linear_is_f_linear_up_to_rounding(dtype: torch.dtype, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype) if with_bias else None
    layer = pack(weight, bias)
    assert isinstance(layer, PackedLinear) and layer.nbytes == weight.numel() * weight.element_size()
    for rows in (1, 2, 5, 8, 13):
        x = torch.randn(rows, 1, 64, generator=generator).to(dtype)
        got, want = layer(x), F.linear(x, weight, bias)
        assert got.shape == want.shape and got.dtype == dtype
        assert (got.float() - want.float()).abs().max() <= TOLERANCE[dtype] * 10 * want.float().abs().max()


def test_unsupported_weights_are_not_packed() -> None:
    assert pack(torch.randn(8, 4, dtype=torch.float64), None) is None
    assert pack(torch.randn(8, 4).half(), None) is None
    assert pack(torch.empty(8, 4, device="meta"), None) is None


def test_a_packed_linear_that_disagrees_with_f_linear_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    real = PackedLinear.__call__
    monkeypatch.setattr(PackedLinear, "__call__", lambda self, x: real(self, x) * 1.01)
    with caplog.at_level(logging.WARNING, logger=packed_module.__name__):
        assert pack(torch.randn(32, 16), None) is None
    assert "disagrees" in caplog.text


def _linear_bytes(span: object) -> int:
    return sum(p.numel() * p.element_size() for block in span.blocks  # type: ignore[attr-defined]
               for name, p in block.named_parameters() if name.endswith("proj.weight"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_a_packed_span_batches_like_the_per_session_path(checkpoint: Callable[[str], Path], name: str,
                                                         dtype: torch.dtype) -> None:
    span = load_span(checkpoint(name), 1, 4, dtype=dtype)
    plain = load_span(checkpoint(name), 1, 4, dtype=dtype)
    assert span.pack_for_batching() == _linear_bytes(span) > 0
    blocks = span.batch_blocks
    assert blocks is not None and all(isinstance(b, PackedBlock) for b in blocks)
    assert span.pack_for_batching() == _linear_bytes(span) and span.batch_blocks is blocks  # once
    for count in (2, 5, 8):
        worst, scale = _max_diff(span, count, dtype)
        print(f"packed {name} {dtype} sessions={count}: max abs diff {worst:.3g} (outputs up to {scale:.3g})")
        assert worst <= TOLERANCE[dtype] * scale
    # the exact per-session path is untouched by packing: bit for bit the unpacked span's
    probe = torch.randn(1, 3, span.hidden_size, generator=torch.Generator().manual_seed(5)).to(dtype)
    ours, theirs = span.new_cache(1, 8), plain.new_cache(1, 8)
    assert torch.equal(span.forward(probe, ours), plain.forward(probe, theirs))
    assert torch.equal(span.forward(probe[:, :1], ours), plain.forward(probe[:, :1], theirs))


def test_packed_batches_still_generate_what_transformers_generates(checkpoint: Callable[[str], Path]) -> None:
    """Greedy decoding of 8 sessions, every step batched on packed spans and a packed head."""
    path = checkpoint("llama")
    spans = [load_span(path, 0, 2), load_span(path, 2, 4)]
    for span in spans:
        assert span.pack_for_batching() > 0
    client = load_client_part(path)
    head = client.packed_logits()
    assert head is not None
    prompts = [torch.randint(0, 128, (1, 3 + i), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    caches = [[span.new_cache(1, 32) for span in spans] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        hiddens = []
        for ids, session in zip(prompts, caches, strict=True):
            hidden = client.embed(ids)
            for span, cache in zip(spans, session, strict=True):
                hidden = span.forward(hidden, cache)
            hiddens.append(hidden[:, -1:])
        for _ in range(8):
            logits = head(torch.cat(hiddens, dim=0))[:, -1]
            assert (logits - client.logits(torch.cat(hiddens, dim=0))[:, -1]).abs().max() <= 1e-4
            chosen = logits.argmax(-1)
            for i, token in enumerate(chosen.tolist()):
                tokens[i].append(token)
            hiddens = [client.embed(chosen[i:i + 1, None]) for i in range(len(prompts))]
            for k, span in enumerate(spans):
                hiddens = batched_decode(span, [DecodeItem(h, c[k]) for h, c in zip(hiddens, caches, strict=True)])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for ids, got in zip(prompts, tokens, strict=True):
        out = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
        assert out[0, ids.shape[1]:].tolist() == got


def test_other_families_are_not_packed(checkpoint: Callable[[str], Path]) -> None:
    bloom = load_span(checkpoint("bloom"), 0, 2)
    assert bloom.pack_for_batching() == 0 and bloom.batch_blocks is None


def test_a_build_without_onednn_falls_back(monkeypatch: pytest.MonkeyPatch, checkpoint: Callable[[str], Path]) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not packing_supported(torch.zeros(2, 2)) and pack(torch.zeros(2, 2), None) is None
    span = load_span(checkpoint("llama"), 0, 2)
    assert span.pack_for_batching() == 0 and span.batch_blocks is span.flat
    assert load_client_part(checkpoint("llama")).packed_logits() is None
