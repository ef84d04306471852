"""Where a decode step's time goes, read off the wire: the link emulator's packet trace.

The processes' own accounts (benchmarks/wan_client.py's `StepSplit`: the client's timer and each
daemon's step-time counters) leave one lump, "the network", that mixes the link's delay with our
message path at both ends of every leg (waking up, TCP, Noise, yamux, framing). The emulator sees
every packet, and every host of the lab reads the same monotonic clock, so its trace
(tests/system/linkemu.py, `trace`) splits a step without touching the processes measured:

- a *leg*: from the first packet of a step's message reaching the emulator (the sender's kernel
  let it go) to the last packet of it being handed to the receiver's TUN: the configured delay,
  the uplink's serialisation, jitter, and the emulator's own lateness;
- a host's *dwell*: from the last packet of the message it got to the first packet of the message
  it sent on: everything the host did, the receive path, the compute and the send path included;
- the client's dwell: from its result's last packet to the first packet of its next step.

A message is the run of data packets (TCP payload > 0) on one link that reached the emulator
within `MESSAGE_GAP` of each other; the step's message is the first of at least `min_bytes`
(the activations' size: window updates, acknowledgements and pings are smaller). From the client
the chain is followed host by host, each taking the first such message it sent after the one it
got (a daemon pushes to the next before it answers its client, so this is the critical path).
"""
from __future__ import annotations

import statistics
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

#: Packets of one message leave within this of each other; a decode step's next message on the same
#: link comes a whole token later. Not "at once": a sender that paces (TCP BBR, this VM's default)
#: lets a message of three packets go as two, then one 0.3-0.6 ms later (BENCHMARKS.md).
MESSAGE_GAP = 0.002


@dataclass(frozen=True)
class Message:
    src: str
    dst: str
    sent: float  # its first packet reached the emulator
    delivered: float  # its last packet was handed to the receiver
    payload: int


def messages(trace: Iterable[Sequence], names: dict[str, str]) -> list[Message]:
    """Group the trace's data packets (arrived, delivered, src ip, dst ip, payload) into messages."""
    open_: dict[tuple[str, str], list[float]] = {}  # link -> [first sent, last sent, last delivered, payload]
    out: list[Message] = []
    for arrived, delivered, src_ip, dst_ip, payload in sorted(trace, key=lambda p: p[0]):
        if payload <= 0 or src_ip not in names or dst_ip not in names:
            continue
        link = (names[src_ip], names[dst_ip])
        current = open_.get(link)
        if current is not None and arrived - current[1] <= MESSAGE_GAP:
            current[1], current[2], current[3] = arrived, max(current[2], delivered), current[3] + payload
            continue
        if current is not None:
            out.append(Message(*link, current[0], current[2], int(current[3])))
        open_[link] = [arrived, arrived, delivered, payload]
    out.extend(Message(*link, c[0], c[2], int(c[3])) for link, c in open_.items())
    return sorted(out, key=lambda m: m.sent)


@dataclass
class StepPath:
    """One step along the chain: the hosts in order (client first and last) and each part's seconds."""

    hosts: list[str]
    legs: list[float]  # len(hosts) - 1
    dwell: list[float]  # the daemons' (hosts[1:-1])
    sent: float  # the client's step left
    returned: float  # its result was back at the client


def follow(sent_by: dict[str, list[Message]], client: str, after: float, min_bytes: int,
           horizon: float = 5.0) -> StepPath | None:
    """The step whose message the client sent first after `after`, followed to its result
    (`sent_by`: each host's messages in the order they were sent)."""
    def first(host: str, since: float) -> Message | None:
        sent = sent_by.get(host, [])
        start = bisect_left(sent, since, key=lambda m: m.sent)
        return next((m for m in islice(sent, start, None) if m.payload >= min_bytes), None)

    msg = first(client, after)
    if msg is None:
        return None
    path = StepPath([client, msg.dst], [msg.delivered - msg.sent], [], msg.sent, 0.0)
    while msg.dst != client:
        host = msg.dst
        nxt = first(host, msg.delivered)
        if nxt is None or nxt.sent - path.sent > horizon or len(path.hosts) > 32:
            return None
        path.dwell.append(nxt.sent - msg.delivered)
        path.legs.append(nxt.delivered - nxt.sent)
        path.hosts.append(nxt.dst)
        msg = nxt
    path.returned = msg.delivered
    return path


@dataclass
class PacketSplit:
    """Medians over the steps that took the most common chain."""

    steps: int
    chain: list[str]
    legs_s: list[float]
    dwell_s: dict[str, float]
    client_s: float | None  # result back to the next step out (None with one step per window set)
    on_wire_s: float  # the client's step out to its result back
    others: int = 0  # steps that took another chain (not in the medians)
    unmatched: int = 0  # windows where no step could be followed


def split(trace: Iterable[Sequence], names: dict[str, str], client: str,
          generations: Sequence[Sequence[tuple[float, float]]], min_bytes: int) -> PacketSplit | None:
    """Split the decode steps of `generations` (each the client's (start, end) monotonic times of
    its calls into the session, in order) by the packets of `trace`; None when no step matched."""
    sent_by: dict[str, list[Message]] = defaultdict(list)
    for m in messages(trace, names):
        sent_by[m.src].append(m)
    paths: list[StepPath] = []
    client_dwell: list[float] = []
    unmatched = 0
    for windows in generations:
        previous: StepPath | None = None
        for start, end in windows:
            path = follow(sent_by, client, start, min_bytes)
            if path is None or path.returned > end + 0.001:
                unmatched += 1
                previous = None
                continue
            if previous is not None and previous.hosts == path.hosts:
                client_dwell.append(path.sent - previous.returned)
            paths.append(path)
            previous = path
    if not paths:
        return None
    chain, _ = Counter(tuple(p.hosts) for p in paths).most_common(1)[0]
    same = [p for p in paths if tuple(p.hosts) == chain]
    med = statistics.median
    return PacketSplit(
        steps=len(same), chain=list(chain),
        legs_s=[med(p.legs[i] for p in same) for i in range(len(chain) - 1)],
        dwell_s={host: med(p.dwell[i] for p in same) for i, host in enumerate(chain[1:-1])},
        client_s=med(client_dwell) if client_dwell else None,
        on_wire_s=med(p.returned - p.sent for p in same), others=len(paths) - len(same), unmatched=unmatched)
