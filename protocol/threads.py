"""CPU thread defaults that hold up on a machine shared with other work (a volunteer's desktop).

Two things go wrong with torch's defaults when several processes share the cores:

- OpenMP threads that finished their share of a parallel region spin, waiting for the next one
  (GNU OpenMP spins a while before it sleeps). An idle daemon or client between two steps keeps
  burning the very cores the working process needs. `quiet_openmp_waits()` asks for waits that
  yield (`OMP_WAIT_POLICY=PASSIVE`); the OpenMP runtime reads it once, when torch is first
  imported, so the command-line entry points call it before importing torch.
- torch starts one thread per core even when the cores are busy; a parallel region then stalls
  at its barrier whenever one of its threads is descheduled. `default_num_threads()` picks the
  cores that are free now: those this process may use (affinity, cgroup quota) less the load.

Both yield to what the user set: an OpenMP variable in the environment, `--num-threads`.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

#: The variables that already decide how OpenMP threads wait; when any is set we leave it alone.
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def quiet_openmp_waits(environ: MutableMapping[str, str] | None = None) -> bool:
    """Make waiting OpenMP threads sleep instead of spin, if it can still take effect.

    True when set; False when torch is already imported (too late: the runtime has read its
    environment) or the user chose a policy.
    """
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in env for name in OPENMP_WAIT_VARIABLES):
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota if any."""
    cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota != "max" and float(period) > 0:
        cores = min(cores, float(quota) / float(period))
    return cores


def default_num_threads(load_average: float | None = None, cores: float | None = None) -> int:
    """Threads for torch when the user gave none: the usable cores not busy with other work now."""
    cores = usable_cores() if cores is None else cores
    load = os.getloadavg()[0] if load_average is None else load_average
    return max(1, min(math.floor(cores), math.floor(cores - load + 0.5)))


def set_torch_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to `requested`, or to `default_num_threads()` when None."""
    import torch

    threads = requested or default_num_threads()
    torch.set_num_threads(threads)
    return threads
