"""Discovery tests: libp2p logs routed through logging at sane levels."""
from __future__ import annotations

import pytest

from petals_protocol.p2p.host import quiet_libp2p_logs


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    quiet_libp2p_logs()
