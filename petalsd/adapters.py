"""LoRA adapters on the daemon's blocks (`petalsd --adapters PATH...`), chosen per request.

An adapter is a folder in PEFT's LoRA format, or a Hub repository holding one (`org/name`, read
through the Hugging Face cache like models: `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`):

    adapter_config.json         {"peft_type": "LORA", "r": R, "lora_alpha": A, "target_modules": [...],
                                 "bias": "none", "fan_in_fan_out": false, "use_rslora": false, ...}
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  [R, in_features]
                                base_model.model.<module path>.lora_B.weight  [out_features, R]

The module path is the one in the model's own checkpoint (`model.layers.3.self_attn.q_proj`).
Each targeted linear layer of a served block computes `W x + (A/R) * B (A x)` (`A/sqrt(R)` with
rsLoRA) while a request or session with that `active_adapter` runs, and `W x` otherwise: the
same model as the adapter merged into the weights. Its name is the folder's name (a Hub
adapter's: its id); a client selects it with `active_adapter=`.

`load_adapters` checks every adapter against the model's module tree (on the meta device, no
weights) before the daemon joins the swarm: an adapter for another architecture or size, one that
touches modules outside the blocks, or uses LoRA features not implemented here (biases, DoRA,
per-module ranks) is refused at start with a message that says which and why.

Only the compute thread switches adapters (`active`), one job at a time, so a job sees one
adapter throughout. Steps with an adapter run the blocks' modules (`Span.flat` and the batched
decode use the base weights only).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from petals_protocol.errors import ErrorCode, PetalsError
from petals_protocol.models.families import family_for
from petals_protocol.models.source import HubRepo, ModelLoadError, hub_cache_dir
from petals_protocol.models.span import Span, build_skeleton

T = TypeVar("T")

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_UNSUPPORTED = {"use_dora": "DoRA", "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
                "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)"}


class AdapterError(PetalsError):
    """An adapter cannot be served with this model (the daemon refuses to start)."""

    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: per module path (`model.layers.3.self_attn.q_proj`), (A, B, scale)."""

    name: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def load_adapters(paths: list[str], config: transformers.PretrainedConfig) -> list[Adapter]:
    """Read and check every adapter against the model's architecture (see the module docstring)."""
    skeleton = build_skeleton(config)
    modules = dict(skeleton.named_modules())
    adapters: list[Adapter] = []
    for text in paths:
        adapter = _load_one(text, modules, config)
        if any(a.name == adapter.name for a in adapters):
            raise AdapterError(f"two adapters are named {adapter.name!r} (folder names must differ)")
        adapters.append(adapter)
    return adapters


def _files(text: str) -> tuple[str, Path, Path]:
    """The adapter's name and its two files: a local folder, else a Hub id through the Hub cache."""
    path = Path(text)
    if path.is_dir() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return path.name, path / "adapter_config.json", path / "adapter_model.safetensors"
    try:
        hub = HubRepo(text, cache_dir=hub_cache_dir())
        return text, hub.fetch("adapter_config.json"), hub.fetch("adapter_model.safetensors")
    except ModelLoadError as exc:
        raise AdapterError(f"adapter {text!r}: no such folder, and as a Hub id: {exc.reason}") from exc


def _load_one(text: str, modules: dict[str, nn.Module], config: transformers.PretrainedConfig) -> Adapter:
    where = f"adapter {text!r}"
    name, config_file, weights_file = _files(text)
    try:
        settings = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{where}: cannot read adapter_config.json ({exc})") from exc
    if settings.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type is {settings.get('peft_type')!r}; only LORA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if settings.get(key):
            raise AdapterError(f"{where}: {what} is not supported")
    if settings.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={settings['bias']!r} is not supported (only 'none')")
    rank, alpha = settings.get("r"), settings.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where}: adapter_config.json needs an integer r >= 1 and a number lora_alpha")
    scale = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                match = _KEY.match(key)
                if match is None:
                    raise AdapterError(f"{where}: tensor {key!r} is not a LoRA A/B weight")
                tensors.setdefault(match["module"], {})[match["which"]] = f.get_tensor(key).float()
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{where}: cannot read adapter_model.safetensors ({exc})") from exc
    if not tensors:
        raise AdapterError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    family = family_for(config)
    block_prefixes = tuple(family.block_tensor_prefix(i) for i in range(config.num_hidden_layers))
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module_path, pair in sorted(tensors.items()):
        target = modules.get(module_path)
        if not module_path.startswith(block_prefixes):
            raise AdapterError(f"{where}: {module_path} is not in a transformer block of this model "
                               f"({config.model_type}, {config.num_hidden_layers} blocks); daemons adapt blocks only")
        if not isinstance(target, nn.Linear):
            raise AdapterError(f"{where}: {module_path} is not a linear layer of this model ({config.model_type})")
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where}: {module_path} needs both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.shape != (rank, target.in_features) or b.shape != (target.out_features, rank):
            raise AdapterError(f"{where}: {module_path} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; this "
                               f"model needs [{rank}, {target.in_features}] and [{target.out_features}, {rank}] "
                               "(an adapter for another model?)")
        weights[module_path] = (a, b, scale)
    return Adapter(name=name, weights=weights)


class LoraLinear(nn.Module):
    """A frozen linear layer plus the low-rank updates of the adapters, one active at a time."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.active: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        update = self.updates.get(self.active) if self.active is not None else None
        if update is None:
            return out
        a, b, scale = update
        return out + nn.functional.linear(nn.functional.linear(x, a), b) * scale


def attach(span: Span, adapters: list[Adapter]) -> tuple[str, ...]:
    """Wrap the span's targeted linear layers (in place) so that `active` can switch adapters;
    returns the adapters' names (what the daemon announces)."""
    family = span.family
    for offset, block in enumerate(span.blocks):
        prefix = family.block_tensor_prefix(span.start + offset)
        for adapter in adapters:
            for module_path, (a, b, scale) in adapter.weights.items():
                if not module_path.startswith(prefix):
                    continue
                parent_path, _, name = module_path[len(prefix):].rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                layer = getattr(parent, name)
                if not isinstance(layer, LoraLinear):
                    layer = LoraLinear(layer)
                    setattr(parent, name, layer)
                weight = layer.base.weight
                layer.updates[adapter.name] = (a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype),
                                               scale)
    return tuple(a.name for a in adapters)


@contextmanager
def active(span: Span, name: str | None) -> Iterator[None]:
    """Compute with adapter `name` (None: the base model) inside the block; compute thread only."""
    if name is None:
        yield
        return
    layers = [m for m in span.blocks.modules() if isinstance(m, LoraLinear)]
    flat_steps, span.flat_steps = span.flat_steps, False  # the flat path reads the base weights only
    for layer in layers:
        layer.active = name
    try:
        yield
    finally:
        for layer in layers:
            layer.active = None
        span.flat_steps = flat_steps


def run_with(span: Span, name: str | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with adapter `name` active (a compute job)."""
    with active(span, name):
        return fn(*args)


def steps_with(span: Span, name: str | None, steps: Generator[None, None, T]) -> Generator[None, None, T]:
    """`steps` (a span's `forward_blocks` / `backward_blocks`, one compute job per piece) with
    adapter `name` active during each piece, and only then: other sessions' jobs run between."""
    while True:
        with active(span, name):
            try:
                next(steps)
            except StopIteration as done:
                return done.value
        yield
