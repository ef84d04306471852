"""petals_client: run models whose blocks are served by a swarm of petalsd daemons.

    from petals_client import AutoDistributedModelForCausalLM
"""
from __future__ import annotations

from typing import Any

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
