"""Sybil peers cannot pre-fill a model's index keys and hide honest daemons (issue 17 item 9).

Index keys are predictable; libp2p keeps the first 20 providers of a key and ignores later ones.
These tests provide a key from 20 peers of one network, then an honest peer from another
network, against a real DHT node.
"""
from __future__ import annotations

import pytest
import trio

from petals_protocol.p2p import compat
from petals_protocol.p2p.dht import MAX_PROVIDERS_PER_KEY, admit_provider, index_key_for, network_group
from petals_protocol.p2p.host import connect

from discovery_swarm import FINGERPRINT, swarm


def test_network_group() -> None:
    assert network_group("/ip4/203.0.113.7/tcp/4001") == "203.0.113.0/24"
    assert network_group("/ip6/2001:db8:1:2::5/tcp/4001") == "2001:db8:1::/48"
    assert network_group("/ip4/1.2.3.4/tcp/1/p2p/QmRelay/p2p-circuit") == "relay:QmRelay"


def test_admit_provider_policy() -> None:
    full = {f"s{i}": ("A", float(i)) for i in range(MAX_PROVIDERS_PER_KEY)}
    assert admit_provider(full, "s3", "A") == (True, None)  # a refresh
    assert admit_provider(full, "s99", "A") == (False, None)  # the crowded network gets no more
    assert admit_provider(full, "h1", "B") == (True, "s0")  # another network evicts its oldest
    # Networks balance out: B may grow while it stays below the most represented network.
    mixed = {**{f"s{i}": ("A", float(i)) for i in range(11)}, **{f"h{i}": ("B", 100.0 + i) for i in range(9)}}
    assert admit_provider(mixed, "h9", "B") == (True, "s0")
    assert admit_provider(mixed, "s11", "A") == (False, None)
    assert admit_provider({"a": ("A", 0.0)}, "b", "A") == (True, None)  # room left: anyone


@pytest.mark.skipif(not compat.INTERNALS, reason="the stock provider store keeps first come (compat fallback)")
def test_sybils_from_one_network_cannot_hide_an_honest_provider() -> None:
    async def body() -> None:
        key = index_key_for(FINGERPRINT, 7, 0)
        async with swarm(1) as sw:
            node = sw.servers[0]
            sybils = [await sw.add(server=False) for _ in range(MAX_PROVIDERS_PER_KEY + 2)]
            for sybil in sybils:
                assert await compat.send_add_provider(sybil.dht, node.host.get_id(), key)
            with trio.fail_after(10):
                while len(node.dht.provider_store.get_providers(key)) < MAX_PROVIDERS_PER_KEY:
                    await trio.sleep(0.05)
            assert len(node.dht.provider_store.get_providers(key)) == MAX_PROVIDERS_PER_KEY

            # An honest daemon on another network (127.0.9.1 is another /24 of loopback); the
            # node dials it, so the connection's remote address is that network's. (Its host is
            # in the swarm's exit stack: an error leaving a host's block while its DHT runs in an
            # outer nursery is lost, see docs/py-libp2p.md.)
            honest = await sw.add(server=False, bootstrap=[], listen=["/ip4/127.0.9.1/tcp/0"])
            await connect(node.host, honest.addr)
            assert await compat.send_add_provider(honest.dht, node.host.get_id(), key)
            with trio.fail_after(10):
                while honest.host.get_id() not in {p.peer_id for p in node.dht.provider_store.get_providers(key)}:
                    await trio.sleep(0.05)
            providers = {p.peer_id for p in node.dht.provider_store.get_providers(key)}
            assert len(providers) == MAX_PROVIDERS_PER_KEY
            assert sum(1 for s in sybils if s.host.get_id() in providers) == MAX_PROVIDERS_PER_KEY - 1
            # A further Sybil from the crowded network is still refused.
            late = await sw.add(server=False)
            assert await compat.send_add_provider(late.dht, node.host.get_id(), key)
            await trio.sleep(0.5)
            providers = {p.peer_id for p in node.dht.provider_store.get_providers(key)}
            assert late.host.get_id() not in providers and honest.host.get_id() in providers

    async def main() -> None:
        with trio.fail_after(60):
            await body()

    trio.run(main)
