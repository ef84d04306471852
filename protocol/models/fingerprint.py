"""A model fingerprint: one hex digest that names exact weights and architecture.

DHT records and requests carry it, so a daemon serving other weights (a fine-tune, a corrupted
download, another model with the same name) cannot pose as serving this model, and a client never
mixes blocks of two models in one chain. No party holds the whole model, so every party must get
the same value from whatever subset of the files it holds, paying at most one pass over the
shards it loads.

Two schemes, chosen by what the checkpoint carries (ARCHITECTURE.md has the threat model):

* **Content** (a local folder, or any checkpoint with a ``petals_manifest.json``): SHA-256,
  domain-separated by ``FINGERPRINT_VERSION``, over
  1. ``config.json`` as canonical JSON (sorted keys, no whitespace), minus keys that describe the
     writer rather than the model (``transformers_version``, ``_name_or_path``);
  2. every tensor, sorted by name: its name, safetensors dtype, shape and the SHA-256 of its raw
     bytes. Hashing tensors rather than files makes it independent of how the checkpoint is
     sharded; hashing bytes rather than values makes it exact.
  A full folder hashes its shards (once: the digest cache keys them by file identity). A partial
  copy takes the digests of the shards it lacks from the manifest (``write_manifest`` makes one
  from a full copy) and checks the shards it loads against it, so it gets the full copy's value.

* **Hub commit** (a Hub model without a manifest): SHA-256 over ``HUB_FINGERPRINT_VERSION`` and the
  commit id. A git commit fixes every file of the repository, and for an LFS file (every shard) the
  SHA-256 of its bytes, which the Hub cache names each blob after; a party checks every shard it
  loads against that SHA-256. Any change to the repository is a new commit, hence a new value.

The dtype the daemon *serves* in is not part of it (it is announced separately): an fp32
checkpoint served in bf16 is still the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .checkpoint import CONFIG_FILE, MANIFEST_FILE, MANIFEST_FORMAT, Checkpoint, ModelLoadError
from .source import LocalFolder

FINGERPRINT_VERSION = b"petals-model-fingerprint/1\n"
HUB_FINGERPRINT_VERSION = b"petals-model-fingerprint/hub-commit/1\n"
_WRITER_KEYS = frozenset({"transformers_version", "_name_or_path"})


def _canonical_config(path: Path) -> bytes:
    config = json.loads((path / CONFIG_FILE).read_text())
    config = {k: v for k, v in config.items() if k not in _WRITER_KEYS}
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _as_checkpoint(model: str | Path | Checkpoint, cache_dir: str | Path | None) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    return Checkpoint(model, cache_dir=Path(cache_dir) if cache_dir is not None else None)


def model_fingerprint(model: str | Path | Checkpoint, cache_dir: str | Path | None = None) -> str:
    """SHA-256 hex fingerprint of a checkpoint (a folder, a Hub id or an open ``Checkpoint``, whose
    ``cache_dir`` then applies); see the module docstring for what goes in."""
    checkpoint = _as_checkpoint(model, cache_dir)
    tensors = checkpoint.tensor_digests()
    if tensors is None:
        assert checkpoint.source.commit is not None
        return hashlib.sha256(HUB_FINGERPRINT_VERSION + checkpoint.source.commit.encode()).hexdigest()
    h = hashlib.sha256(FINGERPRINT_VERSION)
    config = _canonical_config(checkpoint.path)
    h.update(len(config).to_bytes(8, "big") + config)
    for name in sorted(tensors):
        record = json.dumps([name, tensors[name]["dtype"], tensors[name]["shape"], tensors[name]["sha256"]])
        h.update(record.encode() + b"\n")
    return h.hexdigest()


def write_manifest(folder: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Write ``petals_manifest.json`` into a full local checkpoint folder and return its path.

    Copied beside any subset of the shards (or uploaded to the Hub repository), it lets that
    partial copy compute the full copy's content fingerprint and check the shards it holds.
    """
    checkpoint = Checkpoint(LocalFolder(Path(folder)), cache_dir=Path(cache_dir) if cache_dir is not None else None)
    if checkpoint.manifest is not None:
        raise ModelLoadError(folder, f"{MANIFEST_FILE} exists already; delete it first to write it again")
    digests = checkpoint.tensor_digests()
    assert digests is not None  # a local folder always has them, or raises
    manifest = {"format": MANIFEST_FORMAT,
                "tensors": {name: {"file": checkpoint.shard_of(name), **digests[name]} for name in sorted(digests)}}
    path = checkpoint.path / MANIFEST_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path
