"""petals_client: run models whose blocks are served by a swarm of petalsd daemons.

    from petals_client import AutoDistributedModelForCausalLM
"""
from __future__ import annotations

from typing import Any

from petals_protocol.threads import quiet_openmp_waits

# A client mostly waits on the network: its idle OpenMP threads should sleep, not spin on cores
# that daemons or the user's other work need (effective only when imported before torch).
quiet_openmp_waits()

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "RemoteSequential",
           "AutoDistributedModelForSequenceClassification", "DistributedModelForSequenceClassification"]


def __getattr__(name: str) -> Any:
    # Lazy: `petals ctl` and `petals --help` must not pay for importing torch and libp2p.
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from . import model

        return getattr(model, name)
    if name in ("AutoDistributedModelForSequenceClassification", "DistributedModelForSequenceClassification"):
        from . import classification

        return getattr(classification, name)
    if name == "RemoteSequential":
        from .remote import RemoteSequential

        return RemoteSequential
    raise AttributeError(name)
