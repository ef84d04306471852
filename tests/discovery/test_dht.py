"""DHT mechanics on real hosts: records found by fresh clients, newer seq wins, forgeries refused
everywhere, offline and expired records, and clients kept out of routing tables (bug 6)."""
from __future__ import annotations

import time
import msgpack
import pytest
import trio

from petals_client.discovery import join_swarm
from petals_protocol.errors import BadRecord
from petals_protocol.p2p.dht import (
    PetalsValidator,
    find_model_records,
    get_fresh,
    index_key_for,
    index_keys,
    put_record,
)
from petals_protocol.records import MAX_RECORD_SIZE, encode_record, record_key
from petals_protocol.signing import peer_id_to_text

from discovery_swarm import FINGERPRINT, OTHER_FINGERPRINT, Node, make_record, swarm

TIMEOUT = 30.0


def run(body) -> None:
    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            await body()

    trio.run(main)


def key_of(node: Node, fingerprint: str = FINGERPRINT) -> str:
    return record_key(fingerprint, node.peer_id_text)


def test_record_put_by_one_is_found_by_fresh_client_and_newer_seq_replaces_older() -> None:
    async def body() -> None:
        async with swarm(5) as sw:
            author = sw.servers[3]
            first = encode_record(author.signer, make_record(author, seq=1))
            stored = await put_record(author.dht, key_of(author), first)
            assert stored == 4  # every other server acknowledged (put_value would not tell)

            client = await sw.add(server=False)
            assert await get_fresh(client.dht, key_of(author)) == [first]

            newer = encode_record(author.signer, make_record(author, seq=2, start=4, end=8))
            assert await put_record(author.dht, key_of(author), newer) == 4
            # The client still has nothing local, but a server that answered before now holds
            # seq=2: a real lookup must see it (get_value would answer seq=1 from local state).
            assert (await get_fresh(client.dht, key_of(author)))[0] == newer
            for server in sw.servers:
                assert (await get_fresh(server.dht, key_of(author)))[0] == newer

            # An older record is refused by every node that holds the newer one.
            older = encode_record(author.signer, make_record(author, seq=1))
            assert await put_record(author.dht, key_of(author), older) == 0

    run(body)


def test_forged_records_are_rejected_by_every_validator() -> None:
    async def body() -> None:
        async with swarm(5) as sw:
            victim, forger = sw.servers[1], sw.servers[2]
            good = make_record(victim)
            blob = encode_record(victim.signer, good)
            outer = msgpack.unpackb(blob)
            bad_signature = msgpack.packb({"record": outer["record"], "sig": bytes(64)})
            tampered_body = msgpack.packb({"record": outer["record"].replace(b"tiny", b"tinx"), "sig": outer["sig"]})
            forgeries = {
                # the forger's own valid record, stored under the victim's key
                "other peer id": (key_of(victim), encode_record(forger.signer, make_record(forger))),
                "bad signature": (key_of(victim), bad_signature),
                "tampered body": (key_of(victim), tampered_body),
                "expired": (key_of(victim), encode_record(victim.signer, make_record(victim, ttl=-1))),
                "too far ahead": (key_of(victim), encode_record(victim.signer, make_record(victim, ttl=10 * 3600))),
                "wrong fingerprint for the key": (
                    key_of(victim, OTHER_FINGERPRINT), blob),
                "oversized": (key_of(victim), blob + b"\0" * MAX_RECORD_SIZE),
            }
            for name, (key, value) in forgeries.items():
                for node in sw.servers:
                    with pytest.raises(BadRecord):
                        node.dht.validator.validate(key, value)
                # put_record refuses locally; push it by hand at each peer, as a malicious node would.
                with pytest.raises(BadRecord):
                    await put_record(forger.dht, key, value)
                key_bytes = key.encode()
                for node in sw.servers:
                    if node is forger:
                        continue
                    accepted = await forger.dht.value_store._store_at_peer(node.host.get_id(), key_bytes, value)
                    assert not accepted, f"{name}: accepted by a server"
                    assert node.dht.value_store.get(key_bytes) is None, f"{name}: stored by a server"
            client = await sw.add(server=False)
            assert await get_fresh(client.dht, key_of(victim)) == []
            assert await find_model_records(client.dht, FINGERPRINT, extra_peers=[victim.peer_id_text]) == []

    run(body)


def test_offline_after_announce_offline_and_expiry() -> None:
    from petalsd.announce import Announcer

    async def body() -> None:
        async with swarm(5) as sw:
            daemons = sw.servers[1:4]
            announcers = [
                Announcer(d.host, d.dht, d.signer, d.peer_id_text,
                          lambda d=d, i=i: make_record(d, start=4 * i, end=4 * i + 4), period=60.0, ttl=120.0)
                for i, d in enumerate(daemons)
            ]
            for announcer in announcers:
                assert await announcer.announce_once()
            discovery = await join_swarm(await sw.add_host(), sw.nursery, [sw.servers[0].addr])
            found = await discovery.find_servers(FINGERPRINT)
            assert [(f.peer_id, f.start, f.end, f.state) for f in found] == [
                (d.peer_id_text, 4 * i, 4 * i + 4, "online") for i, d in enumerate(daemons)]
            assert all(f.addrs == (d.addr,) for f, d in zip(found, daemons, strict=True))
            assert await discovery.find_servers(OTHER_FINGERPRINT) == []

            assert await announcers[1].announce_offline()
            found = await discovery.find_servers(FINGERPRINT)
            assert [f.peer_id for f in found] == [daemons[0].peer_id_text, daemons[2].peer_id_text]
            # The offline record itself is still there and signed: it is the newest seq.
            records = await find_model_records(discovery.dht, FINGERPRINT)
            assert {peer_id_to_text(r.peer_id): r.state for r in records}[daemons[1].peer_id_text] == "offline"

            # A client whose clock is past every record's expiry sees nobody: liveness comes from
            # the record's expiry, not from the provider entries (which py-libp2p keeps 48 h).
            late = await sw.add(server=False, clock=lambda: time.time() + 121.0)
            assert await find_model_records(late.dht, FINGERPRINT) == []

    run(body)


def test_announcer_run_republishes_with_increasing_seq_and_survives_dht_errors() -> None:
    from petalsd.announce import Announcer

    async def body() -> None:
        async with swarm(3) as sw:
            daemon = sw.servers[1]
            spans = iter([(0, 4), (4, 8), (8, 12)])
            announcer = Announcer(daemon.host, daemon.dht, daemon.signer, daemon.peer_id_text,
                                  lambda: make_record(daemon, start=(span := next(spans))[0], end=span[1]),
                                  period=0.3, ttl=5.0)
            client = await sw.add(server=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(announcer.run)
                seen = []
                while len(seen) < 2:
                    records = await find_model_records(client.dht, FINGERPRINT)
                    if records and (not seen or records[0].seq > seen[-1].seq):
                        seen.append(records[0])
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert seen[0].seq < seen[1].seq and seen[0].start_block < seen[1].start_block
            assert seen[1].expires_at <= time.time() + 5.0

            def broken() -> object:
                raise RuntimeError("make_record blew up")

            failing = Announcer(daemon.host, daemon.dht, daemon.signer, daemon.peer_id_text, broken,
                                period=0.3, ttl=5.0)
            assert await failing.announce_once() is False  # logged, not raised

    run(body)


def test_records_really_expire_and_clients_stay_out_of_routing_tables() -> None:
    async def body() -> None:
        async with swarm(3) as sw:
            author = sw.servers[2]
            record = make_record(author, ttl=1.5)
            assert await put_record(author.dht, key_of(author), encode_record(author.signer, record)) == 2
            client = await sw.add(server=False)
            assert len(await get_fresh(client.dht, key_of(author))) == 1
            await trio.sleep(1.6)
            assert await get_fresh(client.dht, key_of(author)) == []
            await trio.sleep(0.3)  # background server probes of the client have finished
            for server in sw.servers:
                assert client.host.get_id() not in server.dht.routing_table.get_peer_ids()
                assert server.dht.routing_table.size() == 2
    run(body)


def test_index_keys_rotate_shard_and_fit_add_provider() -> None:
    now = 1_000_000 * 3600.0 + 10.0
    readers = index_keys(FINGERPRINT, now=now)
    assert len(set(readers)) == len(readers) == 4
    assert all(len(k) == 34 and len(k) <= 80 for k in readers)
    mine = index_keys(FINGERPRINT, now=now, peer_id_text="12D3KooWabc")
    assert len(mine) == 1 and mine[0] in readers
    near_end = index_keys(FINGERPRINT, now=now + 3600.0 - 60.0, peer_id_text="12D3KooWabc")
    assert near_end[0] == mine[0] and near_end[1] not in readers and near_end[1] in index_keys(FINGERPRINT, now=now + 3600.0)
    assert index_key_for(FINGERPRINT, 5, 0) != index_key_for(OTHER_FINGERPRINT, 5, 0)


def test_validator_select_prefers_higher_seq_and_skips_invalid() -> None:
    from petals_protocol.p2p.identity import ed25519_private_key, ephemeral_identity, peer_id

    keys = ephemeral_identity()
    key = record_key(FINGERPRINT, str(peer_id(keys)))
    signer = ed25519_private_key(keys)
    old, new = (encode_record(signer, make_record(keys, seq=s)) for s in (1, 2))
    expired = encode_record(signer, make_record(keys, seq=9, ttl=-1))
    validator = PetalsValidator()
    assert validator.select(key, [old, new]) == 1
    assert validator.select(key, [new, old]) == 0
    assert validator.select(key, [expired, old]) == 1
    with pytest.raises(BadRecord):
        validator.select(key, [expired])


def test_a_silent_dht_server_costs_one_rpc_timeout_then_lookups_skip_it() -> None:
    """A DHT server others list but nobody can reach (a daemon behind NAT, known to its relay):
    the first lookup that meets it waits RPC_TIMEOUT for it, not the whole walk's bound, and the
    lookups after it leave it out, still finding every record."""
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    from petals_protocol.p2p.dht import RPC_TIMEOUT, KAD_PROTOCOL
    from petals_protocol.p2p.identity import ephemeral_identity

    async def hold(stream: trio.SocketStream) -> None:  # accepts the TCP connection, never answers
        await trio.sleep_forever()

    async def body() -> None:
        async with swarm(2) as sw:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            sw.nursery.start_soon(trio.serve_listeners, hold, listeners)
            silent = ID.from_pubkey(ephemeral_identity().public_key)
            first = sw.servers[0]
            store = first.host.get_peerstore()
            store.add_addrs(silent, [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")], 3600)
            store.add_protocols(silent, [str(KAD_PROTOCOL)])  # as identify says of a NATed daemon
            assert await first.dht.routing_table.add_peer(silent)
            author = sw.servers[1]
            blob = encode_record(author.signer, make_record(author))
            await put_record(author.dht, key_of(author), blob)

            began = trio.current_time()
            client = await sw.add(server=False)  # its first walk meets the silent peer
            joined = trio.current_time() - began
            assert client.dht.silent(silent)
            assert joined < 2 * RPC_TIMEOUT, joined  # the walk's own bound is 4 x RPC_TIMEOUT

            began = trio.current_time()
            assert await get_fresh(client.dht, key_of(author)) == [blob]
            assert trio.current_time() - began < RPC_TIMEOUT  # not asked again

    run(body)
