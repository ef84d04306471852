"""The model shapes the benchmark runs, and a cache of their random-weight checkpoints.

Weights cannot be downloaded here, so each shape is built from a config with random weights
(`make_random_checkpoint`, deterministic for a seed). Building the 271M shape takes tens of
seconds and ~1.1 GB of disk, so a built checkpoint is kept in a cache directory, keyed by every
parameter of the shape, and reused by later runs.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from petals_protocol.models.synthetic import make_random_checkpoint


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped model: the sizes the issue's targets are stated for."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    family: str = "llama"
    seed: int = 0

    @property
    def num_params(self) -> int:
        """Parameters of the untied Llama layout (embeddings, blocks, final norm, head)."""
        h, f = self.hidden_size, self.intermediate_size
        block = 4 * h * h + 3 * h * f + 2 * h  # q k v o, gate up down, two RMSNorms
        return self.num_layers * block + 2 * self.vocab_size * h + h

    def key(self) -> str:
        """A cache key that changes with any parameter of the shape."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:12]}"


#: 271M: the issue's main target (hidden 1024, 16 layers, vocab 32000; FFN 2816 gives 271.1M params).
#: 6.8M: the small target where per-message overhead dominates (FFN 688 gives 6.8M params).
#: tiny: the smoke test's shape, a few hundred KB.
SHAPES: dict[str, ModelShape] = {
    "271m": ModelShape("271m", num_layers=16, hidden_size=1024, num_heads=16, intermediate_size=2816,
                       vocab_size=32000),
    "6.8m": ModelShape("6.8m", num_layers=8, hidden_size=256, num_heads=8, intermediate_size=688,
                       vocab_size=1000),
    "tiny": ModelShape("tiny", num_layers=4, hidden_size=64, num_heads=4, intermediate_size=128,
                       vocab_size=128, seed=11),
}


def default_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "petalsd-bench"


def ensure_model(shape: ModelShape, cache_dir: Path) -> Path:
    """The checkpoint of `shape` under `cache_dir`, built on first use.

    A checkpoint is built in a temporary sibling and renamed into place, so an interrupted build
    never leaves a half-written model that a later run would take as complete.
    """
    path = cache_dir / shape.key()
    if (path / "config.json").exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{shape.key()}.{os.getpid()}.partial"
    make_random_checkpoint(partial, shape.family, num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                           num_heads=shape.num_heads, intermediate_size=shape.intermediate_size,
                           vocab_size=shape.vocab_size, seed=shape.seed)
    partial.rename(path)
    return path


def split_blocks(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous spans covering all blocks, sizes differing by at most one (larger last)."""
    if not 1 <= parts <= num_layers:
        raise ValueError(f"cannot split {num_layers} blocks over {parts} daemons")
    base, extra = divmod(num_layers, parts)
    spans, start = [], 0
    for i in range(parts):
        size = base + (1 if i >= parts - extra else 0)
        spans.append((start, start + size))
        start += size
    return spans
