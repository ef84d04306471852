"""Linear layers whose weights are packed once for oneDNN, for the batched decode on CPU.

A batched decode step multiplies a few rows (one per session) by every weight matrix of a span.
torch's CPU ``F.linear`` hands fp32 to MKL, and on this project's machines (AMD EPYC, one thread)
MKL's small-M matrix products run far below the core's speed: a few rows cost several times what
one row does, although the weights are read once either way. oneDNN's matmul on a weight
reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` /
``_linear_pointwise``, what ``torch.compile``'s CPU backend uses for frozen linear layers) runs
the same rows in a fraction of MKL's time, and a whole batched decode step gets markedly faster
(``python -m benchmarks.step_costs`` prints both; figures: BENCHMARKS.md, "Packed weights for
batches").

Costs, stated where they are paid: the packed copy is a second copy of every linear weight
(``Span.pack_for_batching`` returns its bytes, the daemon logs them): the exact per-session path
keeps the original weights, because local ``transformers`` uses ``F.linear`` and parity with it is
exact. Results differ from ``F.linear`` by float rounding (another summation order: max abs
difference ~1e-4 on outputs of magnitude ~30 from random weights, fp32; through five 271M blocks
2.9e-6 against 1.9e-6 for MKL's batched matmul), which batched decode already accepts (see
``batched.py``; batching is opt-in for that reason). Packing is used only where it is checked to
work: a CPU tensor in fp32 or bf16, a torch with oneDNN, and a probe that agrees with ``F.linear``;
anywhere else (CUDA, other dtypes, an old torch) ``pack`` returns None and callers keep
``F.linear``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_PACKABLE = (torch.float32, torch.bfloat16)
_ROWS_HINT = 8  # the batch size oneDNN tunes the layout for (any number of rows works)
_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # relative to the outputs' magnitude


class PackedLinear:
    """``F.linear(x, weight, bias)`` through oneDNN on a weight packed once (see the module doc)."""

    __slots__ = ("packed", "bias", "nbytes")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
        self.bias = None if bias is None else bias.detach()
        self.nbytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether oneDNN packing can serve this weight here (CPU, fp32/bf16, oneDNN built in)."""
    return (
        weight.device.type == "cpu" and weight.dtype in _PACKABLE and weight.ndim == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear | None:
    """A packed copy of the linear layer, or None where packing is unsupported or disagrees with
    ``F.linear`` on a probe (then the caller keeps ``F.linear``)."""
    if not packing_supported(weight):
        return None
    try:
        packed = PackedLinear(weight, bias)
        probe = torch.randn(3, 1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        with torch.no_grad():
            got, want = packed(probe).float(), F.linear(probe, weight, bias).float()
    except RuntimeError as exc:  # an op this torch build lacks for the dtype, say
        log.warning("oneDNN packing unavailable (%s); batched decode uses F.linear", exc)
        return None
    scale = max(float(want.abs().max()), 1.0)
    if got.shape != want.shape or float((got - want).abs().max()) > _PROBE_TOLERANCE[weight.dtype] * scale:
        log.warning("oneDNN packed linear disagrees with F.linear on a probe; batched decode uses F.linear")
        return None
    return packed
