"""Count the per-step work of our code path in one process, by wrapping the functions that do it.

Benchmark-only instrumentation (benchmarks/per_token_work.py): nothing in petalsd, the client or
the protocol reads it. `install()` replaces, in the process that calls it and before the modules
that use them are imported, the functions whose calls are counted:

- thread crossings, each hand-off counted once per direction: a `ComputeWorker` job (daemon),
  `ClientRuntime.call` (the client's lane into its loop), `trio.to_thread.run_sync`,
  `trio.from_thread.run` / `run_sync`: two each;
- tensor <-> bytes conversions (`petals_protocol.tensors.from_torch` / `to_torch`), split by
  whether they ran on a trio loop or on another thread;
- msgpack: messages encoded and decoded, by message tag, with their bytes; and tensor packs,
  every time a tensor's data is put into msgpack (`TensorPayload.to_wire`);
- SHA-256 passes started by the protocol (`hashlib.sha256` as seen from `petals_protocol.tensors`,
  over a tensor's data, and from `petals_protocol.signing`, over a binding's digests);
- Ed25519 signatures made and verified (`sign_response`, `verify_response`).

A daemon runs counted through `python -m benchmarks.work_counters PETALSD-ARGS...` (LocalSwarm's
`launcher`); it writes its counters to `$PETALS_WORK_COUNTS_DIR/<pid>.json` when it gets SIGUSR1.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

COUNTS_DIR_ENV = "PETALS_WORK_COUNTS_DIR"


def _on_loop() -> bool:
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class WorkCounters:
    """The counts of one process (a `Counter` guarded by a lock: worker threads count too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def counting(self, fn: Callable[..., Any], key: Callable[..., str | list[tuple[str, int]]]) -> Callable[..., Any]:
        """`fn`, counting each call under `key(result, *args)` (a key, or (key, n) pairs)."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            keys = key(result, *args)
            for k, n in ([(keys, 1)] if isinstance(keys, str) else keys):
                self.add(k, n)
            return result

        return wrapper

    def counting_async(self, fn: Callable[..., Any], key: str, n: int = 1) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.add(key, n)
            return await fn(*args, **kwargs)

        return wrapper


def _counting_hashlib(counters: WorkCounters, key: str) -> SimpleNamespace:
    """A stand-in for the `hashlib` module as one protocol module sees it: counts sha256() calls."""

    def sha256(*args: Any, **kwargs: Any) -> Any:
        counters.add(key)
        return hashlib.sha256(*args, **kwargs)

    return SimpleNamespace(sha256=sha256)


def install() -> WorkCounters:
    """Wrap the counted functions in this process (call before importing petalsd or the client)."""
    import trio

    import petals_protocol.messages as messages
    import petals_protocol.signing as signing
    import petals_protocol.tensors as tensors

    counters = WorkCounters()

    def where(prefix: str) -> Callable[..., str]:
        return lambda result, *args: f"{prefix}.{'loop' if _on_loop() else 'thread'}"

    tensors.from_torch = counters.counting(tensors.from_torch, where("tensor_to_bytes"))
    tensors.to_torch = counters.counting(tensors.to_torch, where("bytes_to_tensor"))
    tensors.TensorPayload.to_wire = counters.counting(tensors.TensorPayload.to_wire, lambda r, *a: "tensor_packs")
    tensors.hashlib = _counting_hashlib(counters, "sha256.tensor")  # type: ignore[attr-defined]
    signing.hashlib = _counting_hashlib(counters, "sha256.binding")  # type: ignore[attr-defined]
    messages.encode_message = counters.counting(
        messages.encode_message, lambda out, msg: [(f"encode.{msg.TAG}", 1), (f"encode_bytes.{msg.TAG}", len(out))])
    messages.decode_message = counters.counting(
        messages.decode_message, lambda msg, payload: [(f"decode.{msg.TAG}", 1),
                                                       (f"decode_bytes.{msg.TAG}", len(payload))])
    signing.sign_response = counters.counting(signing.sign_response, lambda r, *a: "ed25519.sign")
    signing.verify_response = counters.counting(signing.verify_response, lambda r, *a: "ed25519.verify")
    trio.to_thread.run_sync = counters.counting_async(trio.to_thread.run_sync, "crossings.to_thread", 2)
    trio.from_thread.run = counters.counting(trio.from_thread.run, lambda r, *a: [("crossings.from_thread", 2)])
    trio.from_thread.run_sync = counters.counting(trio.from_thread.run_sync,
                                                  lambda r, *a: [("crossings.from_thread", 2)])
    return counters


def count_daemon_jobs(counters: WorkCounters) -> None:
    """Count the daemon's compute jobs (each: into the worker thread and back)."""
    from petalsd.compute import ComputeWorker

    submit = counters.counting_async(ComputeWorker._submit, "crossings.compute_job", 2)
    ComputeWorker._submit = submit  # type: ignore[method-assign]


def count_client_calls(counters: WorkCounters) -> None:
    """Count the client's calls from the user's thread into its loop (each: there and back)."""
    from petals_client.runtime import ClientRuntime

    call = counters.counting(ClientRuntime.call, lambda r, *a: [("crossings.lane", 2)])
    ClientRuntime.call = call  # type: ignore[method-assign]


def dump_on_signal(counters: WorkCounters, folder: Path) -> None:
    """On SIGUSR1, write the counters to `folder/<pid>.json` (atomically: a rename)."""
    path = folder / f"{os.getpid()}.json"

    def dump(signum: int, frame: object) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(counters.snapshot()))
        tmp.replace(path)

    signal.signal(signal.SIGUSR1, dump)


def main() -> int:
    """A counted `petalsd`: the same arguments, counters written on SIGUSR1 (see the docstring)."""
    counters = install()
    folder = Path(os.environ[COUNTS_DIR_ENV])
    count_daemon_jobs(counters)
    dump_on_signal(counters, folder)
    from petalsd.cli import main as petalsd_main

    return petalsd_main()


if __name__ == "__main__":
    sys.exit(main())
