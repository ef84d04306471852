"""Loading reads only what it needs: a span's blocks, or the client's modules; errors name the cause."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from petals_protocol.models.checkpoint import Checkpoint, ModelLoadError
from petals_protocol.models.client_part import load_client_part
from petals_protocol.models.families import family_for
from petals_protocol.models.span import load_span
from petals_protocol.models.synthetic import make_random_checkpoint


class LoadSpy:
    """Records every tensor name Checkpoint.load is asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        original = Checkpoint.load

        def load(checkpoint: Checkpoint, names, dtype, device):  # type: ignore[no-untyped-def]
            names = list(names)
            self.names.extend(names)
            return original(checkpoint, names, dtype, device)

        monkeypatch.setattr(Checkpoint, "load", load)


def stored_bytes(path: Path, names: list[str]) -> int:
    checkpoint = Checkpoint(path)
    return sum(t.numel() * t.element_size() for t in checkpoint.load(names, torch.float32, "cpu").values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def larger_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 12 blocks of ~9.4 MB each (fp32), sharded: big enough for RSS to show what was loaded
    return make_random_checkpoint(
        tmp_path_factory.mktemp("larger"), "llama", num_layers=12, hidden_size=384, num_heads=6,
        intermediate_size=1536, vocab_size=256, shards=4,
    )


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc")
def test_span_reads_only_its_blocks(larger_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    all_names = Checkpoint(larger_checkpoint).tensor_names()
    block_names = [n for n in all_names if n.startswith("model.layers.")]
    wanted = [n for n in block_names if n.split(".")[2] in ("5", "6")]
    total_block_bytes = stored_bytes(larger_checkpoint, block_names)
    span_bytes = stored_bytes(larger_checkpoint, wanted)
    assert span_bytes * 6 == total_block_bytes  # 2 of 12 identical blocks

    load_span(larger_checkpoint, 0, 1)  # warm-up: imports, allocator pools
    spy = LoadSpy(monkeypatch)
    before = rss_bytes()
    span = load_span(larger_checkpoint, 5, 7)
    grown = rss_bytes() - before

    assert sorted(spy.names) == sorted(wanted)
    assert span.weight_bytes == span_bytes
    # generous slack for the allocator, but far below loading the model (~113 MB of blocks)
    assert grown < span_bytes + 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB for a {span_bytes / 2**20:.1f} MiB span"
    assert grown < total_block_bytes / 3


def test_progress_reports_each_block(checkpoint: Callable[[str], Path]) -> None:
    calls: list[tuple[int, int]] = []
    load_span(checkpoint("bloom"), 2, 5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    ("name", "expected_prefixes"),
    [
        ("llama", ("model.embed_tokens.", "model.norm.", "lm_head.")),
        ("bloom", ("transformer.word_embeddings.", "transformer.word_embeddings_layernorm.", "transformer.ln_f.")),
        ("falcon", ("transformer.word_embeddings.", "transformer.ln_f.")),
    ],
)
def test_client_part_reads_only_client_tensors(
    checkpoint: Callable[[str], Path],
    reference: Callable[..., transformers.PreTrainedModel],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    expected_prefixes: tuple[str, ...],
) -> None:
    path = checkpoint(name)
    spy = LoadSpy(monkeypatch)
    client = load_client_part(path)
    assert spy.names and all(n.startswith(expected_prefixes) for n in spy.names)
    assert {p for p in expected_prefixes if any(n.startswith(p) for n in spy.names)} == set(expected_prefixes)
    assert (client.num_blocks, client.hidden_size, client.vocab_size) == (6, 64, 128)
    # embeddings and logits equal the full model's (tied heads included)
    model = reference(path)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    model_embed = model.get_input_embeddings()(ids)
    if name == "bloom":
        model_embed = model.transformer.word_embeddings_layernorm(model_embed)
    assert torch.equal(client.embed(ids), model_embed)
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    final_norm = model.model.norm if name == "llama" else model.transformer.ln_f
    assert torch.equal(client.logits(hidden), model.lm_head(final_norm(hidden)))


def test_checkpoint_errors_name_what_is_missing(tmp_path: Path, checkpoint: Callable[[str], Path]) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        Checkpoint(tmp_path)

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint("llama-sharded"), broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (broken / shard).unlink()
    partial = Checkpoint(broken)  # a partial copy opens; what it lacks fails when asked for, by name
    with pytest.raises(ModelLoadError, match=shard):
        partial.load(partial.tensor_names(), torch.float32, "cpu")
    with pytest.raises(ModelLoadError, match=f"shards are missing \\({shard}\\)"):
        partial.tensor_digests()
    (broken / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match="neither model.safetensors nor"):
        Checkpoint(broken)

    with pytest.raises(ModelLoadError, match="not in the checkpoint"):
        Checkpoint(checkpoint("llama")).load(["model.layers.99.mlp.up_proj.weight"], torch.float32, "cpu")
    with pytest.raises(ModelLoadError, match=r"blocks \[4, 9\)"):
        load_span(checkpoint("llama"), 4, 9)


def test_mismatched_weights_are_rejected(tmp_path: Path) -> None:
    path = make_random_checkpoint(tmp_path / "m", "llama", num_layers=2)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 100  # the tensors are 256 wide
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match the architecture"):
        load_span(path, 0, 1)


def test_unsupported_family_names_supported_ones() -> None:
    config = transformers.GPT2Config()
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported; supported: bloom, falcon, llama, mistral, qwen2"):
        family_for(config)


def test_attention_implementation_is_explicit(checkpoint: Callable[[str], Path]) -> None:
    assert Checkpoint(checkpoint("llama")).config._attn_implementation == "sdpa"
    assert Checkpoint(checkpoint("bloom")).config._attn_implementation == "eager"  # Bloom has no SDPA path
