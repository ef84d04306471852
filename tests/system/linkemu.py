"""A user-space WAN emulator: one TUN device per host namespace, packets held for the link's delay.

This kernel has no `netem` qdisc, so delay, jitter and loss cannot be set with `tc`. Instead every
host of the lab gets a TUN device (`wan0`) whose packets this process reads; it forwards each one
to the TUN of the host owning the destination address after:

- the sender's uplink serialises it (`rate`: a packet leaves when the previous one has, plus its
  bits / rate; the uplink is shared by all of that host's destinations, as at home);
- it travels the one-way `delay`, plus a uniform draw in [-jitter, +jitter];
- it is dropped with probability `loss` (a lost packet is retransmitted by TCP, as on a WAN).

Order is preserved per (source, destination) link: a packet is never delivered before the one
sent ahead of it on the same link (jitter only ever delays), as on one path of a real network.

    python linkemu.py CONFIG.json     # prints "ready" once every TUN is up; SIGTERM ends it

CONFIG: {"delay": s, "jitter": s, "loss": p, "rate": bits/s, "mtu": n, "seed": n,
         "hosts": [{"netns": "...", "ip": "198.18.0.2"}, ...], "prefix": 24, "stats": "path.json",
         "trace": "trace.json" or null, "cuts": "cuts.json" or null}

Cutting live connections (a NAT that forgets its mappings, a path that fails without a reset): on
SIGUSR1 the emulator reads `cuts`, a JSON list of [ip, port, ip, port], and from then on drops
every packet of those TCP connections, either way; new connections between the same hosts pass.
On exit it writes to `stats` how late each forwarded packet left against its due time and how
many it dropped, so a run can check the emulator kept to its own configured delay, and to
`trace` (if given) every TCP packet with data it forwarded: [arrived, delivered, src ip, dst ip, payload bytes].
"""
from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
DEVICE = "wan0"


@dataclass
class LinkConfig:
    delay: float = 0.025
    jitter: float = 0.0
    loss: float = 0.0
    rate: float = 100e6
    mtu: int = 1500
    seed: int = 0


@dataclass
class Uplink:
    """A host's uplink: when it finishes sending what it has been given so far."""

    free_at: float = 0.0


@dataclass
class Stats:
    forwarded: int = 0
    dropped: int = 0
    foreign: int = 0  # not IPv4, or to an address no host owns
    cut: int = 0  # packets of connections cut on purpose (`cuts`)
    lateness: list[float] = field(default_factory=list)  # seconds each packet left after its due time
    delays: list[float] = field(default_factory=list)  # seconds each packet was held, arrival to write

    def summary(self) -> dict[str, float | int]:
        late = sorted(self.lateness) or [0.0]
        return {"forwarded": self.forwarded, "dropped": self.dropped, "foreign": self.foreign, "cut": self.cut,
                "late_median_s": statistics.median(late), "late_p99_s": late[int(0.99 * (len(late) - 1))],
                "late_max_s": late[-1], "held_median_s": statistics.median(self.delays or [0.0])}


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"linkemu: ip {' '.join(args)}: {done.stderr.strip()}")


def attach(fd_name: str, netns: str, ip: str, prefix: int, mtu: int) -> None:
    """Move the TUN `fd_name` (made in this namespace) into `netns` as wan0 with address `ip`."""
    _ip("link", "set", "dev", fd_name, "netns", netns)
    _ip("-n", netns, "link", "set", "dev", fd_name, "name", DEVICE)
    _ip("-n", netns, "link", "set", "dev", DEVICE, "mtu", str(mtu), "txqueuelen", "10000")
    _ip("-n", netns, "addr", "add", f"{ip}/{prefix}", "dev", DEVICE)
    _ip("-n", netns, "link", "set", "dev", DEVICE, "up")


def _tcp_offset(packet: bytes) -> int | None:
    """Where an IPv4 packet's TCP header starts (after the IP header's options), or None if it
    carries no TCP."""
    return (packet[0] & 15) * 4 if packet[9] == 6 else None


class DueTimer:
    """A timerfd that epoll reports readable at an absolute monotonic time, to the microsecond.

    epoll's own timeout is whole milliseconds, rounded up (Python passes it to epoll_wait so): a
    packet due 0.2 ms from now would leave up to 0.8 ms late, and every packet of a step crosses
    the emulator, so that lateness was unconfigured delay added to every leg (a median of 0.26 ms
    per packet measured with UDP probes). Python 3.11 has no os.timerfd_create, hence ctypes."""

    _CLOCK_MONOTONIC = 1  # time.monotonic's clock on Linux
    _TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 0o4000, 0o2000000, 1

    class _Spec(ctypes.Structure):  # struct itimerspec: interval, then value; each (tv_sec, tv_nsec)
        _fields_ = [("interval_s", ctypes.c_long), ("interval_ns", ctypes.c_long),
                    ("value_s", ctypes.c_long), ("value_ns", ctypes.c_long)]

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(self._CLOCK_MONOTONIC, self._TFD_NONBLOCK | self._TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")

    def arm(self, due: float) -> None:
        """Fire at `due` (time.monotonic seconds; a time already past fires at once)."""
        ns = max(1, int(due * 1e9))  # an all-zero value would disarm it
        spec = self._Spec(0, 0, ns // 1_000_000_000, ns % 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, self._TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)  # the expiry count; reading it makes the fd unreadable again
        except BlockingIOError:
            pass


class Emulator:
    def __init__(self, link: LinkConfig, fds: dict[bytes, int]) -> None:
        self.link = link
        self.fds = fds  # packed IPv4 address -> the TUN fd of the host that owns it
        self.host_of = {fd: addr for addr, fd in fds.items()}
        self.uplinks = {fd: Uplink() for fd in fds.values()}
        self.last_due: dict[tuple[int, int], float] = {}
        self.queue: list[tuple[float, int, int, float, bytes]] = []  # (due, seq, dst fd, arrived, packet)
        self.seq = 0
        self.rng = random.Random(link.seed)
        self.stats = Stats()
        # (arrived, delivered, src, dst, bytes of TCP payload) of every forwarded TCP data packet, when
        # the config names a "trace" file: every host reads the same clock, so the time between a
        # packet a host got and the next it sent splits a step without touching the processes
        # measured (benchmarks/packet_split.py)
        self.trace: list[tuple[float, float, str, str, int]] | None = None
        # TCP connections whose packets are dropped, each as (src ip, src port, dst ip, dst port)
        # packed as in the packets, in both directions
        self.cuts: set[bytes] = set()

    def cut(self, connections: list[tuple[str, int, str, int]]) -> None:
        for a, a_port, b, b_port in connections:
            one = socket.inet_aton(a) + struct.pack("!H", a_port)
            other = socket.inet_aton(b) + struct.pack("!H", b_port)
            self.cuts |= {one + other, other + one}

    def _is_cut(self, packet: bytes) -> bool:
        tcp = _tcp_offset(packet)
        return tcp is not None and packet[12:16] + packet[tcp:tcp + 2] + packet[16:20] + packet[tcp + 2:tcp + 4] in self.cuts

    def receive(self, src: int, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[16:20] not in self.fds:
            self.stats.foreign += 1
            return
        dst = self.fds[packet[16:20]]
        if self.cuts and self._is_cut(packet):
            self.stats.cut += 1
            return
        if self.link.loss and self.rng.random() < self.link.loss:
            self.stats.dropped += 1
            return
        uplink = self.uplinks[src]
        uplink.free_at = max(now, uplink.free_at) + len(packet) * 8 / self.link.rate
        jitter = self.rng.uniform(-self.link.jitter, self.link.jitter) if self.link.jitter else 0.0
        key = (src, dst)
        due = max(self.last_due.get(key, 0.0), uplink.free_at + self.link.delay + jitter)
        self.last_due[key] = due
        self.seq += 1
        heapq.heappush(self.queue, (due, self.seq, dst, now, packet))

    def deliver(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            due, _, dst, arrived, packet = heapq.heappop(self.queue)
            try:
                os.write(dst, packet)
            except OSError:  # the destination's TUN is down or its queue full: the packet is lost
                self.stats.dropped += 1
                continue
            self.stats.forwarded += 1
            if self.trace is not None and (tcp := _tcp_offset(packet)) is not None:
                payload = struct.unpack("!H", packet[2:4])[0] - tcp - (packet[tcp + 12] >> 4) * 4
                if payload > 0:  # data, not a bare acknowledgement
                    self.trace.append((arrived, now, socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]),
                                       payload))
            self.stats.lateness.append(now - due)
            self.stats.delays.append(now - arrived)

    def run(self, stop: list[bool]) -> None:
        poller = select.epoll()
        for fd in self.fds.values():
            poller.register(fd, select.EPOLLIN)
        timer = DueTimer()
        poller.register(timer.fd, select.EPOLLIN)
        armed = None  # the due time the timer is set for: set again only when the queue's head changes
        while not stop:
            now = time.monotonic()
            self.deliver(now)
            if self.queue and self.queue[0][0] != armed:
                armed = self.queue[0][0]
                timer.arm(armed)
            for fd, _ in poller.poll(0.5):
                if fd == timer.fd:
                    timer.clear()
                    continue
                now = time.monotonic()
                while True:
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    self.receive(fd, packet, now)


def main(path: str) -> int:
    config = json.loads(open(path).read())
    link = LinkConfig(**{k: config[k] for k in ("delay", "jitter", "loss", "rate", "mtu", "seed") if k in config})
    try:  # ahead of the daemons it carries: a late forward is added delay that nobody configured
        os.setpriority(os.PRIO_PROCESS, 0, -5)
    except OSError:
        pass
    fds: dict[bytes, int] = {}
    for i, host in enumerate(config["hosts"]):
        name = f"wanemu{os.getpid() % 10000}x{i}"[:15]
        fd = open_tun(name)
        attach(name, host["netns"], host["ip"], config.get("prefix", 24), link.mtu)
        fds[socket.inet_aton(host["ip"])] = fd
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    emulator = Emulator(link, fds)
    if config.get("cuts"):
        signal.signal(signal.SIGUSR1, lambda *_: emulator.cut(json.loads(open(config["cuts"]).read())))
    if config.get("trace"):
        emulator.trace = []
    print("ready", flush=True)
    emulator.run(stop)
    if config.get("stats"):
        with open(config["stats"], "w") as out:
            json.dump(emulator.stats.summary(), out)
    if emulator.trace is not None:
        with open(config["trace"], "w") as out:
            json.dump(emulator.trace, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
