"""The model-partition contract: which modules are blocks and which are the client's, shared by
daemon and client. Needs torch, transformers and safetensors (the protocol core does not).

- ``Checkpoint``: a local folder or a Hub model (``source.py``), fetched shard by shard and read
  one chosen tensor at a time.
- ``family_for(config)``: per-family adapter (block list, client modules, how to run a block).
- ``load_span(path, start, end)`` -> ``Span`` with ``new_cache`` / ``forward`` / ``backward``.
- ``load_client_part(path)`` -> ``ClientPart`` with ``embed`` / ``logits``.
- ``model_fingerprint(path)``: what DHT records and requests bind to, from any subset of the files.
- ``make_random_checkpoint(...)``: real checkpoints with random weights, for tests and benchmarks.
"""

from .checkpoint import Checkpoint, ModelLoadError
from .client_part import ClientPart, load_client_part
from .families import Family, family_for, supported_model_types
from .fingerprint import model_fingerprint
from .span import Span, SpanCache, SpanUsageError, load_span
from .synthetic import make_random_checkpoint

__all__ = [
    "Checkpoint",
    "ClientPart",
    "Family",
    "ModelLoadError",
    "Span",
    "SpanCache",
    "SpanUsageError",
    "family_for",
    "load_client_part",
    "load_span",
    "make_random_checkpoint",
    "model_fingerprint",
    "supported_model_types",
]
