"""Real libp2p hosts and Kademlia nodes on 127.0.0.1, all in one trio process (test helpers)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair

from petals_protocol.p2p.dht import PetalsDHT, start_dht
from petals_protocol.p2p.host import listen_multiaddrs, make_host, running_host
from petals_protocol.p2p.identity import ed25519_private_key, ephemeral_identity, peer_id, peer_id_bytes
from petals_protocol.records import ServerRecord

FINGERPRINT = "ab" * 32
OTHER_FINGERPRINT = "cd" * 32
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@dataclass
class Node:
    key_pair: KeyPair
    host: IHost
    dht: PetalsDHT

    @property
    def peer_id_text(self) -> str:
        return str(peer_id(self.key_pair))

    @property
    def signer(self) -> Ed25519PrivateKey:
        return ed25519_private_key(self.key_pair)

    @property
    def addr(self) -> str:
        return listen_multiaddrs(self.host)[0]


def make_record(node_or_keys: Node | KeyPair, *, seq: int = 1, start: int = 0, end: int = 4, ttl: float = 60.0,
                state: str = "online", fingerprint: str = FINGERPRINT, throughput: float = 10.0,
                num_blocks: int = 12, addrs: tuple[str, ...] | None = None) -> ServerRecord:
    key_pair = node_or_keys.key_pair if isinstance(node_or_keys, Node) else node_or_keys
    if addrs is None:
        addrs = (node_or_keys.addr,) if isinstance(node_or_keys, Node) else ("/ip4/127.0.0.1/tcp/1",)
    return ServerRecord(
        peer_id=peer_id_bytes(key_pair), model_fingerprint=fingerprint, model_name="tiny", start_block=start,
        end_block=end, num_blocks=num_blocks, state=state, throughput=throughput, cache_tokens_free=1024,
        addrs=addrs, public_name="", version="test", expires_at=time.time() + ttl, seq=seq, using_relay=False,
    )


class Swarm:
    """Hosts that live as long as the `swarm()` block; nodes join through the first one."""

    def __init__(self, stack: AsyncExitStack, nursery: trio.Nursery) -> None:
        self._stack = stack
        self.nursery = nursery
        self.servers: list[Node] = []

    async def add_host(self) -> IHost:
        """A running host with no DHT (for join_swarm)."""
        host = make_host(ephemeral_identity())
        await self._stack.enter_async_context(running_host(host, LOOPBACK))
        return host

    async def add(self, *, server: bool = True, bootstrap: list[str] | None = None,
                  clock: Callable[[], float] = time.time, listen: list[str] = LOOPBACK) -> Node:
        key_pair = ephemeral_identity()
        host = make_host(key_pair)
        await self._stack.enter_async_context(running_host(host, listen))
        if bootstrap is None:
            bootstrap = [self.servers[0].addr] if self.servers else []
        dht = await start_dht(host, self.nursery, server=server, bootstrap=bootstrap, clock=clock)
        node = Node(key_pair, host, dht)
        if server:
            self.servers.append(node)
        return node


@asynccontextmanager
async def swarm(num_servers: int) -> AsyncIterator[Swarm]:
    """`num_servers` DHT servers joined through the first; hosts close after the DHTs stop."""
    failure: BaseException | None = None
    async with AsyncExitStack() as stack:
        # The nursery must close before the hosts: the exit stack owns both, nursery last in.
        nursery = await stack.enter_async_context(trio.open_nursery())
        result = Swarm(stack, nursery)
        try:
            for _ in range(num_servers):
                await result.add()
            yield result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            # Cancelling the nursery also cancels the hosts' exits that the failure unwinds through:
            # their Cancelled would replace the failure and the nursery would absorb it (a test
            # whose assertion failed would pass). Hence the failure is kept and raised again.
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
