"""The swarm on an emulated WAN against the physical bound: daemons and client in network namespaces.

    sudo .venv/bin/python -m benchmarks.wan --model-size 271m --daemons 3 --json wan.json

One run (as root) builds the WAN lab (tests/system/wanlab.py: one namespace per host, joined by
the user-space link emulator tests/system/linkemu.py, since this kernel has no netem), checks the
emulator against its configured one-way delay with probe packets, then starts:

- `--daemons` public daemons d0.. that split the blocks evenly, each on its own host;
- `spare`, a second daemon for the middle span (so the SIGKILL below can be recovered from);
- with `--nat` (the default), `home`, a daemon for the last span behind a masquerading router,
  reachable only through a relay (the public daemons are relays);

and the client (benchmarks/wan_client.py) on its own host. Every host pair is one emulated link
(`--delay` one way, `--jitter`, `--loss`, and each host's uplink `--rate`); every host's TCP runs
the machine's congestion control unless `--congestion-control` names another (a network namespace
may only pick one of net.ipv4.tcp_allowed_congestion_control). The local model runs
in this process with one torch thread, as each daemon does, before and after the swarm's run.

It prints, each against its bound where there is one:
- per-token time vs compute (local per-token time) + the one-way delays along the chain
  (client -> d0 -> ... -> last -> client: daemons + 1 legs, push forwarding) + the activations'
  bytes over each leg / rate; the same bound with the compute of the local model idle for the
  chain's delays before each token (`IdleClock`: as every machine of the chain is); the decode
  steps' spread; and where a token's time went: the client's own work, each daemon's part of the
  critical path (its step-time counters, petalsd/step_times.py, read over its control socket) and
  the network (benchmarks/wan_client.py, `StepSplit`); each exact prefill split the same way;
  and the same decode steps split on the wire, from the emulator's packet trace
  (benchmarks/packet_split.py): each leg's time in the emulator and each host's dwell between the
  packet it got and the packet it sent on, which takes the network's lump apart into the link and
  our message path;
- prefill of `--prefill-tokens` vs local prefill + the same delays + that prompt's bytes per leg,
  and the same with fp16-compressed activations (`compression="fp16"`: half the bytes per leg);
- time to first token of a fresh session (opening the chain included);
- the relayed daemon's extra per-token cost (the chain through `home` vs through the public d-last);
- tokens/s of `--sessions` concurrent users vs one;
- the stall after SIGKILL of the middle daemon (the gap at the kill less the median gap);
- the round trips each daemon measured to the next span's daemons (routing's daemon-to-daemon
  legs, from their records) against the configured two delays.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from petals_client.localswarm import DaemonProcess, LocalSwarm
from petalsd.step_times import PHASES

from . import packet_split
from .measure import TokenClock, machine_info, median, percentile, print_and_save
from .shapes import SHAPES, default_cache_dir, ensure_model, split_blocks
from .swarm_vs_local import greedy_options, random_prompt

SYSTEM_TESTS = Path(__file__).resolve().parent.parent / "tests" / "system"
sys.path.insert(0, str(SYSTEM_TESTS))  # the namespace lab lives beside the system tests that use it
from natlab import LabError, ensure_tools  # noqa: E402
from wanlab import LinkConfig, WanLab, wan_lab  # noqa: E402

PROBE = SYSTEM_TESTS / "udp_probe.py"


def probe_one_way(lab: WanLab, src: str, dst: str, count: int = 200) -> list[float]:
    """One-way delays of UDP probes from `src` to `dst` (the namespaces share one monotonic clock)."""
    receiver = subprocess.Popen([*lab.prefix(dst), sys.executable, str(PROBE), "recv", "9000", str(count), "5"],
                                stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
    subprocess.run([*lab.prefix(src), sys.executable, str(PROBE), "send", lab.ip(dst), "9000", str(count),
                    "0.005", "200"], check=True, timeout=60)
    out, _ = receiver.communicate(timeout=30)
    return [d for _, d in json.loads(out)]


@dataclass
class IdleClock(TokenClock):
    """A TokenClock that idles `idle_s` after each token, as every machine of a chain does while a
    token crosses the network: its per-token time less the idle is the compute of a machine that
    waits between tokens (caches, TLBs and branch predictors gone cold; on this VM a span's decode
    step is slower after 100 ms asleep than back to back: BENCHMARKS.md)."""

    idle_s: float = 0.0

    def put(self, value: torch.Tensor) -> None:
        super().put(value)
        time.sleep(self.idle_s)

    @property
    def per_token_s(self) -> float:
        return super().per_token_s - self.idle_s


def machine_congestion_control() -> str:
    """The TCP congestion control new network namespaces start with (the lab's hosts, by default)."""
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def timed_decode(model: Any, prompt: torch.Tensor, new_tokens: int, clock: TokenClock) -> list[int]:
    """One greedy generation of `new_tokens` timed by `clock`; its tokens."""
    return model.generate(prompt, streamer=clock, **greedy_options(new_tokens))[0].tolist()


def local_idle_decode(model: Any, prompt: torch.Tensor, new_tokens: int, repeats: int, idle_s: float) -> list[float]:
    """The local model's per-token compute with `idle_s` of idleness before each token."""
    clocks = [IdleClock(idle_s=idle_s) for _ in range(repeats)]
    for clock in clocks:
        timed_decode(model, prompt, new_tokens, clock)
    return [clock.per_token_s for clock in clocks]


def local_reference(model: Any, prompt: torch.Tensor, long_prompt: torch.Tensor, new_tokens: int,
                    repeats: int) -> tuple[list[float], list[float], list[int]]:
    decode, prefill, tokens = [], [], []
    for _ in range(repeats):
        clock = TokenClock()
        tokens = timed_decode(model, prompt, new_tokens, clock)
        decode.append(clock.per_token_s)
        clock = TokenClock()
        timed_decode(model, long_prompt, 2, clock)
        prefill.append(clock.first_token_s)
    return decode, prefill, tokens


def start_daemons(lab: WanLab, model: Path, folder: Path, spans: list[tuple[int, int]], nat: bool,
                  daemon_args: list[str], swarms: list[LocalSwarm]) -> dict[str, DaemonProcess]:
    """Each daemon on its own host, in one LocalSwarm per host (its python runs in that namespace);
    `swarms` collects them as they start, for the caller to stop however this ends."""
    daemons: dict[str, DaemonProcess] = {}
    plan = [(f"d{i}", span) for i, span in enumerate(spans)] + [("spare", spans[len(spans) // 2])]
    plan += [("home", spans[-1])] if nat else []
    for host, (start, end) in plan:
        swarm = LocalSwarm(model, workdir=folder, python=lab.python(host, folder), extra_args=daemon_args)
        swarms.append(swarm)
        where = ["--listen", f"/ip4/{lab.ip(host)}/tcp/0"]
        where += ["--announce-period", "2"] if host == "home" else ["--reachability", "public"]
        first = daemons.get("d0")
        daemons[host] = swarm.start(f"{start}:{end}", name=host, initial_peers=first.addrs if first else [],
                                    args=where)
    return daemons


def bound(local_s: float, legs: int, delay: float, bytes_per_leg: int, rate: float) -> dict[str, float]:
    return {"compute_s": local_s, "delays_s": legs * delay, "transfer_s": legs * bytes_per_leg * 8 / rate,
            "total_s": local_s + legs * delay + legs * bytes_per_leg * 8 / rate}


def gap_summary(gaps: list[float], decode_bound: dict[str, float]) -> dict[str, float]:
    """How the decode steps spread: a step that waited for a TCP retransmission (a lost packet is
    resent after a timeout of at least 200 ms on Linux) shows as a gap far above the median; the
    per-token figure is the mean, so a few such steps move it."""
    slow = [g for g in gaps if g > decode_bound["total_s"] + 0.1]
    return {"steps": len(gaps), "median_s": median(gaps), "p90_s": percentile(gaps, 0.9),
            "max_s": max(gaps, default=float("nan")), "over_bound_plus_100ms": len(slow),
            "mean_without_those_s": statistics.fmean([g for g in gaps if g not in slow]) if len(slow) < len(gaps) else float("nan")}


def split_summary(splits: list[dict[str, Any]], legs: int) -> dict[str, Any]:
    """The decode generations' split of a token (wan_client.StepSplit), averaged over them."""
    if not splits:
        return {}
    names = sorted({name for s in splits for name in s["daemons"]})
    daemons = {name: {phase: statistics.fmean(s["daemons"][name][phase] for s in splits if name in s["daemons"])
                      for phase in PHASES} for name in names}
    network = statistics.fmean(s["network_s"] for s in splits)
    return {"generations": len(splits), "per_token_s": statistics.fmean(s["per_token_s"] for s in splits),
            "client_s": statistics.fmean(s["client_s"] for s in splits), "daemons": daemons,
            "network_s": network, "per_leg_s": network / legs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    problem = ensure_tools()
    if problem:
        raise SystemExit(f"wan: {problem}")
    torch.set_num_threads(1)
    shape = SHAPES[args.model_size]
    path = ensure_model(shape, args.cache_dir)
    spans = split_blocks(shape.num_layers, args.daemons)
    prompt = random_prompt(shape, args.prompt_tokens, seed=1)
    long_prompt = random_prompt(shape, args.prefill_tokens, seed=2)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    local_reference(local, prompt, prompt, 2, 1)  # warm-up
    machine = machine_info(1, args.daemon_threads)
    link = LinkConfig(delay=args.delay, jitter=args.jitter, loss=args.loss, rate=args.rate, mtu=args.mtu)
    hosts = ["client", *(f"d{i}" for i in range(args.daemons)), "spare"]
    daemon_args = ["--num-threads", str(args.daemon_threads), "--log-level", "info", "--throughput", "100"]
    decode_l, prefill_l, local_tokens = local_reference(local, prompt, long_prompt, args.new_tokens, args.repeats)
    with wan_lab(f"wb{os.getpid() % 10000}", hosts, natted=["home"] if args.nat else [], link=link,
                 trace_packets=True, congestion_control=args.congestion_control) as lab:
        one_way = probe_one_way(lab, "client", "d0")
        folder = Path(lab._folder.name)  # type: ignore[union-attr]
        swarms: list[LocalSwarm] = []
        try:
            daemons = start_daemons(lab, path, folder, spans, args.nat, daemon_args, swarms)
            cmd = [*lab.prefix("client"), sys.executable, "-m", "benchmarks.wan_client", "--model", str(path),
                   "--peer", daemons["d0"].addrs[0], "--prompt", json.dumps(prompt[0].tolist()),
                   "--long-prompt", json.dumps(long_prompt[0].tolist()), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--sessions", str(args.sessions),
                   "--pids", json.dumps({d.peer_id: d.pid for d in daemons.values()}),
                   "--controls", json.dumps({name: str(folder / f"{name}.sock") for name in daemons}),
                   "--kill-after", str(args.new_tokens // 2 if args.kill else 0),
                   "--replay-window", str(args.replay_window)]
            if args.nat:
                cmd += ["--relayed", daemons["home"].peer_id, daemons[f"d{args.daemons - 1}"].peer_id]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                                  cwd=Path(__file__).resolve().parent.parent)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                partial = [line for line in done.stdout.splitlines() if line.startswith("PARTIAL ")]
                logs = "\n".join(f"--- {name}\n" + "\n".join(list(d.log)[-60:]) for name, d in daemons.items())
                raise SystemExit(f"wan: client failed ({done.returncode}):\n{done.stderr[-6000:]}\n"
                                 f"measured before the failure: {partial[-1] if partial else 'nothing'}\n{logs}")
            swarm = json.loads(lines[-1].removeprefix("RESULT "))
        finally:
            for s in swarms:
                s.stop()
    more_decode, more_prefill, _ = local_reference(local, prompt, long_prompt, args.new_tokens, args.repeats)
    decode_l += more_decode
    prefill_l += more_prefill
    # A natted host's packets cross the WAN with its router's address: named for the router ("homer")
    wire = packet_split.split(lab.packets, {lab.ip(h): h for h in lab.wan_hosts()}, "client",
                              [s["windows"] for s in swarm.get("split", [])], min_bytes=shape.hidden_size * 4)
    lab.packets = []
    legs = args.daemons + 1
    idle_l = local_idle_decode(local, prompt, args.new_tokens, args.repeats, legs * args.delay)

    activation = shape.hidden_size * 4  # fp32 activations: bytes per token on each leg
    decode_bound = bound(median(decode_l), legs, args.delay, activation, args.rate)
    # The same bound with the compute of a machine idle between tokens, as each machine of a chain is
    idle_bound = bound(median(idle_l), legs, args.delay, activation, args.rate)
    prefill_bound = bound(median(prefill_l), legs, args.delay, activation * args.prefill_tokens, args.rate)
    # fp16 activations: half the bytes per leg (the compute is the same float32 compute)
    fp16_bound = bound(median(prefill_l), legs, args.delay, activation * args.prefill_tokens // 2, args.rate)
    result: dict[str, Any] = {
        "benchmark": "wan", "schema": 1, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, "-m", "benchmarks.wan", *sys.argv[1:]],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "spans": [f"{a}:{b}" for a, b in spans],
        "machine": {**machine, "load_average_1m_end": os.getloadavg()[0]},
        "link": {"configured_one_way_s": args.delay, "probe_median_s": statistics.median(one_way),
                 "probe_p90_s": percentile(one_way, 0.9), "probes": len(one_way),
                 "congestion_control": args.congestion_control or machine_congestion_control(),
                 "emulator": lab.stats},
        "local": {"decode_s": decode_l, "prefill_s": prefill_l, "decode_idle_between_tokens_s": idle_l},
        "decode": {"swarm_median_s": swarm["decode_median_s"], "bound": decode_bound,
                   "gaps": gap_summary([g for run in swarm.get("decode_gaps_s", []) for g in run], decode_bound),
                   "ratio_to_bound": swarm["decode_median_s"] / decode_bound["total_s"],
                   "tokens_match": swarm["tokens"] == local_tokens, "bound_idle_compute": idle_bound,
                   "ratio_to_bound_idle_compute": swarm["decode_median_s"] / idle_bound["total_s"]},
        "prefill": {"tokens": args.prefill_tokens, "swarm_median_s": swarm["prefill_median_s"],
                    "bound": prefill_bound, "ratio_to_bound": swarm["prefill_median_s"] / prefill_bound["total_s"],
                    "window_waits": swarm.get("prefill_window_waits")},
        "prefill_fp16": {"swarm_median_s": swarm["prefill_fp16_median_s"], "bound": fp16_bound,
                         "ratio_to_bound": swarm["prefill_fp16_median_s"] / fp16_bound["total_s"],
                         "window_waits": swarm.get("prefill_fp16_window_waits")},
        "decode_split": split_summary(swarm.get("split", []), legs),
        "decode_on_wire": asdict(wire) if wire else None,
        "ttft_median_s": swarm["ttft_median_s"],
        "swarm": swarm,
        "client_log_tail": done.stderr[-4000:],
    }
    if args.sessions:
        result["concurrency"] = {"sessions": args.sessions, "single_median": median(swarm["single_tokens_per_s"]),
                                 "aggregate_median": median(swarm["aggregate_tokens_per_s"])}
    if args.nat:
        result["relayed"] = {"relayed_median_s": median(swarm["relayed_s"]), "direct_median_s": median(swarm["direct_s"]),
                             "extra_s": median(swarm["relayed_s"]) - median(swarm["direct_s"]),
                             "tokens_match": swarm.get("relayed_tokens_match")}
    if swarm.get("next_legs_s"):  # a daemon gone by then (the SIGKILL) is named by its peer id's end
        named = {d.peer_id[-8:]: name for name, d in daemons.items()}
        result["next_legs_s"] = {a: {named.get(b, b): rtt for b, rtt in nexts.items()}
                                 for a, nexts in swarm["next_legs_s"].items()}
    rec = swarm.get("recovery")
    if rec:
        result["recovery"] = {**rec, "stall_s": rec["gap_after_kill_s"] - rec["median_gap_s"]}
    return result


def format_report(r: dict[str, Any]) -> str:
    ms = 1e3
    d, p, m = r["decode"], r["prefill"], r["machine"]

    def parts(b: dict[str, float]) -> str:
        return (f"bound {b['total_s'] * ms:.1f} ms = compute {b['compute_s'] * ms:.1f} + delays {b['delays_s'] * ms:.1f}"
                f" + transfer {b['transfer_s'] * ms:.1f}")

    cfg = r["config"]
    lines = [
        f"model {cfg['model_size']}, daemons {' '.join(r['spans'])} (+ spare for {r['spans'][len(r['spans']) // 2]}"
        f"{', + natted home for ' + r['spans'][-1] if cfg['nat'] else ''}), repeats {cfg['repeats']}",
        f"link: {cfg['delay'] * ms:.0f} ms one way +- {cfg['jitter'] * ms:.1f} ms, loss {cfg['loss']:.2%}, "
        f"uplink {cfg['rate'] / 1e6:.0f} Mbit/s, MTU {cfg['mtu']}, TCP {r['link']['congestion_control']}; probes: median {r['link']['probe_median_s'] * ms:.2f} ms, "
        f"p90 {r['link']['probe_p90_s'] * ms:.2f} ms; emulator: {r['link']['emulator']}",
        f"machine: {m['cpu_model']}, {m['cores']} cores, load {m['load_average_1m']:.2f} -> {m['load_average_1m_end']:.2f}",
        f"decode:  swarm {d['swarm_median_s'] * ms:.1f} ms/token, {parts(d['bound'])}: "
        f"{d['ratio_to_bound']:.3f}x the bound; tokens match local: {d['tokens_match']}",
        f"decode vs the bound with the compute of a local model idle {cfg['daemons'] + 1} x {cfg['delay'] * ms:.0f} ms "
        f"before each token (as every machine of the chain is): {parts(d['bound_idle_compute'])}: "
        f"{d['ratio_to_bound_idle_compute']:.3f}x",
        f"decode steps: {d['gaps']['steps']}, gap median {d['gaps']['median_s'] * ms:.1f} ms "
        f"({d['gaps']['median_s'] / d['bound']['total_s']:.3f}x the bound), p90 {d['gaps']['p90_s'] * ms:.1f}, max "
        f"{d['gaps']['max_s'] * ms:.1f}; {d['gaps']['over_bound_plus_100ms']} over the bound + 100 ms (a lost packet's "
        f"retransmission), mean without them {d['gaps']['mean_without_those_s'] * ms:.1f} ms",
        *split_lines(r),
        f"prefill: {p['tokens']} tokens swarm {p['swarm_median_s'] * ms:.0f} ms, {parts(p['bound'])}: "
        f"{p['ratio_to_bound']:.3f}x the bound; the client's writes waited for the yamux window "
        f"{p['window_waits']} times",
        f"prefill, fp16 activations (--compression fp16): {r['prefill_fp16']['swarm_median_s'] * ms:.0f} ms, "
        f"{parts(r['prefill_fp16']['bound'])}: {r['prefill_fp16']['ratio_to_bound']:.3f}x the bound",
        f"time to first token (fresh session, chain opened): {r['ttft_median_s'] * ms:.0f} ms",
    ]
    if "concurrency" in r:
        c = r["concurrency"]
        lines.append(f"concurrency: 1 session {c['single_median']:.2f} tok/s, {c['sessions']} sessions "
                     f"{c['aggregate_median']:.2f} tok/s aggregate ({c['aggregate_median'] / c['single_median']:.2f}x)")
    if "relayed" in r:
        rl = r["relayed"]
        lines.append(f"relayed daemon: {rl['relayed_median_s'] * ms:.1f} ms/token vs direct {rl['direct_median_s'] * ms:.1f}"
                     f" ms/token: {rl['extra_s'] * ms:+.1f} ms per token; tokens match: {rl['tokens_match']}")
    if "recovery" in r:
        rc = r["recovery"]
        lines.append(f"SIGKILL of the middle daemon: gap {rc['gap_after_kill_s'] * ms:.0f} ms vs median "
                     f"{rc['median_gap_s'] * ms:.0f} ms: stall {rc['stall_s'] * ms:.0f} ms, recoveries {rc['recoveries']}, "
                     f"tokens match: {rc['tokens_match']}")
    if r.get("next_legs_s"):
        legs = "; ".join(f"{a} -> {b} {rtt * ms:.1f}" for a, nexts in sorted(r["next_legs_s"].items())
                         for b, rtt in sorted(nexts.items()))
        lines.append(f"round trips the daemons measured to the next span's daemons (ms; {2 * cfg['delay'] * ms:.0f} "
                     f"configured): {legs}")
    return "\n".join(lines)


def _daemon_parts(daemons: dict[str, dict[str, float]]) -> tuple[float, str]:
    ms = 1e3
    on_path = sum(d["to_output"] + d["sent_on"] for d in daemons.values())
    return on_path, ", ".join(f"{name} {(d['to_output'] + d['sent_on']) * ms:.1f} ({d['to_output'] * ms:.1f} to its "
                              f"output + {d['sent_on'] * ms:.1f} sending it on)" for name, d in daemons.items())


def split_lines(r: dict[str, Any]) -> list[str]:
    ms, legs = 1e3, r["config"]["daemons"] + 1
    lines = []
    sp = r.get("decode_split")
    if sp:
        on_path, daemons = _daemon_parts(sp["daemons"])
        lines.append(
            f"decode, where a token's {sp['per_token_s'] * ms:.1f} ms went (mean of {sp['generations']} generations): "
            f"client {sp['client_s'] * ms:.1f} (head, sampling, embeddings, generate's loop; local compute of the whole "
            f"model {r['decode']['bound']['compute_s'] * ms:.1f}) + daemons {on_path * ms:.1f}: {daemons} + network "
            f"{sp['network_s'] * ms:.1f} over {legs} legs ({sp['per_leg_s'] * ms:.2f} per leg: delay, emulator, TCP, "
            f"Noise, yamux, framing; probes: {r['link']['probe_median_s'] * ms:.2f} one way)")
    w = r.get("decode_on_wire")
    if w:
        transfer = r["decode"]["bound"]["transfer_s"] / legs
        lines.append(
            f"decode on the wire (the emulator's packet trace, median of {w['steps']} steps along "
            f"{' -> '.join(w['chain'])}): legs {', '.join(f'{s * ms:.2f}' for s in w['legs_s'])} ms (configured "
            f"{r['config']['delay'] * ms:.0f} + transfer {transfer * ms:.2f} each); dwell "
            f"{', '.join(f'{h} {s * ms:.2f}' for h, s in w['dwell_s'].items())} ms (packet in to packet out); client "
            + (f"{w['client_s'] * ms:.2f} ms (result in to next step out)" if w["client_s"] is not None else "-")
            + f"; client out to result in {w['on_wire_s'] * ms:.1f} ms"
            + (f"; {w['others']} steps on other chains, {w['unmatched']} not followed" if w["others"] or w["unmatched"] else ""))
    for i, split in enumerate(r["swarm"].get("prefill_split", []), 1):
        on_path, daemons = _daemon_parts(split["daemons"])
        lines.append(f"prefill {i} (in order), {split['per_token_s'] * ms:.0f} ms: client {split['client_s'] * ms:.0f} + "
                     f"daemons {on_path * ms:.0f}: {daemons} + network {split['network_s'] * ms:.0f} over {legs} legs")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", choices=sorted(SHAPES), default="271m")
    p.add_argument("--daemons", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--sessions", type=int, default=8, help="concurrent users (0: skip that phase)")
    p.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                   help="SIGKILL the middle daemon mid-generation and measure the recovery")
    p.add_argument("--daemon-threads", type=int, default=1, help="torch threads per daemon (--num-threads)")
    p.add_argument("--delay", type=float, default=0.025, help="one-way delay between any two hosts, seconds")
    p.add_argument("--jitter", type=float, default=0.001, help="uniform +- around the delay, seconds")
    p.add_argument("--loss", type=float, default=0.001, help="probability a packet is dropped")
    p.add_argument("--rate", type=float, default=100e6, help="each host's uplink, bits/s")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--congestion-control", help="TCP congestion control of every host (default: the machine's, "
                                                 "net.ipv4.tcp_congestion_control; a namespace may only choose one "
                                                 "of net.ipv4.tcp_allowed_congestion_control)")
    p.add_argument("--nat", action=argparse.BooleanOptionalAction, default=True,
                   help="a daemon for the last span behind a NAT, served through a relay")
    p.add_argument("--replay-window", type=int, default=0,
                   help="the client's replayed steps in flight per hop after the SIGKILL (0: its default; 1: "
                        "one step per round trip, as before pipelined replay)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.new_tokens < 4 or args.daemons < 2:
        p.error("--new-tokens must be at least 4 and --daemons at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except LabError as exc:  # a lab that could not be built (a setting the kernel refused, a missing tool)
        raise SystemExit(f"wan: the lab could not be built: {exc}") from None
    print_and_save(format_report(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
