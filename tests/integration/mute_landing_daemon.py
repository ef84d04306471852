"""Test fault injector: a real `petalsd` that never confirms a pushed prefill (`PushLanded`).

Run as a script in place of `python -m petalsd` (LocalSwarm.start(launcher=[this file])): what a
daemon of an older release, or one whose answers are lost, looks like to the daemon pushing to it.
The pusher must still answer its client, after `PUSH_LANDED_WAIT`.
"""
from __future__ import annotations

import sys

import petalsd.handlers as handlers
from petalsd.cli import main

handlers.PUSH_LANDED_FROM = 1 << 62  # no pushed step is ever large enough to confirm

if __name__ == "__main__":
    sys.exit(main())
