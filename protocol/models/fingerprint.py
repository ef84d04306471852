"""A model fingerprint: one hex digest that names exact weights and architecture.

DHT records and requests carry it, so a daemon serving other weights (a fine-tune, a corrupted
download, another model with the same name) cannot pose as serving this model, and a client never
mixes blocks of two models in one chain.

What is hashed (SHA-256, domain-separated by ``FINGERPRINT_VERSION``):
1. ``config.json`` as canonical JSON (sorted keys, no whitespace), minus keys that describe the
   writer rather than the model (``transformers_version``, ``_name_or_path``): the architecture
   and hyperparameters (eps, rope theta, ...) decide what the weights compute.
2. For every tensor, sorted by name: its name, safetensors dtype, shape and the SHA-256 of its raw
   bytes. Hashing tensors rather than files makes the fingerprint independent of how the checkpoint
   is sharded; hashing bytes rather than values makes it exact.

The dtype the daemon *serves* in is not part of it (it is announced separately): an fp32
checkpoint served in bf16 is still the same model.

Hashing reads every byte once (seconds per GB). With ``cache_dir`` the per-tensor digests of each
safetensors file are kept keyed by (absolute path, size, mtime_ns), so a restart is instant and any
rewrite of a file is noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from .checkpoint import CONFIG_FILE, Checkpoint, ModelLoadError

FINGERPRINT_VERSION = b"petals-model-fingerprint/1\n"
_WRITER_KEYS = frozenset({"transformers_version", "_name_or_path"})
_CHUNK = 1 << 20
_MAX_HEADER = 100 << 20  # safetensors caps its header at 100 MB


def _canonical_config(path: Path) -> bytes:
    config = json.loads((path / CONFIG_FILE).read_text())
    config = {k: v for k, v in config.items() if k not in _WRITER_KEYS}
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _file_digests(file: Path) -> dict[str, dict[str, object]]:
    """{tensor name: {dtype, shape, sha256}} of one safetensors file, read straight from its layout.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's dtype,
    shape and byte offsets into the data section, then the data; no torch needed.
    """
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER:
            raise ModelLoadError(file, f"safetensors header of {header_len} bytes is too large")
        header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        digests: dict[str, dict[str, object]] = {}
        entries = sorted(
            ((name, info) for name, info in header.items() if name != "__metadata__"),
            key=lambda item: item[1]["data_offsets"][0],
        )
        for name, info in entries:
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            h = hashlib.sha256()
            remaining = end - begin
            while remaining:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ModelLoadError(file, f"truncated: tensor {name!r} runs past the end of the file")
                h.update(chunk)
                remaining -= len(chunk)
            digests[name] = {"dtype": info["dtype"], "shape": list(info["shape"]), "sha256": h.hexdigest()}
    return digests


def _cached_file_digests(file: Path, cache_dir: Path | None) -> dict[str, dict[str, object]]:
    if cache_dir is None:
        return _file_digests(file)
    file = file.resolve()
    stat = file.stat()
    key = {"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entry = cache_dir / (hashlib.sha256(str(file).encode()).hexdigest() + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached.get("key") == key:
            return cached["digests"]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass  # no usable cache entry: recompute below and overwrite it
    digests = _file_digests(file)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "digests": digests}))
    os.replace(tmp, entry)  # atomic: a concurrent reader sees the old entry or the new one
    return digests


def model_fingerprint(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """SHA-256 hex fingerprint of the checkpoint at ``path`` (see the module docstring for what)."""
    checkpoint = Checkpoint(path)
    cache = Path(cache_dir) if cache_dir is not None else None
    tensors: dict[str, dict[str, object]] = {}
    for file in checkpoint.files():
        tensors.update(_cached_file_digests(file, cache))
    expected = set(checkpoint.tensor_names())
    if set(tensors) != expected:
        raise ModelLoadError(checkpoint.path, "the index json and the safetensors files name different tensors")
    h = hashlib.sha256(FINGERPRINT_VERSION)
    config = _canonical_config(checkpoint.path)
    h.update(len(config).to_bytes(8, "big") + config)
    for name in sorted(tensors):
        record = json.dumps([name, tensors[name]["dtype"], tensors[name]["shape"], tensors[name]["sha256"]])
        h.update(record.encode() + b"\n")
    return h.hexdigest()
