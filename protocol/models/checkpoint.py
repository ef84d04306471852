"""A local Hugging Face checkpoint folder, read one chosen tensor at a time.

A daemon serves a span of blocks of a model far larger than its memory, and a client holds only the
embeddings and the head. Both must therefore read *only* the tensors they need: this module maps
tensor names to safetensors files (through ``model.safetensors.index.json`` when the checkpoint is
sharded) and reads the chosen tensors with ``safetensors.safe_open``, which memory-maps the file and
materializes nothing else.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from petals_protocol.errors import PetalsError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ModelLoadError(PetalsError):
    """A checkpoint or span cannot be loaded; the message names the path and what is wrong.

    It is the operator's fault (bad path, incomplete download, unsupported model), never the peer's.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = message


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
    """A checkpoint folder: ``config.json`` plus ``model.safetensors`` or shards with an index json."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelLoadError(self.path, "not a directory (expected a Hugging Face checkpoint folder)")
        if not (self.path / CONFIG_FILE).is_file():
            raise ModelLoadError(self.path, f"{CONFIG_FILE} is missing")
        self._weight_map = self._read_weight_map()
        try:
            config = transformers.AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(self.path, f"cannot read {CONFIG_FILE}: {exc}") from exc
        if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ModelLoadError(self.path, f"model_type {config.model_type!r} is not a causal language model")
        config._attn_implementation = default_attn_implementation(config)
        self.config: transformers.PretrainedConfig = config

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelLoadError(self.path, f"{INDEX_FILE} has no valid weight_map: {exc}") from exc
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise ModelLoadError(self.path, f"shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
            return dict(weight_map)
        if (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        raise ModelLoadError(self.path, f"neither {SINGLE_FILE} nor {INDEX_FILE} is present")

    def tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._weight_map)

    def files(self) -> list[Path]:
        """The safetensors files of the checkpoint, sorted by name."""
        return [self.path / f for f in sorted(set(self._weight_map.values()))]

    def names_with_prefix(self, prefix: str) -> list[str]:
        """The tensor names that start with ``prefix`` (e.g. ``"model.layers.3."``)."""
        return [n for n in self.tensor_names() if n.startswith(prefix)]

    def load(self, names: Iterable[str], dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
        """Read exactly these tensors, cast to ``dtype`` and moved to ``device``.

        Each file is opened once, memory-mapped; tensors not named here are never read.
        """
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            file = self._weight_map.get(name)
            if file is None:
                raise ModelLoadError(self.path, f"tensor {name!r} is not in the checkpoint")
            by_file[file].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_names in sorted(by_file.items()):
            with safe_open(self.path / file, framework="pt", device="cpu") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name).to(dtype=dtype).to(device)
        return tensors
