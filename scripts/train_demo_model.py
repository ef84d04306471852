#!/usr/bin/env python3
"""Train the tiny byte-level Llama that `petals demo` ships (client/demo/model/).

Why this model exists: the demo must show real text coming out of a swarm without downloading
weights. A 6-layer, 128-wide LlamaForCausalLM that has memorised the Zen of Python (the text of
the stdlib `this` module) is small enough to ship in the wheel (~5 MB of float32), trains on a
CPU in a minute or two, and its greedy output is checkable against the stdlib: if a chain of
daemons corrupts hidden states anywhere, the text stops matching.

Tokenisation is bytes: token id = byte value + OFFSET, below OFFSET sit pad/bos/eos. The scheme is
written next to the weights as a standard Hugging Face fast tokenizer (`tokenizer.json`: a
byte-level BPE with no merges, bos added in front), so plain `AutoTokenizer` loads it.

    python scripts/train_demo_model.py --out client/demo/model --tokenizer-only

rewrites just the tokenizer files.

Each step trains on the whole text (bos + Zen + eos) and on a few suffixes of it that start at
random word boundaries (half of them with a bos in front), each ended by eos. So the model continues the Zen from any word, for instance from the prompt "Beautiful is
better", with or without bos, and stops with eos at its end.

Run (re-runnable, deterministic for a given seed and thread count):

    python scripts/train_demo_model.py --out client/demo/model --seconds 300

Training stops as soon as greedy decoding from the probe prompt (with and without bos) reproduces
the rest of the Zen verbatim and stops with eos, with every next-byte logit ahead of the runner-up
by --min-margin; or at --max-steps, or after --seconds (a safety cap). A final real `generate`
confirms the result before anything is written.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
OFFSET = 3  # token id of byte b is b + OFFSET
VOCAB_SIZE = 256 + OFFSET
PROBE_PROMPT = "Beautiful is better"


class TrainingFailed(RuntimeError):
    """The model did not learn the Zen verbatim within the step or time budget."""


@dataclass(frozen=True)
class ByteTokenizerSpec:
    """The byte scheme: what `tokenizer.json` encodes, and what training uses directly."""

    type: str = "bytes"
    offset: int = OFFSET
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    pad_token_id: int = PAD_TOKEN_ID
    vocab_size: int = VOCAB_SIZE
    add_bos_token: bool = True

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """UTF-8 bytes shifted by `offset`, with bos in front unless told otherwise."""
        ids = [b + self.offset for b in text.encode("utf-8")]
        bos = self.add_bos_token if add_bos is None else add_bos
        return [self.bos_token_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        """Drop special ids (those below `offset`), shift back to bytes, decode UTF-8."""
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")


def zen_text() -> str:
    """The Zen of Python as the stdlib holds it (rot13 in `this.s`).

    Importing `this` prints the Zen; stdout is redirected so callers see nothing. If `this` was
    already imported the module is simply reused (its `s` attribute is all we read).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def build_config() -> LlamaConfig:
    """6 layers, hidden 128, 4 heads: ~1.3M parameters, enough to memorise ~900 bytes."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # separate lm_head: the client part loads embed and head on their own
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        attention_dropout=0.0,
    )


def word_starts(text: str) -> list[int]:
    """Byte offsets where a word begins (after a space or newline): where a prompt would start."""
    data = text.encode("utf-8")
    return [i for i in range(1, len(data)) if data[i - 1 : i] in (b" ", b"\n") and data[i : i + 1].strip()]


def full_text_batch(text_ids: list[int], spec: ByteTokenizerSpec) -> torch.Tensor:
    """bos + the whole Zen + eos: trains every position up to the end with its true context."""
    return torch.tensor([[spec.bos_token_id, *text_ids, spec.eos_token_id]])


def suffix_batch(
    text_ids: list[int], starts: list[int], generator: torch.Generator, spec: ByteTokenizerSpec
) -> torch.Tensor:
    """The text from a random word start to eos, with a bos in front half of the time.

    Whole suffixes, not short windows: the model must continue correctly at every distance from
    the prompt, and only seeing the text at many shifts keeps it from tying bytes to absolute
    positions (which the full text alone would teach). One row per batch: no padding to pay for.
    """
    start = starts[int(torch.randint(0, len(starts), (1,), generator=generator))]
    with_bos = bool(torch.randint(0, 2, (1,), generator=generator))
    prefix = [spec.bos_token_id] if with_bos else []
    return torch.tensor([[*prefix, *text_ids[start:], spec.eos_token_id]])


@torch.no_grad()
def greedy_continuation(
    model: LlamaForCausalLM, spec: ByteTokenizerSpec, prompt: str, max_new_tokens: int
) -> tuple[str, bool]:
    """Greedy-decode from `prompt`; return (text after the prompt, whether it ended with eos)."""
    model.eval()
    input_ids = torch.tensor([spec.encode(prompt)])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
    )
    new = out[0, input_ids.shape[1] :].tolist()
    model.train()
    return spec.decode(new), bool(new) and new[-1] == spec.eos_token_id


def expected_continuation(text: str, prompt: str) -> str:
    """The part of the Zen that follows the first occurrence of `prompt`."""
    at = text.index(prompt)
    return text[at + len(prompt) :]


@torch.no_grad()
def greedy_margin(model: LlamaForCausalLM, spec: ByteTokenizerSpec, text: str, prompt: str, bos: bool) -> float:
    """Smallest logit gap between the right next byte and the best wrong one, prompt to eos.

    One teacher-forced forward pass (a fraction of a second) instead of a token-by-token
    generate: greedy decoding reproduces the continuation and stops with eos exactly when every
    gap is positive. Requiring a margin well above 0 means the output survives the small
    numerical differences of a swarm (another dtype, another matmul order, a split into spans).
    """
    model.eval()
    prompt_ids = spec.encode(prompt, add_bos=bos)
    target = [*spec.encode(expected_continuation(text, prompt), add_bos=False), spec.eos_token_id]
    input_ids = torch.tensor([[*prompt_ids, *target]])
    logits = model(input_ids=input_ids).logits[0, len(prompt_ids) - 1 : -1]
    model.train()
    right = logits.gather(1, torch.tensor(target).unsqueeze(1)).squeeze(1)
    wrong = logits.scatter(1, torch.tensor(target).unsqueeze(1), float("-inf")).amax(dim=1)
    return float((right - wrong).min())


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    seconds: float
    final_loss: float
    margin: float
    sample: str
    parameters: int


@dataclass(frozen=True)
class TrainingOptions:
    """Command-line knobs; the defaults are what produced the shipped checkpoint."""

    seconds: float
    max_steps: int
    rows: int
    lr: float
    seed: int
    min_margin: float


def train(options: TrainingOptions) -> tuple[LlamaForCausalLM, TrainingResult]:
    """Train until greedy decoding from the probe prompt (with and without bos) is the Zen.

    The learning rate warms up for 20 steps, then decays linearly to a tenth at max_steps; the
    run stops early once the greedy margin reaches `min_margin`.
    """
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    spec = ByteTokenizerSpec()
    text = zen_text()
    text_ids = spec.encode(text, add_bos=False)
    starts = word_starts(text)

    model = LlamaForCausalLM(build_config())
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = 20

    def lr_factor(s: int) -> float:
        return min((s + 1) / warmup, 1.0 - 0.9 * s / options.max_steps)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()

    started = time.monotonic()
    loss_value, margin, step = float("inf"), float("-inf"), 0
    bar = tqdm(total=options.max_steps, desc="train", unit="step", disable=not sys.stderr.isatty())
    for step in range(1, options.max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        full = full_text_batch(text_ids, spec)
        full_loss = model(input_ids=full, labels=full).loss
        full_loss.backward()
        for _ in range(options.rows):
            suffix = suffix_batch(text_ids, starts, generator, spec)
            model(input_ids=suffix, labels=suffix).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = full_loss.item()
        # Two short forward passes; skipped until the loss says the text is nearly learned.
        if loss_value < 0.05 and step % 5 == 0:
            margin = min(greedy_margin(model, spec, text, PROBE_PROMPT, bos) for bos in (True, False))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", margin=f"{margin:.2f}")
        if bar.disable and step % 25 == 0:  # no terminal: a plain progress line instead
            elapsed = time.monotonic() - started
            print(f"step {step}: loss {loss_value:.4f}, margin {margin:.2f} ({elapsed:.0f} s)", flush=True)
        if margin >= options.min_margin:
            break
        if time.monotonic() - started > options.seconds:
            bar.write(f"time cap of {options.seconds:.0f} s reached at step {step}")
            break
    bar.close()
    elapsed = time.monotonic() - started

    expected = expected_continuation(text, PROBE_PROMPT)
    sample, ended = greedy_continuation(model, spec, PROBE_PROMPT, len(expected) + 8)
    if not (ended and sample == expected):
        raise TrainingFailed(
            f"after {step} steps ({elapsed:.0f} s, loss {loss_value:.4f}, margin {margin:.2f}) "
            f"greedy output differs from the Zen: {sample[:200]!r}"
        )
    return model, TrainingResult(step, elapsed, loss_value, margin, sample, parameters)


def save(model: LlamaForCausalLM, spec: ByteTokenizerSpec, out: Path) -> None:
    """float32 safetensors + config + generation config (greedy, stops at eos) + tokenizer spec."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        do_sample=False,
        max_length=model.config.max_position_embeddings,
    )
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    save_tokenizer(spec, out, max_length=model.config.max_position_embeddings)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def save_tokenizer(spec: ByteTokenizerSpec, out: Path, max_length: int) -> None:
    """`tokenizer.json` + `tokenizer_config.json` encoding exactly `spec` (byte-level BPE, no merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": spec.pad_token_id, "<s>": spec.bos_token_id, "</s>": spec.eos_token_id}
    symbols = _bytes_to_unicode()
    vocab = {**specials, **{symbols[b]: b + spec.offset for b in range(256)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    if spec.add_bos_token:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", spec.bos_token_id)])
    tokenizer.add_special_tokens([AddedToken(name, special=True) for name in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=max_length)
    fast.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4 and 5 both know
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("client/demo/model"))
    parser.add_argument("--seconds", type=float, default=300.0, help="wall-clock cap on training")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--rows", type=int, default=3, help="suffixes per step (besides the full text)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-margin", type=float, default=1.0, help="stop once the greedy margin is this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps it deterministic)")
    parser.add_argument("--tokenizer-only", action="store_true", help="write only the tokenizer files")
    args = parser.parse_args(argv)
    if args.tokenizer_only:
        config = json.loads((args.out / "config.json").read_text())
        save_tokenizer(ByteTokenizerSpec(), args.out, max_length=config["max_position_embeddings"])
        return 0

    torch.set_num_threads(args.threads)
    options = TrainingOptions(
        args.seconds, args.max_steps, args.rows, args.lr, args.seed, args.min_margin
    )
    try:
        model, result = train(options)
    except TrainingFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    save(model, ByteTokenizerSpec(), args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"parameters: {result.parameters:,}")
    print(f"steps: {result.steps}, time: {result.seconds:.1f} s, final loss: {result.final_loss:.5f}")
    print(f"greedy margin (min logit gap, prompt to eos): {result.margin:.2f}")
    print(f"saved to {args.out} ({size / 1e6:.2f} MB)")
    print(f"greedy sample from {PROBE_PROMPT!r}:")
    print(PROBE_PROMPT + result.sample)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
