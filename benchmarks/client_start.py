"""Client start-to-first-token, and the bytes the client reads, on a benchmark model.

    .venv/bin/python -m benchmarks.client_start --model-size 271m --repeats 3 [--json out.json]

Starts one daemon serving every block, then runs each client in a fresh process (so nothing is
kept in memory between runs; the page cache stays warm, as on a machine that already has the
files) and times `from_pretrained` + `generate(max_new_tokens=1)` up to the first token, in wall
time and in the client's CPU time (which other load on the machine disturbs less). Cases:
- `local`: `--model FOLDER` (the benchmark checkpoint, one safetensors file);
- `hub`: `--model ORG/NAME` from a Hugging Face cache (HF_HOME in a temp dir, offline) holding a
  sharded copy's json files and only the client's shards (embeddings; final norm and head), as a
  client of a real swarm would have fetched them.
Each case runs with a cold digest cache first, then warm. `read` is the client's `rchar` from
/proc (bytes it read with read calls: hashing and json), `loaded` the bytes of the tensors it
loaded (memory-mapped), `held` the bytes of the safetensors files the client needed on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .shapes import SHAPES, default_cache_dir, ensure_model

REPO_ID = "petals-bench/model"
COMMIT = "0" * 40


def _child(model: str, peers: list[str]) -> None:
    """One client start, in this fresh process: prints a JSON line with the figures."""
    import torch

    from petals_client import AutoDistributedModelForCausalLM

    def rchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        return 0

    class First:
        def __init__(self) -> None:
            self.at: float | None = None
            self.prompt = True

        def put(self, value: torch.Tensor) -> None:
            if self.prompt:
                self.prompt = False
            elif self.at is None:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    before = rchar()
    cpu = time.process_time()
    begin = time.perf_counter()
    with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=peers) as lm:
        loaded_at = time.perf_counter()
        first = First()
        lm.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=1, streamer=first)
        loaded = sum(p.numel() * p.element_size() for p in lm.client_part.parameters())
    assert first.at is not None
    print(json.dumps({"first_token_s": first.at - begin, "cpu_s": time.process_time() - cpu, "from_pretrained_s": loaded_at - begin,
                      "read_bytes": rchar() - before, "loaded_bytes": loaded}))


def _shard_copy(folder: Path, out: Path) -> Path:
    """A sharded copy of a one-file checkpoint: one shard per block, one for the embeddings, one
    for the final norm and head (the layout a Hub repository of a large model has, in small)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name in f.keys():
            if name.startswith("model.layers."):
                key = f"block-{int(name.split('.')[2]):03d}"
            elif name.startswith("model.embed_tokens."):
                key = "embed"
            else:
                key = "head"
            groups.setdefault(key, []).append(name)
        weight_map = {}
        for key, names in sorted(groups.items()):
            file = f"model-{key}.safetensors"
            save_file({n: f.get_tensor(n) for n in names}, out / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
    for name in ("config.json", "generation_config.json"):
        if (folder / name).exists():
            (out / name).write_bytes((folder / name).read_bytes())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _hub_cache(sharded: Path, home: Path, files: set[str]) -> None:
    """An offline Hugging Face cache of `sharded` holding the json files and `files`."""
    from petals_protocol.models.synthetic import write_hub_cache  # here: the `local` case runs on older trees too

    small = [n for n in ("config.json", "generation_config.json", "model.safetensors.index.json")
             if (sharded / n).exists()]
    write_hub_cache(home, REPO_ID, sharded, [*small, *sorted(files)], commit=COMMIT)


def _run_client(model: str, peers: list[str], env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.client_start", "--child", model, *peers],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"client failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="271m", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="local,hub", help="comma-separated: local, hub")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1:])
        return

    from petals_client.localswarm import LocalSwarm

    shape = SHAPES[args.model_size]
    folder = ensure_model(shape, args.cache_dir)
    results: dict[str, object] = {"model": shape.name, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="client-start-") as tmp:
        for case in args.cases.split(","):
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            model, daemon_env = str(folder), None
            held = (folder / "model.safetensors").stat().st_size
            if case == "hub":  # the daemon serves the Hub model too (its cache: the block shards)
                from petals_protocol.models.checkpoint import Checkpoint

                sharded = _shard_copy(folder, args.cache_dir / f"{shape.key()}-sharded")
                checkpoint = Checkpoint(sharded)
                mine = checkpoint.shards_of(n for n in checkpoint.tensor_names() if not n.startswith("model.layers."))
                _hub_cache(sharded, Path(tmp) / "hf-daemon", set(checkpoint.shard_names()) - mine)
                _hub_cache(sharded, Path(tmp) / "hf", mine)
                held = sum((sharded / f).stat().st_size for f in mine)
                daemon_env = {"HF_HOME": str(Path(tmp) / "hf-daemon"), "HF_HUB_OFFLINE": "1"}
                env.update(HF_HOME=str(Path(tmp) / "hf"), HF_HUB_OFFLINE="1")
                model = REPO_ID
            runs = []
            with LocalSwarm(model, extra_args=["--num-threads", "1", "--log-level", "info"]) as swarm:
                swarm.start(f"0:{shape.num_layers}", env=daemon_env)
                for i in range(args.repeats):
                    env["XDG_CACHE_HOME"] = str(Path(tmp) / f"digests-{case}")  # cold on the first run
                    run = _run_client(model, swarm.addrs, env)
                    run["digest_cache"] = "cold" if i == 0 else "warm"
                    runs.append(run)
                    print(f"{case:5s} run {i} ({run['digest_cache']}): first token {run['first_token_s']:.2f} s "
                          f"(client CPU {run['cpu_s']:.2f} s) "
                          f"(from_pretrained {run['from_pretrained_s']:.2f} s), read {run['read_bytes'] / 2**20:.1f} "
                          f"MiB, loaded {run['loaded_bytes'] / 2**20:.1f} MiB, held {held / 2**20:.1f} MiB", flush=True)
            results["cases"][case] = {"runs": runs, "held_bytes": held}  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
