"""The garbage collector settled once a process has loaded its model, for steady step times.

Importing torch and transformers and loading a span leaves a great many long-lived Python
objects. CPython's full (generation 2) collection walks all of them; it runs whenever a quarter
as many objects again have been promoted since the last one, which a busy daemon reaches every
few seconds (frames, messages, trio tasks). Each such collection stops the daemon's event loop
and compute hand-overs, and a step that meets one waits as long (figures: BENCHMARKS.md,
"Garbage collection pauses").

`settle_heap()` collects what loading left behind and then freezes everything still alive
(`gc.freeze`): later full collections skip those objects and only walk what was allocated
since, so they take milliseconds. Called again after a new span is loaded, it unfreezes first,
so that the previous span's leftovers can be collected rather than kept forever.
"""
from __future__ import annotations

import gc


def settle_heap() -> int:
    """Collect, then freeze every object alive now; returns how many are frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
