"""Test fault injector: a real `petalsd` that never confirms a pushed prefill (`PushLanded`).

Run as a script in place of `python -m petalsd` (LocalSwarm.start(launcher=[this file])): what a
daemon of an older release, or one whose answers are lost, looks like to the daemon pushing to it.
The pusher must still answer its client, after `PUSH_LANDED_WAIT`.
"""
from __future__ import annotations

import sys

import petalsd.handlers as handlers
from petalsd.cli import main

handlers.confirms_landing = lambda step: False  # the receiving side's rule: confirm no pushed step

if __name__ == "__main__":
    sys.exit(main())
