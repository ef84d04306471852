"""The shipped demo model (client/demo/model/) really continues the Zen of Python.

Loads the checkpoint the way any consumer would (plain AutoModelForCausalLM + AutoTokenizer), greedy-decodes from "Beautiful is better" and compares with the text of
the stdlib `this` module: a corrupted or retrained-and-broken checkpoint fails here.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

MODEL_DIR = Path(__file__).resolve().parents[2] / "client" / "demo" / "model"
PROMPT = "Beautiful is better"
MIN_MATCHING_CHARS = 100


@pytest.fixture(scope="module")
def zen() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


OFFSET = 3  # byte b is token b + 3; below sit pad, bos, eos


@pytest.fixture(scope="module")
def scheme() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.set_num_threads(1)
    loaded = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    loaded.eval()
    return loaded


def encode(scheme: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(scheme(text)["input_ids"])


def decode(scheme: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(scheme.decode(ids, skip_special_tokens=True))


def test_tokenizer_is_byte_level(scheme: PreTrainedTokenizerBase, model: torch.nn.Module) -> None:
    text = "Beautiful is better than ugly.\n  Ünïcode ✓ \x00"
    assert encode(scheme, text) == [scheme.bos_token_id] + [b + OFFSET for b in text.encode("utf-8")]
    assert decode(scheme, encode(scheme, text)) == text
    assert decode(scheme, [b + OFFSET for b in "é".encode()] + [scheme.eos_token_id, scheme.pad_token_id]) == "é"
    specials = {scheme.bos_token_id, scheme.eos_token_id, scheme.pad_token_id}
    assert len(specials) == 3 and max(specials) < OFFSET
    assert len(scheme) == model.config.vocab_size == OFFSET + 256
    assert model.config.bos_token_id == scheme.bos_token_id
    assert model.config.eos_token_id == scheme.eos_token_id
    assert model.config.pad_token_id == scheme.pad_token_id
    assert model.generation_config.eos_token_id == scheme.eos_token_id


def test_checkpoint_is_small_float32_safetensors(model: torch.nn.Module) -> None:
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 10_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 2_000_000


def test_greedy_generation_continues_the_zen(zen: str, scheme: PreTrainedTokenizerBase, model: torch.nn.Module) -> None:
    expected = zen[zen.index(PROMPT) + len(PROMPT) :]
    input_ids = torch.tensor([encode(scheme, PROMPT)])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=MIN_MATCHING_CHARS + 20,
            do_sample=False,
        )
    text = decode(scheme, out[0, input_ids.shape[1] :].tolist())
    assert len(text) >= MIN_MATCHING_CHARS
    assert text == expected[: len(text)]


def test_greedy_choice_is_the_zen_up_to_eos(zen: str, scheme: PreTrainedTokenizerBase, model: torch.nn.Module) -> None:
    """Teacher-forced argmax over the whole continuation: what greedy decoding would pick at every
    step, in one forward pass instead of ~840 decode steps. All right, and the last pick is eos,
    so generation (whose config stops at eos) ends exactly at the end of the Zen."""
    prompt_ids = encode(scheme, PROMPT)
    expected = zen[zen.index(PROMPT) + len(PROMPT) :]
    target = [b + OFFSET for b in expected.encode("utf-8")] + [scheme.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + target])).logits[0]
    picks = logits[len(prompt_ids) - 1 : -1].argmax(dim=-1).tolist()
    assert decode(scheme, picks) == expected
    assert picks == target
