"""A contiguous span of transformer blocks, loaded alone, run with a per-session KV cache.

``load_span(path, start, end)`` reads only the tensors of blocks ``[start, end)``. ``Span.forward``
with a ``SpanCache`` continues a session (prefill in any chunking, then steps), without a cache it is
a plain causal forward from position 0 that autograd can go through (fine-tuning). Results are
bit-identical to the full transformers model run on the same inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from petals_protocol.errors import ErrorCode, PetalsError

from . import flat
from .checkpoint import Checkpoint, ModelLoadError
from .families import Family, StepContext, family_for, layer_types

ProgressCallback = Callable[[int, int], None]

log = logging.getLogger(__name__)


class SpanUsageError(PetalsError, ValueError):
    """A caller asked a span for something it cannot do (blocks outside it, cache too short, ...).

    The message says what was asked and what is allowed; ``code`` is what a daemon puts in its
    ``ErrorReply`` (``TOO_LONG`` past ``max_length``, ``BAD_REQUEST`` otherwise).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


class _OffsetDynamicCache(DynamicCache):
    """A DynamicCache whose layer 0 is block ``offset`` of the span that made it.

    Blocks carry span-local ``layer_idx`` (0 for the span's first block); a session over a sub-span
    ``[start, end)`` holds only its own layers, so attention's ``update(k, v, layer_idx)`` is shifted
    by the sub-span's offset. ``update`` is the only cache call the attention modules make.
    """

    def __init__(self, config: transformers.PretrainedConfig, offset: int) -> None:
        super().__init__(config=config)
        self.offset = offset

    def update(  # type: ignore[override]
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)


class SpanCache:
    """The KV cache of one session over blocks ``[start, end)``, ``batch_size`` sequences.

    It wraps a transformers ``DynamicCache(config=...)`` whose ``layers`` list is sliced to the span:
    the attention modules were renumbered to local layer indices, and a cache with one entry per
    *global* layer would report a length of 0 from its empty leading layers (wrong masks and
    positions). Slicing the config-built cache keeps each layer's type (sliding-window layers are
    ``DynamicSlidingWindowLayer``), which the masks are sized against.

    Sliding-window layers record their whole past (``activate_past_recording``) so that ``crop`` can
    roll back to any position; the memory budget is therefore ``max_length`` tokens on every layer.
    """

    def __init__(self, dynamic: _OffsetDynamicCache, *, batch_size: int, max_length: int, start: int, end: int) -> None:
        self.dynamic = dynamic
        self.batch_size = batch_size
        self.max_length = max_length
        self.start = start
        self.end = end
        self.length = 0

    def crop(self, position: int) -> None:
        """Roll back to the first ``position`` tokens (``0 <= position <= length``)."""
        if not 0 <= position <= self.length:
            raise SpanUsageError(f"cannot roll back to position {position}: the cache holds {self.length} tokens")
        for layer in self.dynamic.layers:
            if not layer.is_initialized:
                continue
            layer.keys = layer.keys[:, :, :position, :]
            layer.values = layer.values[:, :, :position, :]
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = position
        self.length = position

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Beam search: the new sequence ``i`` continues old sequence ``hypo_ids[i]``."""
        if hypo_ids.shape != (self.batch_size,):
            raise SpanUsageError(f"hypo_ids must have shape ({self.batch_size},), got {tuple(hypo_ids.shape)}")
        if hypo_ids.numel() and not (0 <= int(hypo_ids.min()) and int(hypo_ids.max()) < self.batch_size):
            raise SpanUsageError(f"hypo_ids must be in [0, {self.batch_size}), got {hypo_ids.tolist()}")
        self.dynamic.reorder_cache(hypo_ids.to(torch.long))


class Span:
    """Blocks ``[start, end)`` of a model, weights frozen, in eval mode."""

    def __init__(
        self,
        *,
        start: int,
        end: int,
        config: transformers.PretrainedConfig,
        family: Family,
        blocks: nn.ModuleList,
        rotary: nn.Module | None,
        dtype: torch.dtype,
        device: torch.device,
        weight_bytes: int,
    ) -> None:
        self.start = start
        self.end = end
        self.config = config
        self.family = family
        self.blocks = blocks
        self.rotary = rotary
        self.dtype = dtype
        self.device = device
        self.weight_bytes = weight_bytes
        self.num_blocks_total: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self._layer_types = layer_types(config)
        # the blocks as straight-line torch calls (Llama layout only); used for cached steps once
        # verified equal to the modules (see flat.py), and by the batched decode
        self.flat: list[flat.FlatBlock] | None = None
        if family.flat and all(flat.is_flat_capable(block) for block in blocks):
            self.flat = [flat.FlatBlock(block) for block in blocks]
        self.flat_steps = False
        # what the batched decode runs: ``flat``, or its oneDNN-packed twin after pack_for_batching()
        self.batch_blocks: list[flat.FlatBlock] | None = self.flat
        self._cache_bytes_per_token_per_block = self._measure_cache_bytes()
        self.flat_steps = self._verify_flat()

    def pack_for_batching(self) -> int:
        """Give the batched decode oneDNN-packed copies of the linear weights (``packed.py``: faster
        multi-row matmuls on CPU); returns the bytes they take, 0 where packing is not
        available (CUDA, other dtypes, another family) and the batched decode keeps ``F.linear``.
        Blocking (a copy of the weights): call it where the span is loaded, not on an event loop."""
        if self.flat is not None and self.batch_blocks is self.flat:  # not packed yet
            packed = [flat.packed_block(block) for block in self.blocks]
            if all(block is not None for block in packed):
                self.batch_blocks = packed  # type: ignore[assignment]
        return sum(getattr(block, "nbytes", 0) for block in self.batch_blocks or ())

    def _verify_flat(self) -> bool:
        """Whether cached steps may run through ``self.flat``: only if it reproduces the modules bit for bit.

        The probe (a 4-token prefill, then a decode step, on fresh caches) is compared with
        ``torch.equal``; any difference keeps the module path, with a warning, since parity with
        transformers is the contract and speed is not. Training (no cache) always uses the modules.
        """
        if self.flat is None:
            return False
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(1, 4, self.hidden_size, generator=generator).to(device=self.device, dtype=self.dtype)
        outputs: list[list[torch.Tensor]] = []
        for use_flat in (False, True):
            self.flat_steps = use_flat
            cache = self.new_cache(1, 5)
            outputs.append([self.forward(probe, cache), self.forward(probe[:, -1:], cache)])
        self.flat_steps = False
        if all(torch.equal(a, b) for a, b in zip(*outputs, strict=True)):
            return True
        log.warning("blocks %d:%d of %s: the flat block path differs from the transformers modules; using the "
                    "modules (slower per step, same results)", self.start, self.end, self.config.model_type)
        return False

    def _range(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise SpanUsageError(f"blocks [{start}, {end}) are not a non-empty part of [{self.start}, {self.end})")
        return start, end

    def _measure_cache_bytes(self) -> list[int]:
        """Bytes one token of one sequence adds to each block's cache, measured with a 1-token probe.

        Measuring instead of computing from the config keeps this right for every family (multi-query
        Falcon, grouped-query Llama, Bloom's fused heads) at the cost of one token of compute at load.
        """
        cache = self.new_cache(1, 1)
        self.forward(torch.zeros(1, 1, self.hidden_size, dtype=self.dtype, device=self.device), cache)
        return [layer.keys.nbytes + layer.values.nbytes for layer in cache.dynamic.layers]

    def cache_bytes_per_token(self, batch_size: int, start: int | None = None, end: int | None = None) -> int:
        """KV-cache bytes one more token costs a session of ``batch_size`` over ``[start, end)``."""
        start, end = self._range(start, end)
        per_block = self._cache_bytes_per_token_per_block[start - self.start : end - self.start]
        return batch_size * sum(per_block)

    def activation_bytes(self, batch_size: int, tokens: int, start: int | None = None, end: int | None = None,
                         *, grad: bool = False) -> int:
        """An upper estimate of the activation memory a stateless forward (or, with `grad`, a
        backward) of [batch_size, tokens] over ``[start, end)`` takes, for the daemon's memory
        budget: a KV cache is reserved before it exists, and so is this.

        Per block: the hidden states and their residual copies, q/k/v and the attention output
        (~6 x hidden per token), the MLP's intermediate activations (~3 x intermediate), and the
        attention scores of eager attention (heads x tokens per token). A forward holds one
        block's worth at a time; a backward (``backward_blocks``) keeps every block's input and
        one block's autograd graph (about twice a forward's: inputs and outputs of each op).
        """
        start, end = self._range(start, end)
        config = self.config
        hidden = self.hidden_size
        inner = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
                 or 4 * hidden)
        heads = getattr(config, "num_attention_heads", None) or 1
        per_token = 6 * hidden + 3 * inner + heads * tokens
        one_block = batch_size * tokens * per_token * self.dtype.itemsize
        io = 2 * batch_size * tokens * hidden * self.dtype.itemsize
        if not grad:
            return one_block + io
        return 2 * one_block + io * (end - start + 2)  # one block's graph, every block's input

    def new_cache(self, batch_size: int, max_length: int, start: int | None = None, end: int | None = None) -> SpanCache:
        """An empty cache for a session over blocks ``[start, end)`` (absolute ids, default: all)."""
        start, end = self._range(start, end)
        if batch_size < 1 or max_length < 1:
            raise SpanUsageError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        dynamic = _OffsetDynamicCache(self.config, offset=start - self.start)
        dynamic.layers = dynamic.layers[start:end]
        dynamic.activate_past_recording()
        return SpanCache(dynamic, batch_size=batch_size, max_length=max_length, start=start, end=end)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None = None,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` [B, T, H] through blocks ``[start, end)``.

        With a cache: the T tokens follow the ``cache.length`` tokens already in it, and are
        appended (no autograd). Without: a causal forward from position 0, differentiable with
        respect to ``hidden`` (and ``prompts``). ``start``/``end`` default to the cache's range,
        else the span's. ``prompts`` [end - start, 1 or B, K, H]: deep prompt tuning, see
        ``add_prompt``.
        """
        if cache is not None:
            start = cache.start if start is None else start
            end = cache.end if end is None else end
            if (start, end) != (cache.start, cache.end) or cache.dynamic.offset != start - self.start:
                raise SpanUsageError(
                    f"cache is for blocks [{cache.start}, {cache.end}) of a span starting at "
                    f"{cache.start - cache.dynamic.offset}; this span starts at {self.start} and was asked "
                    f"for [{start}, {end})"
                )
        start, end = self._range(start, end)
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size or hidden.shape[1] < 1:
            raise SpanUsageError(f"hidden must be [batch, tokens>=1, {self.hidden_size}], got {tuple(hidden.shape)}")
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        if prompts is not None:
            prompts = self._check_prompts(prompts, hidden, start, end)
        if cache is None:
            return self._run(hidden, None, start, end, prompts)
        if hidden.shape[0] != cache.batch_size:
            raise SpanUsageError(f"cache batch size is {cache.batch_size}, hidden has {hidden.shape[0]} sequences")
        if cache.length + hidden.shape[1] > cache.max_length:
            raise SpanUsageError(
                f"{cache.length} cached + {hidden.shape[1]} new tokens exceed max_length {cache.max_length}",
                ErrorCode.TOO_LONG,
            )
        with torch.no_grad():
            out = self._run(hidden, cache.dynamic, start, end, prompts, position=cache.length)
        cache.length += hidden.shape[1]
        return out

    def _check_prompts(self, prompts: torch.Tensor, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        expected = (end - start, hidden.shape[0], self.hidden_size)
        if prompts.ndim != 4 or (prompts.shape[0], prompts.shape[3]) != (expected[0], expected[2]) \
                or prompts.shape[1] not in (1, hidden.shape[0]) or prompts.shape[2] < 1:
            raise SpanUsageError(f"prompts must be [{expected[0]}, 1 or {expected[1]}, prefix>=1, {expected[2]}], "
                                 f"got {tuple(prompts.shape)}")
        if not prompts.is_floating_point() or not bool(torch.isfinite(prompts).all()):
            raise SpanUsageError("prompts must be finite floating-point values")
        return prompts.to(device=self.device, dtype=self.dtype)

    def _run(self, hidden: torch.Tensor, dynamic: DynamicCache | None, start: int, end: int,
             prompts: torch.Tensor | None = None, position: int = 0) -> torch.Tensor:
        types = self._layer_types[start:end]
        ctx: StepContext = self.family.prepare_step(self.config, hidden, dynamic, types, self.rotary)
        first, last = start - self.start, end - self.start
        if dynamic is not None and self.flat_steps:
            assert self.flat is not None
            for index, (flat_block, layer_type) in enumerate(zip(self.flat[first:last], types, strict=True)):
                if prompts is not None:
                    hidden = add_prompt(hidden, prompts[index], position)
                hidden = flat_block(hidden, ctx, layer_type)
            return hidden
        for index, (block, layer_type) in enumerate(zip(self.blocks[first:last], types, strict=True)):
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[index], position)
            hidden = self.family.run_block(block, hidden, ctx, layer_type)
        return hidden

    def backward(
        self, hidden: torch.Tensor, grad_output: torch.Tensor, start: int | None = None, end: int | None = None,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of ``<forward(hidden, prompts), grad_output>`` with respect to ``hidden`` and
        ``prompts`` (None without prompts); weights frozen."""
        with torch.enable_grad():
            inputs = hidden.detach().to(device=self.device, dtype=self.dtype).requires_grad_(True)
            wrt = [inputs]
            if prompts is not None:
                prompts = prompts.detach().to(device=self.device, dtype=self.dtype).requires_grad_(True)
                wrt.append(prompts)
            out = self.forward(inputs, None, start, end, prompts)
            if grad_output.shape != out.shape:
                raise SpanUsageError(f"grad_output must have shape {tuple(out.shape)}, got {tuple(grad_output.shape)}")
            grads = torch.autograd.grad(out, wrt, grad_output.to(device=self.device, dtype=self.dtype))
        return grads[0], (grads[1] if prompts is not None else None)

    # ------------------------------------------------- the same, one block per step (for daemons)

    def forward_blocks(self, hidden: torch.Tensor, start: int | None = None, end: int | None = None,
                       prompts: torch.Tensor | None = None) -> Generator[None, None, torch.Tensor]:
        """``forward(hidden, None, start, end, prompts)`` as a generator that stops after every block.

        A daemon's compute worker runs each step as a job of its own, so another session's decode
        step waits behind at most one block of a long forward request, never all of it. Each block
        runs exactly as in ``forward`` (same inputs, same kernels, its own slice of the deep
        prompts): the result is bit-identical.
        """
        start, end = self._range(start, end)
        for block in range(start, end):
            hidden = self.forward(hidden, None, block, block + 1, _block_prompts(prompts, block - start))
            if block + 1 < end:
                yield
        return hidden

    def backward_blocks(self, hidden: torch.Tensor, grad_output: torch.Tensor, start: int | None = None,
                        end: int | None = None, prompts: torch.Tensor | None = None,
                        ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor | None]]:
        """``backward(hidden, grad_output, start, end, prompts)`` as a generator that stops after
        every block: a forward pass keeping each block's input, then the chain rule block by block
        in reverse (each block's forward recomputed with autograd, its vector-Jacobian product
        taken). Bit-identical to ``backward``: every op runs on the same values in the same order,
        with inputs that require grad as there (kernel choice may depend on it). Memory: one
        block's autograd graph at a time plus each block's input, instead of every block's graph."""
        start, end = self._range(start, end)
        inputs: list[torch.Tensor] = []
        current = hidden
        with torch.enable_grad():
            for block in range(start, end):
                current = current.detach().to(device=self.device, dtype=self.dtype)
                inputs.append(current)
                block_prompts = _block_prompts(prompts, block - start)
                if block_prompts is not None:
                    block_prompts = block_prompts.detach().requires_grad_(True)
                current = self.forward(current.requires_grad_(True), None, block, block + 1, block_prompts)
                yield
        if grad_output.shape != current.shape:
            raise SpanUsageError(f"grad_output must have shape {tuple(current.shape)}, got {tuple(grad_output.shape)}")
        grad = grad_output
        prompt_grads: list[torch.Tensor] = []
        for block in reversed(range(start, end)):
            grad, prompt_grad = self.backward(inputs[block - start], grad, block, block + 1,
                                              _block_prompts(prompts, block - start))
            if prompt_grad is not None:
                prompt_grads.append(prompt_grad)
            if block > start:
                yield
        return grad, (torch.cat(prompt_grads[::-1]) if prompt_grads else None)


def _block_prompts(prompts: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """One block's slice [1, 1 or B, K, H] of deep prompts [blocks, 1 or B, K, H] (or None)."""
    return None if prompts is None else prompts[index:index + 1]


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, position: int) -> torch.Tensor:
    """Deep prompt tuning (as in Petals): ``prompt`` [1 or B, K, H] is added to the hidden states of
    sequence positions [0, K) at a block's input. ``hidden`` [B, T, H] holds positions
    [position, position + T), so a step past the prefix is unchanged and a prefix split over
    several steps (or replayed in other chunks) gets each position's prompt exactly once."""
    count = min(prompt.shape[1] - position, hidden.shape[1])
    if count <= 0:
        return hidden
    head = hidden[:, :count] + prompt[:, position:position + count]
    return torch.cat([head, hidden[:, count:]], dim=1)



def build_skeleton(config: transformers.PretrainedConfig) -> nn.Module:
    """The whole causal-LM module tree on the meta device: no memory, no initialization cost.

    Building the real classes (rather than re-implementing blocks) is what makes the span compute
    exactly what transformers computes; the meta device makes it free even for a 70B config.
    """
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def load_modules(
    checkpoint: Checkpoint, module: nn.Module, prefix: str, dtype: torch.dtype, device: torch.device
) -> int:
    """Load the tensors under ``prefix`` into the meta ``module``; return the bytes loaded.

    ``strict=True`` catches a checkpoint that does not match the architecture; ``assign=True`` makes
    the loaded tensors the parameters (no copy into meta storage). ``assign`` keeps the checkpoint
    tensors' ``requires_grad=True`` default, hence ``requires_grad_(False)``: weights are frozen.
    """
    names = checkpoint.names_with_prefix(prefix)
    tensors = checkpoint.load(names, dtype, device)
    state = {name[len(prefix) :]: tensor for name, tensor in tensors.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(checkpoint.path, f"tensors under {prefix!r} do not match the architecture: {exc}") from exc
    module.requires_grad_(False)
    module.eval()
    leftover = [name for name, t in module.named_buffers() if t.is_meta]
    if leftover:
        raise ModelLoadError(checkpoint.path, f"{prefix!r}: buffers not in the checkpoint: {leftover}")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _renumber_layer_idx(block: nn.Module, global_index: int, local_index: int) -> None:
    """Attention modules call ``cache.update(k, v, self.layer_idx)``: make that index local to the span."""
    for module in block.modules():
        if getattr(module, "layer_idx", None) == global_index:
            module.layer_idx = local_index


def load_span(
    path: str | Path | Checkpoint,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
) -> Span:
    """Load blocks ``[start, end)`` of the checkpoint at ``path``, reading only their tensors.

    The module tree is built on the meta device, then each block gets its ``{prefix}.{k}.*`` tensors
    (``progress(done, total)`` after each). Attention ``layer_idx`` are renumbered to 0.. so the
    per-session cache holds exactly the span's layers (see ``SpanCache``).
    """
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
    config = checkpoint.config
    family = family_for(config)
    num_blocks = config.num_hidden_layers
    if not 0 <= start < end <= num_blocks:
        raise ModelLoadError(checkpoint.path, f"blocks [{start}, {end}) are not within the model's {num_blocks}")
    device = torch.device(device)
    skeleton = build_skeleton(config)
    base = getattr(skeleton, family.base)
    all_blocks: nn.ModuleList = getattr(base, family.blocks_attr)
    blocks = nn.ModuleList()
    weight_bytes = 0
    for index in range(start, end):
        block = all_blocks[index]
        weight_bytes += load_modules(checkpoint, block, family.block_tensor_prefix(index), dtype, device)
        _renumber_layer_idx(block, index, index - start)
        blocks.append(block)
        if progress is not None:
            progress(index - start + 1, end - start)
    rotary = build_rotary(config, family, skeleton, device)
    return Span(
        start=start,
        end=end,
        config=config,
        family=family,
        blocks=blocks,
        rotary=rotary,
        dtype=dtype,
        device=device,
        weight_bytes=weight_bytes,
    )


def span_shards(checkpoint: Checkpoint, start: int, end: int) -> set[str]:
    """The safetensors files holding blocks ``[start, end)`` (what a daemon must fetch to serve them)."""
    family = family_for(checkpoint.config)
    names = [n for i in range(start, end) for n in checkpoint.names_with_prefix(family.block_tensor_prefix(i))]
    return checkpoint.shards_of(names)


def block_bytes(config: transformers.PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes the weights of one block take in ``dtype`` (the largest block), from the config alone."""
    family = family_for(config)
    blocks = getattr(getattr(build_skeleton(config), family.base), family.blocks_attr)
    return max(sum(p.numel() for p in block.parameters()) for block in blocks) * torch.finfo(dtype).bits // 8


def build_rotary(
    config: transformers.PretrainedConfig, family: Family, skeleton: nn.Module, device: torch.device
) -> nn.Module | None:
    """A real rotary-embedding module (its inverse frequencies are computed, not stored).

    The skeleton's copy lives on the meta device, so we construct a fresh one of the same class;
    it stays float32, like the full model's (its forward casts cos/sin to the hidden dtype).
    """
    if not family.has_rotary:
        return None
    meta_rotary = getattr(getattr(skeleton, family.base), "rotary_emb")
    return type(meta_rotary)(config=config).to(device)
