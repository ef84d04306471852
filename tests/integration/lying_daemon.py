"""Test fault injector: a real `petalsd` that alters every output it computes and signs it normally.

Run as a script in place of `python -m petalsd` (LocalSwarm.start(launcher=[this file])). It
announces the honest model and passes every signature check: only the numbers are wrong, scaled by
`PETALS_TEST_LIE_SCALE` (default 1.01: a 1% error, far outside the fp32 tolerance yet small enough
that a token may or may not change). Steps of sessions and stateless forwards are both altered, as
a daemon with broken hardware or a malicious operator would. Test-only: nothing in the product
reads that variable.
"""
from __future__ import annotations

import os
import sys

import torch

import petalsd.batching as batching
import petalsd.handlers as handlers
from petalsd.cli import main
from petals_protocol.tensors import TensorPayload, from_torch

SCALE = float(os.environ.get("PETALS_TEST_LIE_SCALE", "1.01"))


def _lying_from_torch(tensor: torch.Tensor) -> TensorPayload:
    """What the daemon encodes (and then signs) for the client: the output, altered. Session steps
    are encoded where they run (batching.py), forward requests in handlers.py."""
    return from_torch(tensor * SCALE if tensor.is_floating_point() else tensor)


handlers.from_torch = _lying_from_torch
batching.from_torch = _lying_from_torch

if __name__ == "__main__":
    sys.exit(main())
