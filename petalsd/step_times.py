"""Where an inference step's time goes inside this daemon, summed per phase.

On a chain, a token's time is the client's own work, the network legs and each daemon's share; the
daemon's share is what an operator can act on (a busy compute thread, a slow uplink write) and
what a benchmark needs to split a token's time (benchmarks/wan.py reads these through the control
API's metrics before and after a generation and divides by the steps in between). Phases, from the
moment the handler has the decoded step:

- ``to_output``: waiting for the session's lock and the compute worker, the compute, and the
  hand-overs between the event loop and the worker thread;
- ``sent_on``: writing the output where the chain goes next: pushed to the next daemon, or, on the
  last hop (or without push), the signed result written to the client; the two phases together
  are this daemon's part of the critical path;
- ``answered``: after a push, signing the result and writing it to the client (off the critical
  path: the next daemon already has the output).

Only steps that produced an output are timed (a refused step costs little and says nothing about
the chain's speed). Monotonic seconds; counters only ever grow, like every other metric here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("to_output", "sent_on", "answered")


@dataclass
class StepTimes:
    steps: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, arrived: float, output_ready: float, sent_on: float, answered: float) -> None:
        """One step's stamps: handler got it, output computed, output sent on, client answered."""
        self.steps += 1
        self.seconds["to_output"] += output_ready - arrived
        self.seconds["sent_on"] += sent_on - output_ready
        self.seconds["answered"] += answered - sent_on
