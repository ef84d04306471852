"""Push targets: the address a step asks to be forwarded to must dial the peer it names."""

from __future__ import annotations

import pytest

from petalsd import forwarding
from petalsd.forwarding import Forwarder, PushRefused

PEER = "12D3KooWQ6ceRcaTZxjtD3uxKNgPSscKMg1WoDGfWuXGV6Z8yoHV"


def _forwarder() -> Forwarder:
    async def no_members(peer: str) -> None:
        return None

    return Forwarder(host=None, nursery=None, max_frame_size=1 << 20, members=no_members)  # type: ignore[arg-type]


def test_address_peer_is_parsed_once_and_remembered() -> None:
    fwd = _forwarder()
    addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
    assert fwd._peer_of_addr(addr) == PEER
    assert fwd._addr_peers == {addr: PEER}
    assert fwd._peer_of_addr(addr) == PEER


@pytest.mark.parametrize("addr", ["", "not a multiaddr", "/ip4/127.0.0.1/tcp/4001", "/ip4/1.2.3.4/tcp/1/p2p/xyz"])
def test_undialable_addresses_are_refused_and_not_remembered(addr: str) -> None:
    fwd = _forwarder()
    with pytest.raises(PushRefused, match="not a dialable multiaddr"):
        fwd._peer_of_addr(addr)
    assert fwd._addr_peers == {}


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarding, "ADDR_CACHE_SIZE", 3)
    fwd = _forwarder()
    for port in range(10):
        fwd._peer_of_addr(f"/ip4/127.0.0.1/tcp/{4000 + port}/p2p/{PEER}")
        assert len(fwd._addr_peers) <= 3
