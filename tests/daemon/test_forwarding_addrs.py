"""Push targets: the address a step asks to be forwarded to must dial the peer it names."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import trio

from petals_protocol.messages import InferenceStep, PushTarget

from petalsd import forwarding
from petalsd.forwarding import Forwarder, LinkActivity, PushRefused, _Link

sys.path.insert(0, str(Path(__file__).parents[1] / "protocol"))
from protocol_samples import hidden, sample_record  # noqa: E402

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


def test_a_link_outliving_its_record_takes_the_record_learnt_since() -> None:
    """A push link lives longer than the record read when it opened (record_ttl): pushes must go
    on with the fresher record the forwarder learnt in the background, and stop without one."""
    stale = sample_record(time.time(), ttl=-1.0)  # expired
    peer = stale.peer_id_text
    target = PushTarget(peer_id=stale.peer_id, addr=stale.addrs[0], session_id=b"\x01" * 16, start_block=0,
                        end_block=4, step=0)
    step = InferenceStep(session_id=b"\x02" * 16, step=0, position=0, hidden=hidden(), hypo_ids=None)

    async def main() -> None:
        fwd = _forwarder()
        send, _receive = trio.open_memory_channel[object](8)
        fwd._links[peer] = _Link(peer=peer, queue=send, activity=LinkActivity(peer), record=stale)
        with pytest.raises(PushRefused, match="does not serve block 0"):
            await fwd.push(target, step)
        fwd.learn([dataclasses.replace(stale, expires_at=time.time() + 60, seq=2)])
        await fwd.push(target, step)  # queued for the link's writer
        assert fwd._links[peer].record is not None and fwd._links[peer].record.seq == 2

    trio.run(main)
