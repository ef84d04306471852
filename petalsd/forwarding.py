"""Daemon-to-daemon forwarding: outbound inference streams, one per next peer, pooled.

A step that carries `push` (see `InferenceStep` in petals_protocol.messages) is computed here, its
signed result goes back to the client as usual, and its output goes on to the next daemon as a new
`InferenceStep`. That puts the chain client -> d1 -> d2 -> d3 -> client on the critical path (4
network legs for 3 hops instead of 6), while the client still gets every hop's signed output.

Each next peer has a *link*: a task in the daemon's nursery that owns one long-lived
`/petals/inference/1` stream to that peer. `Forwarder.push` sends the step before the handler
answers the client (the push is on the critical path, the answer is not): at once when the link
is idle (a lone session's step pays no task switch, which cost a measurable share of a small
model's token when every push went through the writer task), else into the link's queue, whose
writer task sends everything queued in one write (`FramedStream.send_many`). So the steps of a
batch, which finish together, cross in two writes instead of one each (one write per step spread
their arrival at the next daemon over several milliseconds; figures for both: BENCHMARKS.md,
"Push forwarding"). While the link is
still dialling, pushes wait in the same queue. A write is bounded by `write_deadline`, a second
plus its bytes at a slow uplink's rate (a stalled peer cannot hold later pushes back for long;
the link is then reset, and the connection under it stays whole: yamux frames are written all or
nothing, protocol/p2p/compat/yamux.py). A link closes itself after
`idle_timeout` seconds without a push (it is shared by every session pushing to that peer, so it
outlives any one session) and on any stream error; the next push opens a fresh one.

Failure model: forwarding is best effort. A push that cannot be delivered (dial refused, stream
reset, queue full) is logged and dropped; the client, which waits for every hop's result on its
own stream with that hop, notices the missing result and falls back to driving the hop itself
(client/session.py). Nothing here retries: retrying would only duplicate what the client does
with better knowledge (it also chooses replacements).

Who is dialled: only a daemon that the DHT says is a member of this model's swarm, online and
serving the block the push starts at, at the addresses of its own signed record. A client names
the next hop (peer id and address) in every step; dialling what it names would let anyone make
a daemon connect anywhere (private ranges, arbitrary ports). So the address a client gives is
never dialled: the first push to a peer looks its record up (one DHT get, while the push waits in
the link's queue as during a dial), a peer without a fitting record is refused (and not looked up
again for `NON_MEMBER_TTL` seconds), and each later push checks the link's record in O(1).

Bounds: at most `queue_size` messages wait per peer (a session has at most one step in flight,
so this is about concurrent sessions); each is at most one frame of `max_frame_size`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from petals_protocol.errors import PetalsError
from petals_protocol.ids import INFERENCE_PROTOCOL
from petals_protocol.messages import ErrorReply, InferenceStep, PushLanded, PushTarget, confirms_landing
from petals_protocol.p2p.host import connect, parse_peer_multiaddr
from petals_protocol.p2p.relay import is_circuit
from petals_protocol.p2p.streams import FramedStream, open_stream, transfer_allowance
from petals_protocol.records import ServerRecord
from petals_protocol.signing import peer_id_to_text

log = logging.getLogger("petalsd.forwarding")

#: A link with no push for this long closes its stream (a decode step comes every few ms; a
#: session between turns may pause for minutes, and re-opening costs one stream open).
LINK_IDLE_TIMEOUT = 60.0
#: Messages queued per next peer before pushes are dropped (one in flight per session at most).
LINK_QUEUE_SIZE = 64
#: Dial plus stream open; a peer that cannot be reached in this time gets the step dropped (the
#: client's own step timeout then decides what to do).
LINK_OPEN_TIMEOUT = 10.0
#: Push addresses whose parsed peer id is remembered (a swarm has a few hundred daemons at most).
ADDR_CACHE_SIZE = 1024
#: Most pushes sent in one write (a batch of decode steps is at most a few dozen).
PUSH_COALESCE_MAX = 64
#: One push write, before its bytes are counted (`write_deadline`; a decode step's frame takes
#: microseconds on any link). A flat second cut off a prefill's push of megabytes on a WAN link in
#: TCP slow start: the link was reset and the client waited out its step timeout for a result
#: that never came. A peer that has stalled is still found out, in proportion to what it was sent.
PUSH_WRITE_TIMEOUT = 1.0
#: A push target without a fitting swarm record is refused for this long without a new lookup.
NON_MEMBER_TTL = 30.0
#: The longest a daemon holds its answer to a client after pushing a large step (a prefill), waiting
#: for the next daemon's PushLanded (messages.PushLanded: the answer would share the uplink with the
#: push): past it, the answer goes anyway.
PUSH_LANDED_WAIT = 2.0
#: Large pushes of one link waiting for PushLanded at once (a next daemon that never sends it
#: costs each of them PUSH_LANDED_WAIT, and no memory beyond this)
LANDING_MAX = 256


def write_deadline(msgs: list[InferenceStep]) -> float:
    """Seconds one write of these pushes may take: PUSH_WRITE_TIMEOUT, plus their activations
    over one slow link."""
    return PUSH_WRITE_TIMEOUT + transfer_allowance(sum(m.hidden.nbytes for m in msgs))


#: `members(peer)`: that daemon's current record in this model's swarm (a DHT lookup), or None.
Membership = Callable[[str], Awaitable[ServerRecord | None]]


def serves(record: ServerRecord, block: int) -> bool:
    """Whether a record says its daemon is up and serves `block` now."""
    return record.state == "online" and record.start_block <= block < record.end_block \
        and record.expires_at > time.time()


class PushRefused(PetalsError):
    """A push target this daemon will not forward to (not a swarm member serving the next block,
    or its address and peer id disagree)."""


@dataclass
class LinkActivity:
    """What the idle-connection sweeper reads of a link (same shape as a session: peer, steps)."""

    peer: str
    steps: int = 0


@dataclass(eq=False)
class _Push:
    msg: InferenceStep
    written: trio.Event = field(default_factory=trio.Event)  # set once written, dropped or failed


@dataclass
class _Link:
    peer: str
    queue: trio.MemorySendChannel[_Push]  # pushes waiting for the writer (or for the stream)
    activity: LinkActivity
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # ends the link's task
    stream: FramedStream | None = None  # set once open
    writes: int = 0  # writes under way on the stream (pushes arriving meanwhile queue up)
    last_push: float = field(default_factory=trio.current_time)
    broken: bool = False  # a write failed or was cut: reset the stream instead of closing it
    record: ServerRecord | None = None  # the peer's swarm record, once looked up (before dialling)
    # Large pushes waiting for the next daemon's PushLanded, by (its session id, step)
    landing: dict[tuple[bytes, int], trio.Event] = field(default_factory=dict)


@dataclass
class Forwarder:
    """Pushes steps to next daemons over pooled outbound streams (see the module docstring)."""

    host: Any  # libp2p IHost
    nursery: trio.Nursery
    max_frame_size: int
    members: Membership  # who may be dialled (see the module docstring)
    idle_timeout: float = LINK_IDLE_TIMEOUT
    queue_size: int = LINK_QUEUE_SIZE
    _links: dict[str, _Link] = field(default_factory=dict)
    _addr_peers: dict[str, str] = field(default_factory=dict)  # push address -> the peer it names
    _non_members: dict[str, float] = field(default_factory=dict)  # refused peer -> until when
    _known: dict[str, ServerRecord] = field(default_factory=dict)  # swarm records learnt in the background
    #: Called after dialling a next daemon through a relay, before its stream opens: may replace
    #: the relayed connection with a punched one (petalsd/reachability.py). Bounded, never raises.
    direct_path: Callable[[ID], Awaitable[None]] | None = None
    pushes_sent: int = 0  # steps written to next daemons
    push_writes: int = 0  # stream writes that carried them (fewer when a batch's pushes coalesce)
    pushes_landed: int = 0  # large pushes the next daemon confirmed (PushLanded)

    def activity(self) -> list[LinkActivity]:
        """One entry per open link: pushes count as activity on the connection to that peer."""
        return [link.activity for link in self._links.values()]

    async def push(self, target: PushTarget, msg: InferenceStep) -> trio.Event | None:
        """Send `msg` to the daemon `target` names; returns once it is written (or queued while the
        link opens, or dropped: delivery failures are logged, never raised; bounded by
        `write_deadline`). PushRefused for a bad target. For a push the next daemon confirms
        (`confirms_landing`), an event set when the next daemon says it arrived whole (or the link ends)."""
        peer = peer_id_to_text(target.peer_id)
        dialled = self._peer_of_addr(target.addr)
        if dialled != peer:
            raise PushRefused(f"push address {target.addr[:80]!r} names peer {dialled}, not {peer}")
        if self._non_members.get(peer, 0.0) > trio.current_time():
            raise PushRefused(f"push target {peer} is not a swarm member serving block {target.start_block}")
        link = self._links.get(peer) or self._open_link(peer, target.start_block)
        if link.record is not None and not serves(link.record, target.start_block) \
                and (known := self._known.get(peer)) is not None and serves(known, target.start_block):
            # The record read when the link opened expires (record_ttl) while the link lives on:
            # the one learnt since in the background says whether the daemon still serves.
            link.record = known
        if link.record is not None and not serves(link.record, target.start_block):
            raise PushRefused(f"push target {peer} does not serve block {target.start_block} (its record: "
                              f"blocks {link.record.start_block}:{link.record.end_block}, {link.record.state})")
        link.last_push = trio.current_time()
        landed = None
        if confirms_landing(msg):
            if len(link.landing) >= LANDING_MAX:  # a next daemon that never confirms: stop waiting on it
                self._release_landing(link)
            landed = link.landing[(msg.session_id, msg.step)] = trio.Event()
        if link.stream is None or link.writes or link.queue.statistics().current_buffer_used:
            # A write is under way (the steps of a batch finish together): queue behind it, and
            # the writer sends everything queued meanwhile in one write.
            written = self._enqueue(link, _Push(msg))
            if link.stream is not None:
                with trio.move_on_after(write_deadline([msg])):
                    await written.wait()
            return landed
        link.writes += 1  # the link is idle: write at once (no task switch on a lone session's path)
        try:
            with trio.fail_after(write_deadline([msg])):
                await link.stream.send(msg)
            link.activity.steps += 1
            self.pushes_sent += 1
            self.push_writes += 1
        except (PetalsError, trio.TooSlowError) as exc:
            log.info("push to peer=%s failed, link closed: %s", peer, exc)
            link.broken = True
            self._forget(link)
        finally:
            link.writes -= 1
        return landed

    def _peer_of_addr(self, addr: str) -> str:
        """The peer id a push address dials. Parsing a multiaddr is slow enough to show on the critical
        path of every pushed step (BENCHMARKS.md, "Push forwarding"), and a session pushes to the
        same few addresses: remember them."""
        dialled = self._addr_peers.get(addr)
        if dialled is None:
            try:
                dialled = str(parse_peer_multiaddr(addr).peer_id)
            except Exception as exc:  # noqa: BLE001 - multiaddr parsing raises many types
                raise PushRefused(f"push address {addr[:80]!r} is not a dialable multiaddr: {exc}") from exc
            if len(self._addr_peers) >= ADDR_CACHE_SIZE:
                self._addr_peers.clear()  # bounded: a peer sending ever new addresses gains nothing
            self._addr_peers[addr] = dialled
        return dialled

    def _enqueue(self, link: _Link, push: _Push) -> trio.Event:
        try:
            link.queue.send_nowait(push)
        except trio.WouldBlock:
            log.warning("push queue to peer=%s is full (%d); dropped a step of session %s", link.peer,
                        self.queue_size, push.msg.session_id.hex()[:12])
            push.written.set()
            if (landed := link.landing.pop((push.msg.session_id, push.msg.step), None)) is not None:
                landed.set()
        return push.written

    def _open_link(self, peer: str, block: int) -> _Link:
        send, receive = trio.open_memory_channel[_Push](self.queue_size)
        link = _Link(peer=peer, queue=send, activity=LinkActivity(peer))
        self._links[peer] = link
        self.nursery.start_soon(self._run_link, link, block, receive)
        return link

    def learn(self, records: list[ServerRecord]) -> None:
        """The swarm's records, from a periodic lookup: a first push to a daemon among them needs
        no lookup of its own (a replacement hop's first pushed step is on a client's clock)."""
        self._known = {peer_id_to_text(r.peer_id): r for r in records[:ADDR_CACHE_SIZE]}

    async def _member_record(self, peer: str, block: int) -> ServerRecord:
        """The peer's swarm record if it serves `block`; else PushRefused (remembered a while)."""
        known = self._known.get(peer)
        if known is not None and serves(known, block):
            return known
        try:
            record = await self.members(peer)
        except PetalsError as exc:
            log.info("push target peer=%s: record lookup failed: %s", peer, exc)
            record = None
        if record is None or not serves(record, block):
            if len(self._non_members) >= ADDR_CACHE_SIZE:
                self._non_members.clear()
            self._non_members[peer] = trio.current_time() + NON_MEMBER_TTL
            what = "no swarm record" if record is None else \
                f"blocks {record.start_block}:{record.end_block}, {record.state}"
            raise PushRefused(f"push target {peer} is not a swarm member serving block {block} ({what})")
        return record

    async def _dial(self, record: ServerRecord, peer: str) -> Any:
        """Connect to the peer at the addresses of its own record (never at a client's): direct
        addresses first; through a relay, the hole-punch hook may then replace that connection."""
        failure: BaseException | None = None
        for addr in sorted(record.addrs, key=is_circuit):  # direct first, relays after
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer}"
            try:
                peer_id = await connect(self.host, full)
            except (PetalsError, OSError) as exc:
                failure = exc
                continue
            if self.direct_path is not None and is_circuit(full):
                await self.direct_path(peer_id)  # may swap the relayed connection for a punched one
            return peer_id
        raise PushRefused(f"push target {peer}: none of its {len(record.addrs)} announced addresses answered "
                          f"({failure})")

    def _forget(self, link: _Link) -> None:
        """Take the link out of the pool and end its task (idempotent); nobody waits for a
        PushLanded that cannot come any more."""
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
        link.queue.close()
        link.scope.cancel()
        self._release_landing(link)

    @staticmethod
    def _release_landing(link: _Link) -> None:
        for landed in link.landing.values():
            landed.set()
        link.landing.clear()

    async def _run_link(self, link: _Link, block: int, queue: trio.MemoryReceiveChannel[_Push]) -> None:
        """The link's task: open the stream, then write what is queued until the link is idle or
        broken, and close it. Never raises (it runs in the daemon's nursery): every ending is logged."""
        stream: FramedStream | None = None
        try:
            with link.scope:
                with trio.fail_after(LINK_OPEN_TIMEOUT):
                    link.record = await self._member_record(link.peer, block)
                    peer_id = await self._dial(link.record, link.peer)
                    stream = await open_stream(self.host, ID.from_base58(str(peer_id)), INFERENCE_PROTOCOL,
                                               nursery=self.nursery, max_frame_size=self.max_frame_size)
                log.info("push link open peer=%s", link.peer)
                link.stream = stream
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_replies, stream, link)
                    nursery.start_soon(self._close_when_idle, link)
                    try:
                        await self._write_pushes(stream, link, queue)
                    except (PetalsError, trio.TooSlowError) as exc:  # caught here: no exception group
                        log.info("push link to peer=%s broke: %s", link.peer, exc)
                        link.broken = True
                        link.scope.cancel()
        except (PetalsError, trio.TooSlowError, OSError) as exc:
            log.info("push link to peer=%s failed: %s", link.peer, exc)
        finally:
            self._forget(link)
            _release_unwritten(queue)
            if stream is not None:
                with suppress(PetalsError):
                    await (stream.reset() if link.broken else stream.aclose())

    async def _close_when_idle(self, link: _Link) -> None:
        while (left := link.last_push + self.idle_timeout - trio.current_time()) > 0:
            await trio.sleep(left)
        log.info("push link idle peer=%s: closing after %d pushes", link.peer, link.activity.steps)
        link.scope.cancel()

    async def _write_pushes(self, stream: FramedStream, link: _Link, queue: trio.MemoryReceiveChannel[_Push]) -> None:
        """Write queued pushes in order, everything queued at once in one write (up to
        `PUSH_COALESCE_MAX` messages)."""
        async for push in queue:
            batch = [push]
            while len(batch) < PUSH_COALESCE_MAX:
                try:
                    batch.append(queue.receive_nowait())
                except trio.WouldBlock:
                    break
            link.writes += 1
            try:
                msgs = [p.msg for p in batch]
                with trio.fail_after(write_deadline(msgs)):
                    await stream.send_many(msgs)
            finally:
                link.writes -= 1
                for p in batch:
                    p.written.set()
            link.activity.steps += len(batch)
            self.pushes_sent += len(batch)
            self.push_writes += 1

    async def _read_replies(self, stream: FramedStream, link: _Link) -> None:
        """Drain what the next daemon answers on this stream: PushLanded for large pushes (which
        releases their pushers' answers to their clients), and errors (its results go to the
        client), e.g. an unknown session after the client replaced it: logged, nothing else.
        When the stream ends, the whole link ends."""
        peer = link.peer
        while True:
            try:
                reply = await stream.receive()
            except PetalsError as exc:
                log.info("push link to peer=%s ended: %s", peer, exc)
                link.scope.cancel()
                return
            if isinstance(reply, PushLanded):
                landed = link.landing.pop((reply.session_id, reply.step), None)
                if landed is not None:
                    landed.set()
                    self.pushes_landed += 1
            elif isinstance(reply, ErrorReply):
                log.info("push refused by peer=%s: %s %s", peer, reply.code.value, reply.message[:200])
            else:
                log.info("unexpected %s from peer=%s on a push link", type(reply).__name__, peer)


def _release_unwritten(queue: trio.MemoryReceiveChannel[_Push]) -> None:
    """The link ended: drop what it had not written (the clients fall back, see the module
    docstring) and release whoever waits for those writes."""
    while True:
        try:
            queue.receive_nowait().written.set()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    queue.close()
