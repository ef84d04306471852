"""Per-hop, per-token CPU costs of our own code path, measured in isolation (no network).

    python -m benchmarks.step_costs --hidden 1024

Every decode step, each hop pays on the client: `from_torch`, `encode_message(InferenceStep)`,
`decode_message(StepResult)`, the binding's two SHA-256 digests, an Ed25519 verify (including
rebuilding the public key from the peer id) and `to_torch`; on the daemon the mirror image plus a
signature and a thread hop into the compute worker (`petalsd.compute.ComputeWorker`). The client's
user thread also crosses into the trio loop (`trio.from_thread.run`) once per token. Last, the
batched decode's matmuls: `F.linear` (MKL) against a oneDNN-packed weight (`petals_protocol.models.
packed`), 1 and 8 rows, on the 271M model's MLP and LM-head shapes. This prints the best-of-N time of each, so
the integrator can see which are worth caching or removing; the network itself (py-libp2p yamux
+ Noise, ~2.4-3.2 ms per request/response on loopback) is in docs/py-libp2p.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable

import torch
import trio

import torch.nn.functional as F

from petals_protocol.messages import InferenceStep, StepResult, decode_message, encode_message
from petals_protocol.signing import (
    inference_binding,
    peer_id_from_private_key,
    peer_id_from_text,
    peer_id_to_text,
    private_key_from_seed,
    public_key_from_peer_id,
    sign_response,
    verify_response,
)
from petals_protocol.models.packed import pack
from petals_protocol.tensors import from_torch, to_torch
from petalsd.compute import ComputeWorker

FINGERPRINT = "sha256:" + "ab" * 32


def best_of(fn: Callable[[], object], number: int = 200, repeat: int = 5) -> float:
    """Seconds per call: the best of `repeat` batches of `number` calls (robust to a busy machine)."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - began) / number)
    return best


def thread_hop_costs(number: int = 300) -> dict[str, float]:
    """A no-op round trip loop -> worker thread (daemon) and user thread -> loop (client)."""
    results: dict[str, float] = {}

    async def main() -> None:
        def noop() -> None:
            return None

        limiter = trio.CapacityLimiter(1)
        async with ComputeWorker() as worker:
            for name, hop in (("ComputeWorker.run round trip (daemon compute hop)", lambda: worker.run(noop)),
                              ("trio.to_thread.run_sync round trip (what it replaced)",
                               lambda: trio.to_thread.run_sync(noop, limiter=limiter))):
                best = float("inf")
                for _ in range(5):
                    began = time.perf_counter()
                    for _ in range(number):
                        await hop()
                    best = min(best, (time.perf_counter() - began) / number)
                results[name] = best

        token = trio.lowlevel.current_trio_token()

        async def anoop() -> None:
            return None

        def caller() -> None:
            results["trio.from_thread.run round trip (client user thread -> loop)"] = best_of(
                lambda: trio.from_thread.run(anoop, trio_token=token), number=number)

        await trio.to_thread.run_sync(caller)

    trio.run(main)
    return results


def step_costs(hidden_size: int) -> dict[str, float]:
    key = private_key_from_seed(os.urandom(32))
    peer = peer_id_from_private_key(key)
    peer_text = peer_id_to_text(peer)
    hidden = torch.randn(1, 1, hidden_size)
    payload = from_torch(hidden)
    step = InferenceStep(session_id=os.urandom(16), step=7, position=23, hidden=payload, hypo_ids=None)
    binding = inference_binding(step, start_block=0, end_block=5, model_fingerprint=FINGERPRINT, output=payload)
    signature = sign_response(key, binding)
    result = StepResult(session_id=step.session_id, step=7, position=23, hidden=payload, signature=signature)
    step_wire, result_wire = encode_message(step), encode_message(result)

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer))
    canonical = binding.canonical_bytes()
    return {
        "from_torch [1,1,H]": best_of(lambda: from_torch(hidden)),
        "to_torch [1,1,H]": best_of(lambda: to_torch(payload)),
        "encode_message(InferenceStep)": best_of(lambda: encode_message(step)),
        "decode_message(InferenceStep)": best_of(lambda: decode_message(step_wire)),
        "encode_message(StepResult)": best_of(lambda: encode_message(result)),
        "decode_message(StepResult)": best_of(lambda: decode_message(result_wire)),
        "inference_binding (2 SHA-256 digests)": best_of(lambda: inference_binding(
            step, start_block=0, end_block=5, model_fingerprint=FINGERPRINT, output=payload)),
        "sign_response (Ed25519 sign)": best_of(lambda: sign_response(key, binding)),
        "verify_response (key from peer id + verify)": best_of(lambda: verify_response(peer, binding, signature)),
        "  of which: Ed25519 verify with a cached key": best_of(lambda: public.verify(signature, canonical)),
        "peer_id_from_text (base58, done per step)": best_of(lambda: peer_id_from_text(peer_text)),
    }


def linear_costs() -> dict[str, float]:
    """`F.linear` vs the oneDNN-packed weight the batched decode and head use, fp32, 1 and 8 rows."""
    results: dict[str, float] = {}
    for out_features, in_features, what in ((2816, 1024, "MLP"), (32000, 1024, "LM head")):
        weight = torch.randn(out_features, in_features)
        packed = pack(weight, None)
        for rows in (1, 8):
            x = torch.randn(rows, 1, in_features)
            number = 50 if out_features < 10000 else 5
            name = f"{what} {out_features}x{in_features}, {rows} rows"
            results[f"{name}: F.linear"] = best_of(lambda: F.linear(x, weight), number=number)
            if packed is not None:
                results[f"{name}: oneDNN packed"] = best_of(lambda: packed(x), number=number)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for hidden_size in args.hidden:
        print(f"hidden {hidden_size}: per call, best of 5x200")
        for name, seconds in step_costs(hidden_size).items():
            print(f"  {seconds * 1e6:8.1f} us  {name}")
    for name, seconds in thread_hop_costs().items():
        print(f"  {seconds * 1e6:8.1f} us  {name}")
    print("matmuls of the batched decode (best of 5)")
    for name, seconds in linear_costs().items():
        print(f"  {seconds * 1e6:8.1f} us  {name}")
    print(f"(thread count {threading.active_count()}, load {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
