"""Identifiers peers agree on: libp2p protocol ids, the wire version, and the fingerprint format.

The trailing `/1` of each protocol id is the wire version of that protocol: an incompatible
change gets a new id (so old and new daemons can serve both during a migration) rather than
in-band negotiation.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

__all__ = [
    "INFO_PROTOCOL",
    "INFERENCE_PROTOCOL",
    "FORWARD_PROTOCOL",
    "BACKWARD_PROTOCOL",
    "ALL_PROTOCOLS",
    "PROTOCOL_VERSION",
    "__version__",
    "MAX_FINGERPRINT_LENGTH",
    "is_valid_fingerprint",
]

INFO_PROTOCOL = "/petals/info/1"  # what a daemon serves, its limits and load
INFERENCE_PROTOCOL = "/petals/inference/1"  # long-lived session: open, steps (KV cache kept), close
FORWARD_PROTOCOL = "/petals/forward/1"  # stateless forward through a span (fine-tuning)
BACKWARD_PROTOCOL = "/petals/backward/1"  # stateless backward through a span (fine-tuning)
ALL_PROTOCOLS = (INFO_PROTOCOL, INFERENCE_PROTOCOL, FORWARD_PROTOCOL, BACKWARD_PROTOCOL)

# Version of the wire formats as a whole (frames, messages, signature and record encodings); the
# `/1` suffixes above and the signing domains ("petals/response/1", "petals/record/1") follow it.
PROTOCOL_VERSION = "petals/1"

try:
    __version__ = version("petalsd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Model fingerprints appear inside DHT keys ("/petals/<fingerprint>/<peer id>"), so they must not
# contain "/" or whitespace; 128 characters fits any "algo:hexdigest" form.
MAX_FINGERPRINT_LENGTH = 128
_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9._:+=-]{1,128}")


def is_valid_fingerprint(value: object) -> bool:
    """True for a non-empty str of at most 128 characters from [A-Za-z0-9._:+=-]."""
    return isinstance(value, str) and _FINGERPRINT_RE.fullmatch(value) is not None
