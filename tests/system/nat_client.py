"""The client side of tests/system/test_nat.py, run inside the lab's public namespace.

Prints one JSON line: whether direct dials to the NATed daemon failed, what the swarm looks like
(each server's addresses), the generated tokens, the route, recoveries and per-token times.
With --kill-after K it SIGKILLs, after K new tokens, the relay its connection to the NATed daemon
goes through (a process in the same PID namespace: --pids maps peer id to pid).
"""
from __future__ import annotations

import argparse
import logging
import json
import os
import signal
import time

import torch
import trio

from petals_client import AutoDistributedModelForCausalLM
from petals_protocol.p2p.host import DialError, connect, make_host, running_host
from petals_protocol.p2p.identity import ephemeral_identity
from petals_protocol.p2p.relay import relay_peer_of


async def try_direct(addrs: list[str], listen: str) -> dict[str, str]:
    outcome: dict[str, str] = {}
    host = make_host(ephemeral_identity())
    async with running_host(host, [listen]):
        for addr in addrs:
            try:
                await connect(host, addr, timeout=5)
                outcome[addr] = "connected"
            except DialError as exc:
                outcome[addr] = f"failed: {exc.reason}"
    return outcome


class Streamer:
    def __init__(self, kill_after: int | None, action) -> None:
        self.kill_after, self.action = kill_after, action
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())
        if self.kill_after is not None and len(self.stamps) - 1 == self.kill_after:
            self.action()

    def end(self) -> None:
        pass


def compare(model, prompt: torch.Tensor, chains: dict[str, list[str]], rounds: int, tokens: int,
            warmup: int = 0) -> dict:
    """Per-token gaps of generations through each chain (label -> the peers it avoids), the
    chains interleaved round after round so that a change in the machine's load hits all alike.
    With `warmup`, each chain first generates that many tokens, not counted (connections, punches)."""
    everyone = {peer for avoid in chains.values() for peer in avoid}
    out: dict = {**{label: [] for label in chains}, "routes": [], "outputs": []}

    def generate(label: str, count: int) -> tuple[list[float], list[int], list[str]]:
        for peer in everyone - set(chains[label]):
            model.swarm.unban(peer)
        for peer in chains[label]:
            model.swarm.ban(peer)
        with model.inference_session(max_length=prompt.shape[1] + count) as session:
            streamer = Streamer(None, None)
            result = model.generate(prompt, session=session, max_new_tokens=count, do_sample=False, streamer=streamer)
            route = [h.server.peer_id for h in session.route]
        return [b - a for a, b in zip(streamer.stamps[1:], streamer.stamps[2:])], result[0].tolist(), route

    for label in chains if warmup else ():
        generate(label, warmup)
    for _ in range(rounds):
        for label in chains:
            gaps, result, route = generate(label, tokens)
            out[label] += gaps
            out["routes"].append([label, route])
            out["outputs"].append(result)
    return out


def local_token_ms(model_path: str, prompt: list[int], tokens: int, rounds: int) -> float:
    """Median time between tokens of local `transformers` generation on one torch thread (as
    each daemon runs), over `rounds` generations: the denominator of the benchmark's ratios."""
    import statistics

    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model_path)
    gaps: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            streamer = Streamer(None, None)
            local.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, streamer=streamer)
            gaps += [b - a for a, b in zip(streamer.stamps[1:], streamer.stamps[2:])]
    finally:
        torch.set_num_threads(threads)
    return statistics.median(gaps) * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--direct", nargs="*", default=[])
    p.add_argument("--listen", default="/ip4/198.51.100.1/tcp/0")
    p.add_argument("--prompt", required=True, help="token ids, JSON")
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--kill-after", type=int)
    p.add_argument("--pids", default="{}", help="peer id -> pid, JSON")
    p.add_argument("--compare", nargs=2, metavar=("RELAYED", "DIRECT"),
                   help="instead: alternate generations avoiding one peer then the other, --rounds times")
    p.add_argument("--chains", help="instead: label -> peers avoided, JSON; alternate generations over "
                   "these chains --rounds times")
    p.add_argument("--warmup", type=int, default=0, help="with --chains: tokens per chain first, not counted")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--swarm-key", help="the swarm's private network key file")
    p.add_argument("--step-timeout", type=float, default=10.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[client] %(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(logging.WARNING)
    result: dict = {"direct_dial": trio.run(try_direct, args.direct, args.listen)}
    prompt = torch.tensor([json.loads(args.prompt)])
    pids = json.loads(args.pids)
    with AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[args.peer], connect_timeout=5.0,
                                                         step_timeout=args.step_timeout, max_retries=4,
                                                         swarm_key=args.swarm_key) as model:
        result["servers"] = [{"peer_id": s.peer_id, "addrs": list(s.addrs), "blocks": [s.start, s.end], "rtt": s.rtt}
                             for s in model.swarm.servers()]
        chains = json.loads(args.chains) if args.chains else None
        if args.compare:  # the relayed chain avoids the direct daemon and the other way round
            chains = {"relayed": [args.compare[1]], "direct": [args.compare[0]]}
        if chains:
            out = compare(model, prompt, chains, args.rounds, args.tokens, args.warmup)
            print("RESULT " + json.dumps({**result, **out}), flush=True)
            return
        with model.inference_session(max_length=prompt.shape[1] + args.tokens) as session:
            killed: list[str] = []

            def kill_relay() -> None:
                natted = [h for h in session.route if relay_peer_of(h.server.addrs[0] if h.server.addrs else "")]
                relay = relay_peer_of(natted[0].server.addrs[0])
                killed.append(relay)
                os.kill(pids[relay], signal.SIGKILL)

            streamer = Streamer(args.kill_after, kill_relay)
            result["route_before"] = [{"peer_id": h.server.peer_id, "blocks": [h.start, h.end],
                                       "addrs": list(h.server.addrs)} for h in session.route]
            out = model.generate(prompt, session=session, max_new_tokens=args.tokens, do_sample=False,
                                 streamer=streamer)
            result["route_after"] = [{"peer_id": h.server.peer_id, "blocks": [h.start, h.end]} for h in session.route]
            result["recoveries"] = session.recoveries
            result["resumes"] = session.resumes
            result["killed_relay"] = killed
        gaps = [b - a for a, b in zip(streamer.stamps[1:], streamer.stamps[2:])]
        result["token_seconds"] = gaps
        result["tokens"] = out[0].tolist()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
