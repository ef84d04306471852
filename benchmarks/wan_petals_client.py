"""The Petals side of benchmarks/wan_petals.py: Petals' client, run by a Python that has Petals.

Runs inside the WAN lab's client namespace under `--petals-python` (Petals is never a dependency
of this project; this module imports only `petals`, `torch` and benchmarks.measure). It waits
until Petals' servers announce every block, then measures exactly what benchmarks/wan_client.py
measures for our swarm, each generation in a fresh inference session: decode seconds per token,
prefill (time to the first token of a long prompt, session already open), and time to first
token (opening the session included). Prints one line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import torch

from .measure import TokenClock, median


def _greedy(new_tokens: int) -> dict[str, Any]:
    # the options benchmarks.swarm_vs_local.greedy_options gives our side (that module needs petals_client)
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def _generate(model: Any, ids: torch.Tensor, new_tokens: int, clock: TokenClock) -> list[int]:
    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
        return model.generate(ids, session=session, streamer=clock, **_greedy(new_tokens))[0].tolist()


def wait_for_blocks(model: Any, timeout: float) -> list[dict[str, Any]]:
    """Wait until Petals' routing finds every block on an announced server; return that route."""
    from petals.client.routing.sequence_manager import MissingBlocksError

    manager = model.transformer.h.sequence_manager
    deadline = time.monotonic() + timeout
    while True:
        try:  # the first call starts Petals' routing thread and waits for its first look at the DHT
            route = manager.make_sequence(mode="max_throughput")
            return [{"peer_id": str(span.peer_id), "blocks": [span.start, span.end]} for span in route]
        except MissingBlocksError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Petals' servers did not announce every block within {timeout:.0f} s") from exc
        time.sleep(1.0)
        manager.update(wait=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--peers", nargs="+", required=True, help="Petals servers' multiaddresses")
    p.add_argument("--dht-prefix", required=True, help="the servers' --dht_prefix")
    p.add_argument("--prompt", required=True, help="short prompt, token ids as JSON")
    p.add_argument("--long-prompt", required=True, help="prefill prompt, token ids as JSON")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from petals import AutoDistributedModelForCausalLM

    prompt, long_prompt = torch.tensor([json.loads(args.prompt)]), torch.tensor([json.loads(args.long_prompt)])
    result: dict[str, Any] = {"decode_s": [], "prefill_s": [], "ttft_s": []}
    began = time.perf_counter()
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peers,
                                                            dht_prefix=args.dht_prefix,
                                                            torch_dtype=torch.float32)
    result["route"] = wait_for_blocks(model, args.ready_timeout)
    result["connect_s"] = time.perf_counter() - began
    _generate(model, prompt, 2, TokenClock())  # warm-up: connections, allocators
    for _ in range(args.repeats):
        clock = TokenClock()
        result["tokens"] = _generate(model, prompt, args.new_tokens, clock)
        result["decode_s"].append(clock.per_token_s)
        clock = TokenClock()
        _generate(model, long_prompt, 2, clock)
        result["prefill_s"].append(clock.first_token_s)
        clock, called = TokenClock(), time.perf_counter()
        _generate(model, prompt, 2, clock)  # a fresh session: opening it counts
        result["ttft_s"].append(clock.stamps[1] - called)
    result.update({f"{key}_median_s": median(result[f"{key}_s"]) for key in ("decode", "prefill", "ttft")})
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
