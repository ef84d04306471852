"""Model fingerprints: same weights same fingerprint, any changed weight or config a different one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from petals_protocol.models import digests as digests_module
from petals_protocol.models.fingerprint import model_fingerprint
from petals_protocol.models.synthetic import make_random_checkpoint


def test_same_weights_same_fingerprint_any_sharding(tmp_path: Path) -> None:
    single = make_random_checkpoint(tmp_path / "a", "llama", num_layers=2, seed=3)
    again = make_random_checkpoint(tmp_path / "b", "llama", num_layers=2, seed=3)
    sharded = make_random_checkpoint(tmp_path / "c", "llama", num_layers=2, seed=3, shards=3)
    fp = model_fingerprint(single)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert model_fingerprint(again) == fp
    assert model_fingerprint(sharded) == fp
    assert model_fingerprint(make_random_checkpoint(tmp_path / "d", "llama", num_layers=2, seed=4)) != fp


def test_one_changed_weight_changes_it(tmp_path: Path) -> None:
    path = make_random_checkpoint(tmp_path / "m", "qwen2", num_layers=2)
    before = model_fingerprint(path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = torch.nextafter(tensors[name][3, 5], torch.tensor(1.0))  # one ulp
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(path) != before


def test_config_changes_it_but_writer_version_does_not(tmp_path: Path) -> None:
    path = make_random_checkpoint(tmp_path / "m", "bloom", num_layers=2)
    before = model_fingerprint(path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=7))
    assert model_fingerprint(path) == before
    config_path.write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    assert model_fingerprint(path) != before


def test_cache_makes_restart_instant_and_notices_rewrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_random_checkpoint(tmp_path / "m", "llama", num_layers=2, shards=2)
    cache_dir = tmp_path / "cache"
    hashed: list[Path] = []
    original = digests_module.tensor_digests

    def counting(file: Path) -> dict[str, dict[str, object]]:
        hashed.append(file)
        return original(file)

    monkeypatch.setattr(digests_module, "tensor_digests", counting)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    first = model_fingerprint(path, cache_dir=cache_dir)
    assert sorted(hashed) == shards
    assert model_fingerprint(path, cache_dir=cache_dir) == first
    assert len(hashed) == len(shards)  # served from the cache
    assert first == model_fingerprint(path)  # the cache does not change the result
    hashed.clear()

    shard = shards[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert model_fingerprint(path, cache_dir=cache_dir) != first
    assert hashed == [shard]  # only the rewritten shard was hashed again
