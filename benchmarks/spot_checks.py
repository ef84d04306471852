"""What spot checks cost per token: greedy decoding at spot_check_rate 0, 0.1 and 1.0 vs local `transformers`.

    python -m benchmarks.spot_checks [--model-size 6.8m] [--daemons 2] [--new-tokens 64] [--repeats 3] [--json PATH]

Every daemon serves all blocks (a check needs a second daemon for the same blocks). One client per
rate is connected to the same daemons; each repeat runs local, then each rate, back to back, so
load from other users of the machine hits all of them alike. The figure is the mean time per
token after the first (benchmarks.measure.TokenClock: prefill and session setup excluded), the
median over repeats, and its ratio to local. Every run's tokens are compared with local's.
A check at step P is a stateless forward over the P tokens so far on another daemon, so the cost
at a given rate grows with the length of the generation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.localswarm import LocalSwarm

from .measure import TokenClock, machine_info, median
from .shapes import SHAPES, default_cache_dir, ensure_model

RATES = (0.0, 0.1, 1.0)


def _decode(generate, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    clock = TokenClock()
    out = generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return clock.per_token_s, out[0, ids.shape[1]:].tolist()


def run(model_size: str, daemons: int, new_tokens: int, prompt_tokens: int, repeats: int,
        cache_dir: Path) -> dict[str, object]:
    torch.set_num_threads(1)
    path = ensure_model(SHAPES[model_size], cache_dir)
    local = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, SHAPES[model_size].vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    record: dict[str, object] = {"machine_at_start": machine_info(1, 1)}
    blocks = SHAPES[model_size].num_layers
    with LocalSwarm(path, extra_args=["--num-threads", "1"]) as swarm:
        for _ in range(daemons):
            swarm.start(f"0:{blocks}")
        clients = {rate: AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.addrs[:1],
                                                                         spot_check_rate=rate) for rate in RATES}
        try:
            _decode(local.generate, ids, 4)  # warm-up: first-call costs, connections
            for client in clients.values():
                _decode(client.generate, ids, 4)
            times: dict[str, list[float]] = {"local": [], **{str(rate): [] for rate in RATES}}
            matches = True
            for _ in range(repeats):
                seconds, expected = _decode(local.generate, ids, new_tokens)
                times["local"].append(seconds)
                for rate, client in clients.items():
                    seconds, tokens = _decode(client.generate, ids, new_tokens)
                    times[str(rate)].append(seconds)
                    matches = matches and tokens == expected
            checks = {str(rate): {"checked": c.spot_checks.checked, "steps": c.spot_checks.steps,
                                  "disagreements": c.spot_checks.disagreements}
                      for rate, c in clients.items() if c.spot_checks is not None}
        finally:
            for client in clients.values():
                client.close()
    local_s = median(times["local"])
    record.update({
        "model_size": model_size, "daemons": daemons, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
        "repeats": repeats, "tokens_match": matches, "per_token_s": {k: median(v) for k, v in times.items()},
        "ratio_to_local": {k: median(v) / local_s for k, v in times.items() if k != "local"},
        "samples_s": times, "spot_checks": checks, "machine_at_end": machine_info(1, 1),
    })
    return record


def format_report(record: dict[str, object]) -> str:
    per_token = record["per_token_s"]
    ratio = record["ratio_to_local"]
    assert isinstance(per_token, dict) and isinstance(ratio, dict)
    lines = [f"{record['model_size']}, {record['daemons']} daemons serving every block, {record['new_tokens']} new "
             f"tokens, median of {record['repeats']}; tokens match local: {record['tokens_match']}",
             f"  local                  {per_token['local'] * 1000:8.2f} ms/token"]
    for rate in RATES:
        lines.append(f"  spot_check_rate={rate:<4}   {per_token[str(rate)] * 1000:8.2f} ms/token  "
                     f"x{ratio[str(rate)]:.2f} local")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-size", choices=sorted(SHAPES), default="6.8m")
    parser.add_argument("--daemons", type=int, default=2, help="each serves every block; at least 2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--json", type=Path, help="write the full record here")
    args = parser.parse_args(argv)
    if args.daemons < 2 or args.new_tokens < 2 or args.repeats < 1:
        print("need --daemons >= 2, --new-tokens >= 2 and --repeats >= 1", file=sys.stderr)
        return 2
    record = run(args.model_size, args.daemons, args.new_tokens, args.prompt_tokens, args.repeats, args.cache_dir)
    print(format_report(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
