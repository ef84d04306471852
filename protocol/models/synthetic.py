"""Real Hugging Face checkpoints with random weights, for tests, integration tests and benchmarks.

Model weights cannot be downloaded here, so every test builds its model from a small config. The
checkpoint is written by transformers' own ``save_pretrained`` (sharded with ``max_shard_size``), so
it has exactly the layout of a downloaded one: config.json, safetensors, index json when sharded.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "bloom", "falcon")


def _config(
    family: str,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int | None,
    intermediate_size: int | None,
    vocab_size: int,
    overrides: dict[str, Any],
) -> transformers.PretrainedConfig:
    kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
    ffn = intermediate_size if intermediate_size is not None else 4 * hidden_size
    if family in ("llama", "mistral", "qwen2"):
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[family]
        kwargs: dict[str, Any] = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=kv_heads,
            intermediate_size=ffn,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
        )
        if family == "mistral":
            kwargs["sliding_window"] = None  # mistral's default (4096) is meaningless for tiny models
    elif family == "bloom":
        if num_kv_heads not in (None, num_heads):
            raise ValueError("bloom has no grouped-query attention (num_kv_heads must equal num_heads)")
        cls = transformers.BloomConfig
        kwargs = dict(hidden_size=hidden_size, n_layer=num_layers, n_head=num_heads, vocab_size=vocab_size)
    elif family == "falcon":
        cls = transformers.FalconConfig
        kwargs = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            vocab_size=vocab_size,
            ffn_hidden_size=ffn,
        )
        if num_kv_heads is not None:
            # grouped-query attention is only in falcon's "new decoder architecture" (falcon-40b/180b)
            kwargs.update(new_decoder_architecture=True, num_kv_heads=num_kv_heads)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    kwargs.update(overrides)
    return cls(**kwargs)


def make_random_checkpoint(
    path: str | Path,
    family: str,
    *,
    num_layers: int = 6,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 128,
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of ``family`` to ``path`` (created) and return the path.

    ``config_overrides`` go straight to the config class (e.g. ``sliding_window=8`` for mistral,
    ``alibi=True`` for falcon, ``tie_word_embeddings=True``). ``shards > 1`` writes at least two
    safetensors shards plus ``model.safetensors.index.json``. Weights are drawn with transformers'
    own initializer under ``torch.manual_seed(seed)``, so the same arguments give the same bytes.
    """
    path = Path(path)
    config = _config(
        family,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        overrides=config_overrides,
    )
    torch_dtype = getattr(torch, dtype)
    # The generator is local to this call: seeding the global RNG would be global state.
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(torch_dtype)
    path.mkdir(parents=True, exist_ok=True)
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        max_shard_size: int | str = max(1, math.ceil(total / shards))
    else:
        max_shard_size = "1000GB"
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def write_hub_cache(hf_home: str | Path, repo_id: str, folder: str | Path, files: Iterable[str], *,
                    commit: str, ref: str | None = "main") -> Path:
    """Put ``files`` of the checkpoint ``folder`` into a Hugging Face cache as ``huggingface_hub``
    lays one out, at ``commit`` (``ref`` pointing at it); returns the snapshot folder.

    ``HF_HOME/hub/models--ORG--NAME/`` holds ``refs/<ref>`` (the commit), ``snapshots/<commit>/<file>``
    (relative symlinks) and ``blobs/<etag>``, where the etag of a safetensors file (an LFS file on
    the Hub) is the SHA-256 of its bytes and that of any other file its git blob id. With
    ``HF_HUB_OFFLINE=1`` a party then reads only what its own cache holds: how tests and benchmarks
    give each party a partial download without a network.
    """
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        data = (Path(folder) / name).read_bytes()
        etag = (hashlib.sha256(data).hexdigest() if name.endswith(".safetensors")
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
