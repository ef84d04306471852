"""Compressed activations (`compression`) with real daemons and push forwarding: off by default
and then exact; with fp16 or bf16 the prefill's hidden states travel in half the bytes (counted in
the client's frames) with logits close to local (the measured difference is printed, run with -s)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from petals_client import AutoDistributedModelForCausalLM
from petals_client.localswarm import LocalSwarm
from petals_protocol.p2p.streams import FramedStream

from test_push import local, model_path, swarm  # noqa: F401  (the same 3-daemon swarm, 0:2 2:4 4:6)

pytestmark = pytest.mark.integration

PROMPT = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(5))
NEW_TOKENS = 6


class FrameBytes:
    """Bytes of every frame the client writes and reads (its streams run in the client's thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent = self.received = 0
        write, receive = FramedStream._write, FramedStream.receive_frame

        async def counted_write(stream: FramedStream, data: bytes) -> None:
            self.sent += len(data)
            await write(stream, data)

        async def counted_receive(stream: FramedStream) -> bytes:
            payload = await receive(stream)
            self.received += len(payload)
            return payload

        monkeypatch.setattr(FramedStream, "_write", counted_write)
        monkeypatch.setattr(FramedStream, "receive_frame", counted_receive)


def generate(model_path: Path, swarm: LocalSwarm, monkeypatch: pytest.MonkeyPatch,
             **options) -> tuple[object, FrameBytes]:
    with AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.addrs, **options) as model:
        model.generate(PROMPT[:, :4], max_new_tokens=1)  # routes found, connections open: not counted
        counter = FrameBytes(monkeypatch)
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        monkeypatch.undo()
    return out, counter


def test_compression_off_is_exact_and_fp16_halves_the_bytes(model_path, local, swarm, monkeypatch):
    expected = local.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    exact, plain = generate(model_path, swarm, monkeypatch)
    assert exact.sequences.tolist() == expected.sequences.tolist()
    for got, want in zip(exact.logits, expected.logits):
        assert torch.equal(got, want)

    for codec, bound in (("fp16", 1e-2), ("bf16", 1e-1)):
        out, packed = generate(model_path, swarm, monkeypatch, compression=codec)
        diff = float((out.logits[0] - expected.logits[0]).abs().max())
        scale = float(expected.logits[0].abs().max())
        print(f"\n{codec}: prefill of {PROMPT.shape[1]} tokens: logits max abs diff {diff:.3g} (logits up to "
              f"{scale:.3g}); client frames sent {plain.sent} -> {packed.sent} bytes, received "
              f"{plain.received} -> {packed.received} bytes")
        assert 0 < diff < bound * scale, diff  # rounded, so not exact, but close
        # One-token steps stay float32, so only the prefill's share of the bytes halves.
        hidden_bytes = PROMPT.shape[1] * 64 * 4
        assert plain.sent - packed.sent >= 0.9 * hidden_bytes / 2
        assert plain.received - packed.received >= 0.9 * 3 * hidden_bytes / 2  # a reply from every hop


def test_compress_decode_too(model_path, local, swarm, monkeypatch):
    expected = local.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    out, packed = generate(model_path, swarm, monkeypatch, compression="fp16", compress_decode=True)
    _, plain = generate(model_path, swarm, monkeypatch)
    assert packed.received < 0.6 * plain.received  # every step's hidden states in half the bytes
    # A tiny random model's logits are close to each other, so greedy tokens may differ after
    # rounding; the first one comes from the prefill and must agree with local.
    assert out.sequences[0, PROMPT.shape[1]] == expected[0, PROMPT.shape[1]]
