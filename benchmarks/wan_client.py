"""The client side of benchmarks/wan.py, run inside the WAN lab's client namespace.

Measures, through the swarm only (local figures are the parent's), and prints one line
`RESULT {json}`: decode seconds per token, prefill (time to the first token of a long prompt,
session already open; also with fp16-compressed activations), time to first token of a fresh session (opening the chain included),
the relayed daemon's extra cost (generations through the natted daemon and through a public one
for the same blocks, interleaved), 8 users' aggregate tokens/s against one session's, and the
recovery after SIGKILL of the daemon serving the middle of the chain, and the round trips the
daemons measured to the next span's daemons (their records' next_rtts, which routing uses).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import time
from typing import Any

import torch

from petals_client import AutoDistributedModelForCausalLM, ctl
from petals_client import session as session_module
from petals_protocol.p2p.compat import send_window_waits
from petalsd.step_times import PHASES

from .measure import TokenClock, median
from .swarm_vs_local import _concurrent_tokens_per_s, greedy_options


def _route(session: Any) -> list[dict[str, Any]]:
    return [{"peer_id": h.server.peer_id, "name": h.server.name, "blocks": [h.start, h.end]} for h in session.route]


def _generate(model: Any, ids: torch.Tensor, new_tokens: int, clock: TokenClock,
              window_waits: list[int] | None = None, split: StepSplit | None = None) -> tuple[list[int], list]:
    """Greedy tokens and the route; `window_waits` gets how often the client's writes to the first
    daemon waited for its yamux receive window (a prefill bound by the window, not the link);
    `split` times the steps (see StepSplit)."""
    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
        if split is not None:
            split.watch(session)
        out = model.generate(ids, session=session, streamer=clock, **greedy_options(new_tokens))
        if window_waits is not None:
            window_waits.append(send_window_waits(session._session.channel(0).stream))
        return out[0].tolist(), _route(session)


class StepSplit:
    """Where a step's time goes: each daemon's part is what its step-time counters
    (petalsd/step_times.py, read from its control socket before and after) gained per step; what
    is left of the time inside the session's steps is the network: the legs and the message path
    at both ends of each (TCP, Noise, yamux, framing). For decode (`prompt=False`: every step after
    the prompt's) the client's own work (head, sampling, embeddings, generate's loop) is the token's
    time less the time inside the steps; `prompt=True` splits the prompt's step alone (a prefill)."""

    def __init__(self, controls: dict[str, str], *, prompt: bool = False) -> None:
        self.controls = controls  # daemon name -> control socket path
        self.prompt = prompt
        # monotonic (start, end) of each timed call: its length is the time inside the step, and
        # the lab's hosts share the clock (benchmarks/packet_split.py matches them to packets)
        self.windows: list[tuple[float, float]] = []
        self.before: dict[str, dict[str, float]] | None = None
        self.calls = 0

    def _counters(self) -> dict[str, dict[str, float]]:
        return {name: ctl.metrics(path) for name, path in self.controls.items()}

    def watch(self, session: Any) -> None:
        """Time `session`'s steps. Counters are read outside the measured windows: before the
        generation for a prompt (its only step: generate one token), right after the prompt's step
        for decode (before the first token is stamped)."""
        step = session.step
        if self.prompt:
            self.before = self._counters()

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            began = time.monotonic()
            out = step(*args, **kwargs)
            if self.prompt or self.calls > 1:
                self.windows.append((began, time.monotonic()))
            else:
                self.before = self._counters()
            return out

        session.step = timed  # this session only: generate calls session.step for every token

    def result(self, per_token_s: float) -> dict[str, Any]:
        assert self.before is not None and self.windows, "no step was timed"
        assert not self.prompt or self.calls == 1, "a prompt's split needs a generation of one token"
        after = self._counters()
        daemons = {}
        for name, now in after.items():
            was = self.before[name]
            steps = now["petalsd_timed_steps_total"] - was["petalsd_timed_steps_total"]
            if steps:
                daemons[name] = {"steps": steps, **{phase: (now[key] - was[key]) / steps for phase in PHASES
                                                    if (key := f'petalsd_step_seconds_total{{phase="{phase}"}}')}}
        in_step = statistics.fmean(end - start for start, end in self.windows)
        on_path = sum(d["to_output"] + d["sent_on"] for d in daemons.values())
        return {"per_token_s": per_token_s, "in_step_s": in_step, "client_s": per_token_s - in_step,
                "daemons": daemons, "network_s": in_step - on_path, "windows": self.windows}


class KillingClock(TokenClock):
    """Stamps tokens like TokenClock and SIGKILLs the middle hop's daemon after `after` tokens."""

    def __init__(self, after: int, victim: Any) -> None:
        super().__init__()
        self.after, self.victim = after, victim

    def put(self, value: torch.Tensor) -> None:
        super().put(value)
        if len(self.stamps) - 1 == self.after:
            self.victim()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--prompt", required=True, help="short prompt, token ids as JSON")
    p.add_argument("--long-prompt", required=True, help="prefill prompt, token ids as JSON")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sessions", type=int, default=8, help="concurrent users (0: skip that phase)")
    p.add_argument("--relayed", nargs=2, metavar=("NATTED", "PUBLIC"), help="peer ids serving the same blocks")
    p.add_argument("--pids", default="{}", help="peer id -> pid, JSON (for the SIGKILL)")
    p.add_argument("--controls", default="{}", help="daemon name -> control socket, JSON (for the step split)")
    p.add_argument("--kill-after", type=int, default=0, help="SIGKILL the middle daemon after this many tokens")
    p.add_argument("--step-timeout", type=float, default=120.0, help="generous: the lab's machine may be loaded")
    p.add_argument("--replay-window", type=int, default=0,
                   help="replayed steps in flight per hop (0: the client's default; 1: one at a time, as before)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[client] %(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("petals_client.session").setLevel(logging.INFO)  # recoveries, with their durations
    torch.set_num_threads(1)
    if args.replay_window:
        session_module.MAX_REPLAY_STEPS_IN_FLIGHT = args.replay_window
    prompt, long_prompt = torch.tensor([json.loads(args.prompt)]), torch.tensor([json.loads(args.long_prompt)])
    pids: dict[str, int] = json.loads(args.pids)
    result: dict[str, Any] = {"decode_s": [], "prefill_s": [], "ttft_s": [], "routes": []}
    began = time.perf_counter()
    with AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[args.peer], connect_timeout=10.0,
                                                         step_timeout=args.step_timeout, max_retries=5) as model:
        result["connect_s"] = time.perf_counter() - began
        if args.relayed:
            model.swarm.ban(args.relayed[0])  # the direct chain for everything but the relayed figure
        _generate(model, prompt, 2, TokenClock())  # warm-up: connections, allocators
        for _ in range(args.repeats):
            clock, split = TokenClock(), StepSplit(json.loads(args.controls))
            tokens, route = _generate(model, prompt, args.new_tokens, clock, split=split)
            result.setdefault("split", []).append(split.result(clock.per_token_s))
            result["decode_s"].append(clock.per_token_s)
            result.setdefault("decode_gaps_s", []).append(clock.gaps_s)
            result["routes"].append(route)
            result["tokens"] = tokens
            for codec, key in (("none", "prefill"), ("fp16", "prefill_fp16")):  # interleaved: same load
                model.compression = codec
                clock = TokenClock()
                split = StepSplit(json.loads(args.controls), prompt=True)
                _generate(model, long_prompt, 1, clock, result.setdefault(f"{key}_window_waits", []), split)
                result.setdefault(f"{key}_s", []).append(clock.first_token_s)
                result.setdefault(f"{key}_split", []).append(split.result(clock.first_token_s))
            model.compression = "none"
            clock, called = TokenClock(), time.perf_counter()
            _generate(model, prompt, 2, clock)  # a fresh session: opening the chain counts
            result["ttft_s"].append(clock.stamps[1] - called)

        if args.relayed:
            natted, public = args.relayed
            result["relayed_s"], result["direct_s"], result["relayed_routes"] = [], [], []
            for _ in range(args.repeats):
                for label, use, avoid in (("relayed", natted, public), ("direct", public, natted)):
                    model.swarm.unban(use)
                    model.swarm.ban(avoid)
                    clock = TokenClock()
                    tokens, route = _generate(model, prompt, args.new_tokens, clock)
                    result[f"{label}_s"].append(clock.per_token_s)
                    result["relayed_routes"].append([label, route])
                    result.setdefault("relayed_tokens_match", True)
                    result["relayed_tokens_match"] &= tokens == result["tokens"]
            model.swarm.unban(public)
            model.swarm.ban(natted)

        print("PARTIAL " + json.dumps(result), flush=True)  # what is measured so far, should a phase fail
        if args.sessions:
            single, aggregate = [], []
            prompts = [torch.roll(prompt, i, dims=1) for i in range(args.sessions)]  # distinct, same tokens
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model.generate(prompt, **greedy_options(args.new_tokens))
                single.append(args.new_tokens / (time.perf_counter() - t0))
                aggregate.append(_concurrent_tokens_per_s(model, prompts, args.new_tokens))
            result["single_tokens_per_s"], result["aggregate_tokens_per_s"] = single, aggregate
            print("PARTIAL " + json.dumps(result), flush=True)

        if args.kill_after:
            with model.inference_session(max_length=prompt.shape[1] + args.new_tokens) as session:
                killed: list[str] = []

                def kill_middle() -> None:
                    hop = session.route[len(session.route) // 2]
                    killed.append(hop.server.peer_id)
                    logging.getLogger("wan_client").warning("SIGKILL to %s", hop.server.name)
                    os.kill(pids[hop.server.peer_id], signal.SIGKILL)

                clock = KillingClock(args.kill_after, kill_middle)
                out = model.generate(prompt, session=session, streamer=clock, **greedy_options(args.new_tokens))
                gaps = clock.gaps_s
                at = args.kill_after  # gaps[at - 1] is the step right after the kill
                result["recovery"] = {
                    "killed": killed, "route_after": _route(session), "recoveries": session.recoveries,
                    "gap_after_kill_s": gaps[at - 1], "median_gap_s": median(gaps),
                    "tokens_match": out[0].tolist() == result["tokens"],
                }
        model.runtime.call(model.swarm.refresh)  # the daemons' records as they are now
        names = {s.peer_id: s.name for s in model.swarm.servers()}
        result["next_legs_s"] = {s.name: {names.get(peer, peer[-8:]): rtt for peer, rtt in s.next_rtts}
                                 for s in model.swarm.servers()}
    result["decode_median_s"] = median(result["decode_s"])
    result["prefill_median_s"] = median(result["prefill_s"])
    result["prefill_fp16_median_s"] = median(result["prefill_fp16_s"])
    result["ttft_median_s"] = median(result["ttft_s"])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
