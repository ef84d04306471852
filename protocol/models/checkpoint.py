"""A Hugging Face checkpoint (a local folder or a Hub model), read one chosen tensor at a time.

A daemon serves a span of blocks of a model far larger than its memory, and a client holds only the
embeddings and the head. Both must therefore fetch and read *only* the shards and tensors they need:
this module maps tensor names to safetensors files (through ``model.safetensors.index.json`` when the
checkpoint is sharded), fetches a shard from its ``ModelSource`` the first time one of its tensors is
asked for, checks the shard's bytes against what the checkpoint claims (the manifest, or the Hub's
SHA-256; see fingerprint.py), and reads the chosen tensors with ``safetensors.safe_open``, which
memory-maps the file and materializes nothing else.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open

from .digests import TensorDigests, cached_file_sha256, cached_tensor_digests
from .source import ModelLoadError, ModelSource, open_source

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: per-tensor digests of every shard, so that a party holding some shards knows the others' (fingerprint.py)
MANIFEST_FILE = "petals_manifest.json"
MANIFEST_FORMAT = "petals-manifest/1"

__all__ = ["CONFIG_FILE", "INDEX_FILE", "MANIFEST_FILE", "SINGLE_FILE", "Checkpoint", "ModelLoadError"]


def default_attn_implementation(config: transformers.PretrainedConfig) -> str:
    """Return the attention implementation ``from_pretrained`` would pick by default.

    ``AutoConfig.from_pretrained`` leaves ``_attn_implementation`` as None, and with None the mask
    utilities return no mask at all, so a prefill would silently run without a causal mask. We set it
    explicitly, to the same choice transformers makes for the full model (SDPA where the class supports
    it, eager otherwise, e.g. Bloom): then a span computes bit-identically to the full model.
    """
    model_cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


class Checkpoint:
    """``config.json`` plus ``model.safetensors`` or shards with an index json, fetched shard by shard.

    ``model`` is a local folder, a Hub model id (``org/name``, with ``revision`` and ``token``) or a
    ``ModelSource``. ``cache_dir`` keeps the digests of checked shards (digests.py); None checks
    every time.
    """

    def __init__(self, model: str | Path | ModelSource, *, revision: str | None = None,
                 token: str | bool | None = None, cache_dir: Path | None = None) -> None:
        self.source: ModelSource = (open_source(model, revision=revision, token=token)
                                    if isinstance(model, (str, Path)) else model)
        self.name = self.source.name
        self.cache_dir = cache_dir
        self.path = self.source.fetch(CONFIG_FILE).parent  # where fetched files lie (for messages)
        self._weight_map = self._read_weight_map()
        self.manifest: TensorDigests | None = self._read_manifest()
        # per-tensor digests the shards must match: the manifest's, or those the fingerprint hashed
        self._expected: TensorDigests | None = self.manifest
        self._checked: dict[str, Path] = {}
        try:
            config = transformers.AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(self.name, f"cannot read {CONFIG_FILE}: {exc}") from exc
        if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ModelLoadError(self.name, f"model_type {config.model_type!r} is not a causal language model")
        config._attn_implementation = default_attn_implementation(config)
        self.config: transformers.PretrainedConfig = config

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.source.fetch_optional(INDEX_FILE)
        if index_path is not None:
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelLoadError(self.name, f"{INDEX_FILE} has no valid weight_map: {exc}") from exc
            return dict(weight_map)
        single = self.source.fetch_optional(SINGLE_FILE)
        if single is not None:
            with safe_open(single, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        raise ModelLoadError(self.name, f"neither {SINGLE_FILE} nor {INDEX_FILE} is present")

    def _read_manifest(self) -> TensorDigests | None:
        path = self.source.fetch_optional(MANIFEST_FILE)
        if path is None:
            return None
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            tensors: dict[str, dict[str, Any]] = manifest["tensors"]
            digests = {name: {"dtype": t["dtype"], "shape": list(t["shape"]), "sha256": t["sha256"]}
                       for name, t in tensors.items()}
            files = {name: t["file"] for name, t in tensors.items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelLoadError(self.name, f"{MANIFEST_FILE} is not valid: {exc}") from exc
        if files != self._weight_map:
            raise ModelLoadError(self.name, f"{MANIFEST_FILE} and the checkpoint name different tensors or shards")
        return digests

    def tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._weight_map)

    def shard_names(self) -> list[str]:
        """The safetensors files of the checkpoint, sorted by name (not necessarily fetched)."""
        return sorted(set(self._weight_map.values()))

    def shards_of(self, names: Iterable[str]) -> set[str]:
        """The safetensors files that hold these tensors."""
        return {self.shard_of(name) for name in names}

    def names_with_prefix(self, prefix: str) -> list[str]:
        """The tensor names that start with ``prefix`` (e.g. ``"model.layers.3."``)."""
        return [n for n in self.tensor_names() if n.startswith(prefix)]

    def shard_of(self, name: str) -> str:
        """The safetensors file that holds this tensor."""
        file = self._weight_map.get(name)
        if file is None:
            raise ModelLoadError(self.name, f"tensor {name!r} is not in the checkpoint")
        return file

    def tensor_digests(self) -> TensorDigests | None:
        """{tensor: {dtype, shape, sha256}} of the whole checkpoint, from what is at hand:
        the manifest if there is one, else (a local folder) by hashing every shard once; None for a
        Hub model without a manifest (its commit stands for its files; see fingerprint.py)."""
        if self.manifest is not None:
            return self.manifest
        if self.source.commit is not None:
            return None
        digests: TensorDigests = {}
        missing = [f for f in self.shard_names() if self.source.fetch_optional(f) is None]
        if missing:
            raise ModelLoadError(self.name, f"shards are missing ({', '.join(missing)}) and there is no "
                                 f"{MANIFEST_FILE} giving their digests: copy it from a full copy "
                                 "(`petals manifest FOLDER` writes one)")
        for file in self.shard_names():
            digests.update(cached_tensor_digests(self.source.fetch(file), self.cache_dir))
        if set(digests) != set(self._weight_map):
            raise ModelLoadError(self.name, "the index json and the safetensors files name different tensors")
        self._expected = digests
        return digests

    def shard(self, file: str) -> Path:
        """Fetch one shard and check its bytes (once per file version, cached by the digest cache)."""
        path = self._checked.get(file)
        if path is None or not path.exists():  # not yet, or evicted from the cache since
            path = self.source.fetch(file)
            self._check(file, path)
            self._checked[file] = path
            log.info("shard model=%s file=%s fetched and checked", self.name, file)
        return path

    def _check(self, file: str, path: Path) -> None:
        if self._expected is not None:
            expected = {n: d for n, d in self._expected.items() if self._weight_map[n] == file}
            got = cached_tensor_digests(path, self.cache_dir)
            differing = sorted(n for n in set(expected) | set(got) if expected.get(n) != got.get(n))
            if differing:
                claimed = MANIFEST_FILE if self.manifest is not None else "the digests it had when fingerprinted"
                raise ModelLoadError(self.name, f"{file} does not match {claimed}: tensor {differing[0]!r} differs "
                                     f"({len(differing)} in all); refusing to serve or use other weights")
            return
        sha256 = self.source.expected_sha256(path)
        if sha256 is not None:
            got_sha = cached_file_sha256(path, self.cache_dir)
            if got_sha != sha256:
                raise ModelLoadError(self.name, f"{file} has SHA-256 {got_sha}, but commit {self.source.commit} "
                                     f"gives {sha256}: a corrupt or altered cache; delete it and fetch again")

    def load(self, names: Iterable[str], dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
        """Read exactly these tensors, cast to ``dtype`` and moved to ``device``.

        Each shard is fetched and checked once, then opened memory-mapped; tensors not named here
        are never read.
        """
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.shard_of(name)].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_names in sorted(by_file.items()):
            with safe_open(self.shard(file), framework="pt", device="cpu") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name).to(dtype=dtype).to(device)
        return tensors
