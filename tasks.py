#!/usr/bin/env python3
"""Set-up entry point that works on a fresh clone with nothing but python3.

    python3 tasks.py demo [ARGS...]   run `petals demo` (a local swarm on the shipped model)
    python3 tasks.py test [ARGS...]   run the test suite (extra ARGS go to pytest)

Each creates the virtual environment `.venv` on first use and reuses it afterwards; it is
rebuilt when pyproject.toml changes (a stamp file records the hash it was built from).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".petals-stamp"
#: The torch the test suite and the demo run on: the CPU build (pip would otherwise pick a multi-GB
#: CUDA build from the range pyproject.toml accepts for users).
TESTED_TORCH = "torch==2.13.0"


def _bin(name: str) -> Path:
    return VENV / "bin" / name


def ensure_venv() -> None:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TESTED_TORCH.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest and _bin("petals").exists():
        return
    if not _bin("python").exists():
        print("tasks: creating .venv", file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    log = VENV / "pip-install.log"
    print(f"tasks: installing petalsd and its dependencies into .venv (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as out:
        result = subprocess.run(
            [str(_bin("python")), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "-e", f"{ROOT}[test]", TESTED_TORCH],
            stdout=out, stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"tasks: pip install failed (exit {result.returncode}); full log in {log}")
    STAMP.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        args = [str(_bin("petals")), "demo", *rest]
    else:
        args = [str(_bin("python")), "-m", "pytest", *rest]
    os.chdir(ROOT)
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
