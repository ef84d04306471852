"""Our swarm and Petals' on the same emulated WAN, in one run, against the same physical bound.

    sudo .venv/bin/python -m benchmarks.wan_petals --petals-python /tmp/petals-venv/bin/python \\
        --model-size 6.8m --json wan-petals.json

Petals is the reference we compare with, never a dependency: `--petals-python` is an interpreter
of its own virtual environment (BENCHMARKS.md says how to build one). One lab (benchmarks/wan.py's:
tests/system/wanlab.py's namespaces joined by the link emulator), hosts `client` and d0.. (one per
span, no spare, no NAT), the same links for both systems. In turn on those hosts:

1. our daemons (one torch thread each) and our client (benchmarks/wan_client.py, one session,
   no SIGKILL);
2. Petals' servers (`petals.cli.run_server`, fp32, one torch thread each through
   OMP_NUM_THREADS) and Petals' client (benchmarks/wan_petals_client.py).

The local model runs in this process with one thread, before and after. Printed for each system:
decode per token and prefill of `--prefill-tokens` against the same bound as benchmarks/wan.py's
(compute measured locally + the one-way delays of push forwarding's daemons + 1 legs + the
activations over each leg), time to first token, and whether the tokens equal local generation.
Petals' client drives every hop (a request to each server and its reply per step), so its own
floor has 2 x daemons legs; that floor is printed beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from petals_client.localswarm import DaemonProcess, LocalSwarm

from .measure import machine_info, median, print_and_save
from .shapes import SHAPES, ensure_model, split_blocks
from .swarm_vs_local import random_prompt
from .wan import bound, local_reference, probe_one_way
from .wan import parse_args as wan_parse_args
from .wan import LinkConfig, ensure_tools, wan_lab  # the lab, as benchmarks/wan.py imports it

REPO = Path(__file__).resolve().parent.parent
PETALS_PORT = 31330
DHT_PREFIX = "wanbench"  # Petals names blocks after a hub repository; a local folder needs a prefix given
MADDR_RE = re.compile(r"Running a server on \['(/ip4/[^']+/p2p/[^']+)'")
# Every host of the lab is public, but Petals' start-up reachability check (other servers dial a
# temporary node back, within seconds) fails across the emulated WAN, and the server then runs
# behind a relay; its CLI has no flag for this, so the server is started with the check's answer.
SERVE_DIRECTLY = ("import runpy, sys; import petals.server.server as s; "
                  "s.check_direct_reachability = lambda **kwargs: True; "
                  "sys.argv[0] = 'run_server'; runpy.run_module('petals.cli.run_server', run_name='__main__')")
MISSING_PETALS = """wan_petals: {python} cannot import Petals ({why}).
Build a virtual environment for it (Petals 2.2.0.post1; its pinned hivemind needs Go to build):
    python3.11 -m venv /tmp/petals-venv && P=/tmp/petals-venv/bin/pip
    $P install --no-deps petals==2.2.0.post1
    $P install torch transformers==4.34.1 'huggingface-hub<1' peft==0.5.0 'accelerate<0.30' \\
        tensor_parallel==1.0.23 bitsandbytes==0.41.1 speedtest-cli dijkstar cpufeature sentencepiece async-timeout humanfriendly \\
        'pydantic>=1.10,<2' hivemind==1.1.11
    # hivemind 1.1.11's wheel ships a macOS p2pd: take the Linux one from 1.1.12's wheel
    pip download --no-deps hivemind==1.1.12 && unzip -o hivemind-1.1.12-*.whl hivemind/hivemind_cli/p2pd
    cp hivemind/hivemind_cli/p2pd /tmp/petals-venv/lib/python3.11/site-packages/hivemind/hivemind_cli/p2pd
then pass --petals-python /tmp/petals-venv/bin/python."""


def check_petals(python: str) -> str:
    """Petals' version in `python`, or exit saying how to build an environment that has it."""
    probe = ("import petals, hivemind, subprocess, os; "
             "p2pd = os.path.join(os.path.dirname(hivemind.__file__), 'hivemind_cli', 'p2pd'); "
             "subprocess.run([p2pd, '-h'], capture_output=True, check=False, timeout=10); print(petals.__version__)")
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise SystemExit(MISSING_PETALS.format(python=python, why=exc)) from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise SystemExit(MISSING_PETALS.format(python=python, why=why))
    return done.stdout.strip()


def run_client(lab: Any, python: str, module: str, args: list[str], what: str) -> dict[str, Any]:
    """Run a benchmark client in the lab's client namespace and return its `RESULT` line."""
    done = subprocess.run([*lab.prefix("client"), python, "-m", module, *args], capture_output=True, text=True,
                          timeout=3600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{what} client failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), "log_tail": done.stderr[-2000:]}


def run_ours(lab: Any, model: Path, folder: Path, spans: list[tuple[int, int]], client_args: list[str]) -> dict[str, Any]:
    swarms: list[LocalSwarm] = []
    first: DaemonProcess | None = None
    try:
        for i, (start, end) in enumerate(spans):
            host = f"d{i}"
            swarms.append(LocalSwarm(model, workdir=folder, python=lab.python(host, folder),
                                     extra_args=["--num-threads", "1", "--log-level", "info", "--throughput", "100"]))
            daemon = swarms[-1].start(f"{start}:{end}", name=host, initial_peers=first.addrs if first else [],
                                      args=["--listen", f"/ip4/{lab.ip(host)}/tcp/0", "--reachability", "public"])
            first = first or daemon
        assert first is not None
        return run_client(lab, sys.executable, "benchmarks.wan_client",
                          ["--peer", first.addrs[0], "--sessions", "1", "--kill-after", "0", *client_args], "our")
    finally:
        for s in swarms:
            s.stop()


def start_petals_server(lab: Any, python: str, model: Path, folder: Path, host: str, span: tuple[int, int],
                        initial_peer: str | None) -> tuple[subprocess.Popen[bytes], Path]:
    log = folder / f"petals-{host}.log"
    maddr = f"/ip4/{lab.ip(host)}/tcp/{PETALS_PORT}"
    cmd = [*lab.prefix(host), python, "-c", SERVE_DIRECTLY, str(model), "--block_indices",
           f"{span[0]}:{span[1]}", "--torch_dtype", "float32", "--device", "cpu", "--throughput", "100",
           "--public_name", host, "--dht_prefix", DHT_PREFIX, "--host_maddrs", maddr, "--announce_maddrs", maddr,
           *(["--initial_peers", initial_peer] if initial_peer else ["--new_swarm"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        # its own process group: a Petals server forks handler processes that outlive a signal to it alone
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                start_new_session=True), log


def server_maddr(server: subprocess.Popen[bytes], log: Path, timeout: float = 300.0) -> str:
    """A Petals server's full multiaddress, from its log (`Running a server on [...]`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = MADDR_RE.search(log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if server.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"A Petals server did not start:\n{log.read_text(errors='replace')[-4000:]}")


def run_petals(lab: Any, python: str, model: Path, folder: Path, spans: list[tuple[int, int]],
               client_args: list[str]) -> dict[str, Any]:
    servers: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        servers.append(start_petals_server(lab, python, model, folder, "d0", spans[0], None))
        first = server_maddr(*servers[0])
        for i, span in enumerate(spans[1:], start=1):
            servers.append(start_petals_server(lab, python, model, folder, f"d{i}", span, first))
        # every server as an initial peer: given only the first, the client's p2pd found no address
        # for the others in the lab ("routing: not found") and retried for minutes
        peers = [first, *(server_maddr(*server) for server in servers[1:])]
        try:
            result = run_client(lab, python, "benchmarks.wan_petals_client",
                                ["--peers", *peers, "--dht-prefix", DHT_PREFIX, *client_args], "Petals'")
        except RuntimeError as exc:
            logs = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for _, log in servers)
            raise RuntimeError(f"{exc}\n{logs}") from None
        result["servers_direct"] = ["accessible directly" in log.read_text(errors="replace") for _, log in servers]
        return result
    finally:
        for server, _ in servers:
            stop_group(server)


def stop_group(server: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGINT to the server's process group (Petals shuts down on it), then SIGKILL to whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # forked handlers and p2pd may outlive the main process
    server.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    problem = ensure_tools()
    if problem:
        raise SystemExit(f"wan_petals: {problem}")
    petals_version = check_petals(args.petals_python)
    torch.set_num_threads(1)
    shape = SHAPES[args.model_size]
    path = ensure_model(shape, args.cache_dir)
    spans = split_blocks(shape.num_layers, args.daemons)
    prompt = random_prompt(shape, args.prompt_tokens, seed=1)
    long_prompt = random_prompt(shape, args.prefill_tokens, seed=2)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    local_reference(local, prompt, prompt, 2, 1)  # warm-up
    machine = machine_info(1, 1)
    decode_l, prefill_l, local_tokens = local_reference(local, prompt, long_prompt, args.new_tokens, args.repeats)
    client_args = ["--model", str(path), "--prompt", json.dumps(prompt[0].tolist()),
                   "--long-prompt", json.dumps(long_prompt[0].tolist()), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats)]
    link = LinkConfig(delay=args.delay, jitter=args.jitter, loss=args.loss, rate=args.rate, mtu=args.mtu)
    hosts = ["client", *(f"d{i}" for i in range(args.daemons))]
    with wan_lab(f"wp{os.getpid() % 10000}", hosts, link=link) as lab:
        one_way = probe_one_way(lab, "client", "d0")
        folder = Path(lab._folder.name)  # type: ignore[union-attr]
        load = {"start": os.getloadavg()[0]}
        ours = run_ours(lab, path, folder, spans, client_args) if "ours" in args.systems else None
        load["between"] = os.getloadavg()[0]
        petals, petals_error = None, None
        try:  # our figures stand even if Petals fails in the lab
            petals = run_petals(lab, args.petals_python, path, folder, spans, client_args) if "petals" in args.systems else None
        except RuntimeError as exc:
            petals_error = str(exc)
        load["end"] = os.getloadavg()[0]
    more_decode, more_prefill, _ = local_reference(local, prompt, long_prompt, args.new_tokens, args.repeats)
    decode_l += more_decode
    prefill_l += more_prefill

    activation = shape.hidden_size * 4  # fp32 activations: bytes per token on each leg
    legs = {"ours": args.daemons + 1, "petals": 2 * args.daemons}  # push forwarding / client-driven hops

    def figures(name: str, measured: dict[str, Any]) -> dict[str, Any]:
        decode = bound(median(decode_l), legs["ours"], args.delay, activation, args.rate)
        prefill = bound(median(prefill_l), legs["ours"], args.delay, activation * args.prefill_tokens, args.rate)
        own = bound(median(decode_l), legs[name], args.delay, activation, args.rate)
        return {"decode_median_s": measured["decode_median_s"], "decode_bound": decode,
                "decode_ratio": measured["decode_median_s"] / decode["total_s"],
                "own_floor": own, "own_floor_ratio": measured["decode_median_s"] / own["total_s"],
                "prefill_median_s": measured["prefill_median_s"], "prefill_bound": prefill,
                "prefill_ratio": measured["prefill_median_s"] / prefill["total_s"],
                "ttft_median_s": measured["ttft_median_s"], "tokens_match": measured["tokens"] == local_tokens,
                "raw": measured}

    return {
        "benchmark": "wan_petals", "schema": 1, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, "-m", "benchmarks.wan_petals", *sys.argv[1:]],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "petals_version": petals_version, "spans": [f"{a}:{b}" for a, b in spans],
        "machine": {**machine, "load_average_1m": load},
        "link": {"configured_one_way_s": args.delay, "probe_median_s": median(one_way), "emulator": lab.stats},
        "local": {"decode_s": decode_l, "prefill_s": prefill_l},
        **{name: figures(name, measured) for name, measured in (("ours", ours), ("petals", petals)) if measured},
        **({"petals_error": petals_error} if petals_error else {}),
    }


def format_report(r: dict[str, Any]) -> str:
    ms, cfg, load = 1e3, r["config"], r["machine"]["load_average_1m"]
    bounds = r.get("ours") or r["petals"]

    def parts(b: dict[str, float]) -> str:
        return (f"{b['total_s'] * ms:.1f} ms = compute {b['compute_s'] * ms:.1f} + delays {b['delays_s'] * ms:.1f}"
                f" + transfer {b['transfer_s'] * ms:.1f}")

    lines = [
        f"model {cfg['model_size']}, {cfg['daemons']} daemons/servers {' '.join(r['spans'])}, Petals {r['petals_version']}, "
        f"{cfg['new_tokens']} new tokens after {cfg['prompt_tokens']}, prefill {cfg['prefill_tokens']}, repeats {cfg['repeats']}",
        f"link: {cfg['delay'] * ms:.0f} ms one way +- {cfg['jitter'] * ms:.1f}, loss {cfg['loss']:.2%}, uplink "
        f"{cfg['rate'] / 1e6:.0f} Mbit/s; probes median {r['link']['probe_median_s'] * ms:.2f} ms",
        f"load average (1 min): {load['start']:.2f} at start, {load['between']:.2f} between, {load['end']:.2f} at end",
        f"decode bound {parts(bounds['decode_bound'])}; prefill bound {parts(bounds['prefill_bound'])}",
    ]
    for name, label in (("ours", "petalsd"), ("petals", "Petals ")):
        if name not in r:
            continue
        f = r[name]
        lines += [
            f"{label} decode {f['decode_median_s'] * ms:7.1f} ms/token = {f['decode_ratio']:.2f}x the bound "
            f"({f['own_floor_ratio']:.2f}x its own floor {f['own_floor']['total_s'] * ms:.1f} ms with "
            f"{f['own_floor']['delays_s'] * ms:.0f} ms of delays); prefill {f['prefill_median_s'] * ms:.0f} ms = "
            f"{f['prefill_ratio']:.2f}x; time to first token {f['ttft_median_s'] * ms:.0f} ms; tokens match local: "
            f"{f['tokens_match']}",
        ]
    if "petals_error" in r:
        lines.append(f"Petals failed: {r['petals_error'][:3000]}")
    if "ours" in r and "petals" in r:
        lines.append(f"Petals / petalsd: decode {r['petals']['decode_median_s'] / r['ours']['decode_median_s']:.2f}x, "
                 f"prefill {r['petals']['prefill_median_s'] / r['ours']['prefill_median_s']:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.wan_petals", description=__doc__.split("\n\n")[0],
        epilog="The lab's and the model's options are benchmarks.wan's: --model-size, --daemons, --repeats, "
               "--new-tokens, --prompt-tokens, --prefill-tokens, --delay, --jitter, --loss, --rate, --mtu, "
               "--cache-dir, --json (its NAT, spare, sessions and SIGKILL options do not apply here).")
    p.add_argument("--petals-python", required=True, help="a Python whose environment has Petals (see BENCHMARKS.md)")
    p.add_argument("--systems", nargs="+", choices=["ours", "petals"], default=["ours", "petals"],
                   help="which swarms to run (both by default; one alone to check a setup)")
    own, rest = p.parse_known_args(argv)
    return argparse.Namespace(**vars(wan_parse_args(rest)), **vars(own))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_and_save(format_report(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
