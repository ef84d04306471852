"""Logs every garbage collection over 3 ms in any Python process started with this folder on
PYTHONPATH (daemons, clients, the link emulator inherit it), one line each, to
$PETALS_GC_LOG/<pid>.txt: wall time, generation, milliseconds, objects collected, argv.

    mkdir -p /tmp/gc && PETALS_GC_LOG=/tmp/gc PYTHONPATH=benchmarks/gc_pauses \\
        sudo -E .venv/bin/python -m benchmarks.wan --model-size 271m --sessions 0 --no-kill
    sort /tmp/gc/*.txt

(BENCHMARKS.md, "Garbage collection pauses".) Python imports a `sitecustomize` module at start
when one is on the path; this one only adds a `gc.callbacks` entry.
"""
from __future__ import annotations

import gc
import os
import sys
import time

_FOLDER = os.environ.get("PETALS_GC_LOG")
_started: list[float] = [0.0]


def _log(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _started[0]
    if took > 0.003 and _FOLDER:
        with open(os.path.join(_FOLDER, f"{os.getpid()}.txt"), "a") as out:
            out.write(f"{time.time():.3f} gen{info['generation']} {took * 1e3:.1f}ms collected "
                      f"{info['collected']} {' '.join(sys.argv[:3])[:100]}\n")


if _FOLDER:
    gc.callbacks.append(_log)
