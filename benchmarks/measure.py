"""What the benchmark measures with: per-token clocks, process memory, span weight bytes, the machine.

Decode and prefill times come from a streamer's timestamps, not from timing whole `generate`
calls: `transformers` and our client both call `put(prompt)` when decoding starts and
`put(tokens)` after each step, so the same clock measures both sides, and session setup (opening
streams to the daemons) is kept out of the per-token figure.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


@dataclass
class TokenClock:
    """A `transformers` streamer that records when the prompt and each new token arrive."""

    stamps: list[float] = field(default_factory=list)

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def first_token_s(self) -> float:
        """Seconds from the start of decoding to the first new token: the prefill."""
        if len(self.stamps) < 2:
            raise ValueError("no token was produced")
        return self.stamps[1] - self.stamps[0]

    @property
    def gaps_s(self) -> list[float]:
        """Seconds between consecutive new tokens (decode steps; the prefill's token excluded)."""
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]

    @property
    def per_token_s(self) -> float:
        """Mean seconds per token after the first (decode steps only, prefill excluded)."""
        if len(self.stamps) < 3:
            raise ValueError("need at least two new tokens to time a decode step")
        return (self.stamps[-1] - self.stamps[1]) / (len(self.stamps) - 2)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0.9: the p90) of `values`; nan for none."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(frozen=True)
class ProcessMemory:
    rss_bytes: int
    peak_rss_bytes: int


def process_memory(pid: int) -> ProcessMemory:
    """VmRSS and VmHWM (peak RSS) of a live process, from /proc/PID/status."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(rest.split()[0]) * 1024  # reported in kB
    return ProcessMemory(rss_bytes=fields["VmRSS"], peak_rss_bytes=fields["VmHWM"])


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def span_weight_bytes(model: Path, start: int, end: int) -> int:
    """Bytes of the checkpoint tensors of blocks [start, end), read from the safetensors headers.

    Computed from the files, independently of the daemon, so the RSS comparison does not trust
    the figure the daemon reports about itself.
    """
    from safetensors import safe_open

    total = 0
    for file in sorted(model.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                match = BLOCK_RE.search(name)
                if match and start <= int(match.group(1)) < end:
                    sl = f.get_slice(name)
                    numel = 1
                    for dim in sl.get_shape():
                        numel *= dim
                    total += numel * _itemsize(sl.get_dtype())
    return total


def _itemsize(safetensors_dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    return sizes[safetensors_dtype]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(local_threads: int, daemon_threads: int) -> dict[str, object]:
    """The machine and software a figure was measured on (the JSON's `machine` field)."""
    import transformers

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "torch_threads_local_and_client": local_threads,
        "torch_threads_per_daemon": daemon_threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_and_save(report: str, record: dict, path: Path | None) -> None:
    """A benchmark's ending: its report on stdout, and its full record as JSON where asked."""
    print(report)
    if path is not None:
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
