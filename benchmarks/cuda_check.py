"""The compute path on a GPU: spans and the client part on CUDA against `transformers` on CUDA.

    python -m benchmarks.cuda_check --device cuda

What a daemon started with `--device cuda` runs is `load_span(..., device=...)` and
`Span.forward` (plus `batched_decode` with `--batching`); the client's part is
`load_client_part(..., device=...)`. This builds random checkpoints from configs (llama, bloom,
falcon), cuts each into two spans and checks, per dtype: greedy tokens of a span-by-span decode
equal `model.generate` on the same device, the max logit difference of a prefill, and (llama)
batched decode of 4 sessions against per-session steps. It also times one decode step of the
271M shape's blocks on the device, spans vs the whole model. Needs only torch, transformers and
safetensors (no libp2p), so it runs where the daemon's network stack is not installed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from petals_protocol.models.batched import DecodeItem, batched_decode
from petals_protocol.models.client_part import load_client_part
from petals_protocol.models.span import load_span
from petals_protocol.models.synthetic import make_random_checkpoint


def greedy_through_spans(path: Path, device: str, dtype: torch.dtype, prompt: torch.Tensor,
                         new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode with the client part and two spans; also the max |logit diff| of the prefill
    against the full model's forward."""
    client = load_client_part(path, dtype=dtype, device=device)
    layers = client.num_blocks
    spans = [load_span(path, 0, layers // 2, dtype=dtype, device=device),
             load_span(path, layers // 2, layers, dtype=dtype, device=device)]
    caches = [s.new_cache(1, prompt.shape[1] + new_tokens + 1) for s in spans]
    ids = prompt.to(device)
    out: list[int] = []
    prefill_logits = None
    with torch.inference_mode():
        pending = ids
        for _ in range(new_tokens):
            hidden = client.embed(pending)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span.forward(hidden, cache)
            logits = client.logits(hidden[:, -1:, :])[:, -1, :]
            if prefill_logits is None:
                prefill_logits = client.logits(hidden)
            token = int(torch.argmax(logits.float(), dim=-1))
            out.append(token)
            pending = torch.tensor([[token]], device=device)
        full = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        reference = full(ids).logits
    assert prefill_logits is not None
    return out, float((prefill_logits.float() - reference.float()).abs().max())


def check_family(family: str, device: str, dtype_name: str, root: Path) -> str:
    dtype = getattr(torch, dtype_name)
    path = make_random_checkpoint(root / f"{family}-{dtype_name}", family, num_layers=4, hidden_size=128,
                                  num_heads=4, vocab_size=256, dtype=dtype_name, seed=1)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    tokens, diff = greedy_through_spans(path, device, dtype, prompt, 24)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        ref = model.generate(prompt.to(device), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = ref[0, prompt.shape[1]:].tolist()
    ok = tokens == expected
    return f"{family:6s} {dtype_name:8s} greedy 24 tokens {'EQUAL' if ok else 'DIFFER'}; prefill max |logit diff| {diff:.3g}"


def check_batched(device: str, root: Path) -> str:
    path = make_random_checkpoint(root / "llama-batched", "llama", num_layers=2, hidden_size=128, num_heads=4,
                                  vocab_size=64, seed=2)
    span = load_span(path, 0, 2, device=device)
    gen = torch.Generator().manual_seed(3)
    single = [span.new_cache(1, 64) for _ in range(4)]
    batched = [span.new_cache(1, 64) for _ in range(4)]
    with torch.inference_mode():
        for i in range(4):
            prefill = torch.randn(1, 5 + i, 128, generator=gen).to(device)
            span.forward(prefill, single[i])
            span.forward(prefill, batched[i])
        steps = [torch.randn(1, 1, 128, generator=gen).to(device) for _ in range(4)]
        expected = [span.forward(h, c) for h, c in zip(steps, single, strict=True)]
        outputs = batched_decode(span, [DecodeItem(h, c) for h, c in zip(steps, batched, strict=True)])
    diff = max(float((a - b).abs().max()) for a, b in zip(outputs, expected, strict=True))
    return f"batched decode of 4 sessions vs per-session steps: max |diff| {diff:.3g}"


def time_decode(device: str, root: Path, dtype_name: str, profile: bool = False) -> str:
    """One decode step of the 271M shape's 16 blocks: two spans vs the whole model's layers.

    Each path first runs the same 200 steps untimed, then again on fresh caches timed: on a GPU
    the attention backend (cuDNN in bf16) builds a plan for every new key length and caches it, so
    whichever path ran second would otherwise get the first one's plans for free (an earlier
    version of this check timed the spans first and reported them 4x slower in bf16)."""
    dtype = getattr(torch, dtype_name)
    path = make_random_checkpoint(root / f"llama-271m-{dtype_name}", "llama", num_layers=16, hidden_size=1024,
                                  num_heads=16, intermediate_size=2816, vocab_size=32000, dtype=dtype_name, seed=4)
    spans = [load_span(path, 0, 8, dtype=dtype, device=device), load_span(path, 8, 16, dtype=dtype, device=device)]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def span_steps(steps: int) -> list[float]:
        caches = [s.new_cache(1, 600) for s in spans]
        hidden = torch.randn(1, 16, 1024, device=device, dtype=dtype)
        for s, c in zip(spans, caches, strict=True):
            hidden = s.forward(hidden, c)
        times = []
        for _ in range(steps):
            x = torch.randn(1, 1, 1024, device=device, dtype=dtype)
            sync()
            began = time.perf_counter()
            for s, c in zip(spans, caches, strict=True):
                x = s.forward(x, c)
            sync()
            times.append(time.perf_counter() - began)
        return times

    def model_steps(steps: int) -> list[float]:
        past = model(torch.randint(0, 32000, (1, 16), device=device), use_cache=True).past_key_values
        times = []
        for _ in range(steps):
            token = torch.randint(0, 32000, (1, 1), device=device)
            sync()
            began = time.perf_counter()
            past = model(token, past_key_values=past, use_cache=True).past_key_values
            sync()
            times.append(time.perf_counter() - began)
        return times

    with torch.inference_mode():
        first_span_ms = sorted(span_steps(200))[100] * 1e3  # also warms the plan cache for both
        model_steps(200)
        span_ms = sorted(span_steps(200))[100] * 1e3
        full_ms = sorted(model_steps(200))[100] * 1e3
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
            with torch_profile(activities=activities) as prof:
                span_steps(10)
            print(f"--- profile of 10 span decode steps (warm), {dtype_name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return (f"271M shape {dtype_name}: one decode step through 2 spans {span_ms:.2f} ms; whole model "
            f"(16 blocks + embedding + head) {full_ms:.2f} ms (medians of 200, warm); the spans' first, "
            f"cold pass {first_span_ms:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-timing", action="store_true", help="skip the 271M timing (CPU runs)")
    parser.add_argument("--profile", action="store_true", help="torch profiler table of the span decode steps")
    parser.add_argument("--only-timing", action="store_true", help="skip the parity checks")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.only_timing:
            for family in ("llama", "bloom", "falcon"):
                for dtype_name in ("float32", "bfloat16"):
                    print(check_family(family, args.device, dtype_name, root), flush=True)
            print(check_batched(args.device, root), flush=True)
        if not args.no_timing:
            for dtype_name in ("float32", "bfloat16"):
                print(time_decode(args.device, root, dtype_name, args.profile), flush=True)


if __name__ == "__main__":
    main()
