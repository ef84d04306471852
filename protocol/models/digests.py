"""Hashes of safetensors files, computed at most once per file version.

Two kinds, each one pass over a file's bytes:
- ``tensor_digests``: {tensor name: {dtype, shape, sha256 of its raw bytes}}, what the local
  fingerprint and the manifest are made of (independent of how a checkpoint is sharded);
- ``file_sha256``: the SHA-256 of the whole file, what the Hub gives for every LFS file.

With a cache folder, results are kept keyed by the file's identity (absolute path, size, mtime_ns,
inode): a restart costs nothing, and any rewrite or replacement of the file is noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .source import ModelLoadError

_CHUNK = 1 << 20
_MAX_HEADER = 100 << 20  # safetensors caps its header at 100 MB

TensorDigests = dict[str, dict[str, Any]]
T = TypeVar("T")


def tensor_digests(file: Path) -> TensorDigests:
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
        digests: TensorDigests = {}
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


def file_sha256(file: Path) -> str:
    """SHA-256 of the whole file."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cached(kind: str, compute: Callable[[Path], T], file: Path, cache_dir: Path | None) -> T:
    if cache_dir is None:
        return compute(file)
    file = file.resolve()
    stat = file.stat()
    key = {"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
           "kind": kind}
    entry = cache_dir / (hashlib.sha256(f"{kind}\n{file}".encode()).hexdigest() + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached.get("key") == key:
            return cached["value"]  # type: ignore[no-any-return]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass  # no usable cache entry: recompute below and overwrite it
    value = compute(file)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    os.replace(tmp, entry)  # atomic: a concurrent reader sees the old entry or the new one
    return value


def cached_tensor_digests(file: Path, cache_dir: Path | None) -> TensorDigests:
    return _cached("tensors", lambda f: tensor_digests(f), file, cache_dir)


def cached_file_sha256(file: Path, cache_dir: Path | None) -> str:
    return _cached("sha256", lambda f: file_sha256(f), file, cache_dir)


def default_cache_dir() -> Path:
    """Where digests are kept: a petalsd folder in systemd's CACHE_DIRECTORY, $XDG_CACHE_HOME or ~/.cache."""
    cache = os.environ.get("CACHE_DIRECTORY") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache.split(":")[0]) / "petalsd"
