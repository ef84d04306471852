"""The shipped demo model (client/demo/model/) really continues the Zen of Python.

Loads the checkpoint the way any consumer would (AutoModelForCausalLM + petals_tokenizer.json,
no HF tokenizer class), greedy-decodes from "Beautiful is better" and compares with the text of
the stdlib `this` module: a corrupted or retrained-and-broken checkpoint fails here.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

MODEL_DIR = Path(__file__).resolve().parents[2] / "client" / "demo" / "model"
PROMPT = "Beautiful is better"
MIN_MATCHING_CHARS = 100


@pytest.fixture(scope="module")
def zen() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


@pytest.fixture(scope="module")
def scheme() -> dict[str, int | str | bool]:
    return json.loads((MODEL_DIR / "petals_tokenizer.json").read_text())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.set_num_threads(1)
    loaded = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    loaded.eval()
    return loaded


def encode(scheme: dict, text: str) -> list[int]:
    return [scheme["bos_token_id"]] + [b + scheme["offset"] for b in text.encode("utf-8")]


def decode(scheme: dict, ids: list[int]) -> str:
    offset = scheme["offset"]
    return bytes(i - offset for i in ids if offset <= i < offset + 256).decode("utf-8")


def test_tokenizer_description_is_byte_level(scheme: dict, model: torch.nn.Module) -> None:
    assert scheme["type"] == "bytes"
    specials = {scheme["bos_token_id"], scheme["eos_token_id"], scheme["pad_token_id"]}
    assert len(specials) == 3 and max(specials) < scheme["offset"]
    assert model.config.vocab_size == scheme["offset"] + 256
    assert model.config.bos_token_id == scheme["bos_token_id"]
    assert model.config.eos_token_id == scheme["eos_token_id"]
    assert model.config.pad_token_id == scheme["pad_token_id"]
    assert model.generation_config.eos_token_id == scheme["eos_token_id"]


def test_checkpoint_is_small_float32_safetensors(model: torch.nn.Module) -> None:
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 10_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 2_000_000


def test_greedy_generation_continues_the_zen(zen: str, scheme: dict, model: torch.nn.Module) -> None:
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


def test_greedy_choice_is_the_zen_up_to_eos(zen: str, scheme: dict, model: torch.nn.Module) -> None:
    """Teacher-forced argmax over the whole continuation: what greedy decoding would pick at every
    step, in one forward pass instead of ~840 decode steps. All right, and the last pick is eos,
    so generation (whose config stops at eos) ends exactly at the end of the Zen."""
    prompt_ids = encode(scheme, PROMPT)
    expected = zen[zen.index(PROMPT) + len(PROMPT) :]
    target = [b + scheme["offset"] for b in expected.encode("utf-8")] + [scheme["eos_token_id"]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + target])).logits[0]
    picks = logits[len(prompt_ids) - 1 : -1].argmax(dim=-1).tolist()
    assert decode(scheme, picks) == expected
    assert picks == target
