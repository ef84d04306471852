"""Per-token time of direct, relayed and punched chains behind real NATs, in one run (as root).

    sudo .venv/bin/python -m benchmarks.nat_paths --tokens 40 --rounds 3

Builds the NAT lab (tests/system/natlab.py: network namespaces, veth pairs, a bridge, iptables
masquerading; tests/system/chainlab.py: a 6-block Llama of hidden size 64, fp32, daemons with one
torch thread and push forwarding) with three chains of three daemons each:

- direct A -> P1 -> P2: all on the public network;
- relayed A -> BX -> B2: BX behind the first NAT (`--no-hole-punching`), B2 behind the second;
  BX pushes to B2 through a relay, and B2's result reaches the client through its relay;
- punched A -> B -> B2: B, beside BX, punches a direct TCP connection to B2 and pushes over it.

One client process (tests/system/nat_client.py, in the public namespace) alternates the three
chains `--rounds` times, `--tokens` greedy tokens each, after `--warmup` tokens per chain
(connections, the punch); the figure is the median time between tokens over all rounds, against
local `transformers` generation on one torch thread. Every generation must equal local's, and each
chain must take its route, or the run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

SYSTEM_TESTS = Path(__file__).resolve().parent.parent / "tests" / "system"
sys.path.insert(0, str(SYSTEM_TESTS))  # the namespace lab lives beside the system tests that use it
from chainlab import PROMPT, chain_lab, lab_problem, local_tokens, run_client, start_three_chains  # noqa: E402
from nat_client import local_token_ms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=40, help="tokens per generation (default 40)")
    p.add_argument("--rounds", type=int, default=3, help="generations per chain, interleaved (default 3)")
    p.add_argument("--warmup", type=int, default=5, help="uncounted tokens per chain first (default 5)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    problem = lab_problem()
    if problem:
        print(f"nat_paths: cannot build the lab: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nat-paths-") as tmp, chain_lab(Path(tmp), "bn") as (lab, model, swarms):
        chains = start_three_chains(swarms)
        load_before = os.getloadavg()[0]
        result = run_client(lab, model, chains.daemons["a"].addrs[0], "--tokens", str(args.tokens),
                            "--rounds", str(args.rounds), "--warmup", str(args.warmup),
                            "--chains", json.dumps(chains.avoid))
        load_after = os.getloadavg()[0]
        expected = local_tokens(model, args.tokens)
        if not all(out == expected for out in result["outputs"]):
            print("nat_paths: a chain's tokens differ from local generation", file=sys.stderr)
            return 1
        routes = {label: route for label, route in result["routes"]}
        if routes != chains.routes:
            print(f"nat_paths: chains took other routes than meant: {routes} vs {chains.routes}", file=sys.stderr)
            return 1
        local_ms = local_token_ms(str(model), PROMPT, args.tokens, args.rounds)
    ms = {label: statistics.median(result[label]) * 1000 for label in chains.avoid}
    print(f"per-token median, {args.rounds} x {args.tokens} tokens per chain; load average "
          f"{load_before:.1f} -> {load_after:.1f}")
    print(f"  local   {local_ms:7.2f} ms")
    for label, value in ms.items():
        print(f"  {label:7s} {value:7.2f} ms  {value / local_ms:5.1f}x local  {value / ms['direct']:.2f}x direct")
    if args.json:
        args.json.write_text(json.dumps({"local_ms": local_ms, "chains_ms": ms, "tokens": args.tokens,
                                         "rounds": args.rounds, "load_average": [load_before, load_after]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
