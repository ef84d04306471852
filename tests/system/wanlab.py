"""A WAN lab: hosts in network namespaces joined by the user-space link emulator (linkemu.py).

    link = LinkConfig(delay=0.025, jitter=0.001, loss=0.001, rate=100e6)
    with wan_lab("pw1", ["client", "d0", "d1"], natted=["home"], link=link) as lab:
        lab.ip("d0")               # the host's WAN address (198.18.0.0/24, RFC 2544's range)
        lab.prefix("home") + [...]  # run a command inside a host (for Popen argument lists)

Every public host has one interface, wan0, a TUN device of the emulator: any two hosts are one
emulated link apart (delay, jitter, loss; each host's uplink has `rate`). A natted host sits on
a LAN (a veth pair, no shaping) behind its own router, whose wan0 is on the emulated WAN and
which masquerades like natlab's routers (nobody on the WAN can dial in). Namespaces are
"<name>-<host>" ("<name>-<host>r" for a natted host's router); all of them and the emulator go
away when the `with` block exits, however it exits. Needs what natlab needs: root, iproute2,
iptables (`ensure_tools()`), and /dev/net/tun.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from linkemu import LinkConfig
from natlab import NatLab, _sh, leftover_namespaces, masquerade

WAN_PREFIX = "198.18.0."
LAN_ROUTER, LAN_HOST = "203.0.113.1", "203.0.113.2"  # every home LAN alike, as real ones are
EMULATOR = Path(__file__).with_name("linkemu.py")


@dataclass
class WanLab(NatLab):
    hosts: Sequence[str]
    natted: Sequence[str] = ()
    link: LinkConfig = field(default_factory=LinkConfig)
    emulator: subprocess.Popen[str] | None = None
    stats: dict = field(default_factory=dict)  # the emulator's own account, filled in by down()
    trace_packets: bool = False  # have the emulator record every TCP data packet it forwards
    # TCP congestion control of every host (None: the namespace's own, inherited from the machine):
    # a sender that paces (BBR) spreads a message of a few packets over its pacing timer
    congestion_control: str | None = None
    packets: list = field(default_factory=list)  # (arrived, delivered, src ip, dst ip, payload), by down()
    _folder: tempfile.TemporaryDirectory[str] | None = None

    def wan_hosts(self) -> list[str]:
        """The namespaces on the emulated WAN: public hosts and natted hosts' routers."""
        return [*self.hosts, *(f"{h}r" for h in self.natted)]

    def ip(self, host: str) -> str:
        """The address `host`'s programs listen on (a natted host's is on its LAN)."""
        if host in self.natted:
            return LAN_HOST
        return WAN_PREFIX + str(2 + self.wan_hosts().index(host))

    def namespaces(self) -> list[str]:
        return [self.ns(h) for h in (*self.wan_hosts(), *self.natted)]

    def up(self) -> None:
        self.down()
        for ns in self.namespaces():
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            if self.congestion_control:
                _sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                    f"net.ipv4.tcp_congestion_control={self.congestion_control}")
        self._folder = tempfile.TemporaryDirectory(prefix="wanlab-")
        config = Path(self._folder.name) / "link.json"
        config.write_text(json.dumps({
            **asdict(self.link), "prefix": 24, "stats": str(Path(self._folder.name) / "stats.json"),
            "trace": str(Path(self._folder.name) / "trace.json") if self.trace_packets else None,
            "cuts": str(Path(self._folder.name) / "cuts.json"),
            "hosts": [{"netns": self.ns(h), "ip": WAN_PREFIX + str(2 + i)} for i, h in enumerate(self.wan_hosts())],
        }))
        self.emulator = subprocess.Popen([sys.executable, str(EMULATOR), str(config)], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
        assert self.emulator.stdout is not None
        if self.emulator.stdout.readline().strip() != "ready":
            self.emulator.wait(5)
            raise RuntimeError(f"link emulator failed: {self.emulator.stderr.read() if self.emulator.stderr else ''}")
        for host in self.natted:
            self._home(host)

    def cut_connections(self, host: str, peer: str) -> list[tuple[str, int, str, int]]:
        """Drop every packet, from now on, of the TCP connections established between public hosts
        `host` and `peer`, without a reset to either end (a NAT that forgot its mappings); new
        connections between them pass. Returns the connections cut."""
        listed = subprocess.run([*self.prefix(host), "ss", "-Htn", "state", "established"], capture_output=True,
                                text=True, check=True).stdout
        cut = []
        for line in listed.splitlines():
            local, remote = line.split()[-2:]
            (a, a_port), (b, b_port) = local.rsplit(":", 1), remote.rsplit(":", 1)
            if b == self.ip(peer):
                cut.append((a, int(a_port), b, int(b_port)))
        assert self._folder is not None and self.emulator is not None
        cuts = Path(self._folder.name) / "cuts.json"
        cuts.write_text(json.dumps(cut))
        self.emulator.send_signal(signal.SIGUSR1)
        return cut

    def _home(self, host: str) -> None:
        router, home = self.ns(f"{host}r"), self.ns(host)
        inside, lan = f"i{self.name}{host}"[:15], f"h{self.name}{host}"[:15]
        _sh("ip", "link", "add", inside, "type", "veth", "peer", "name", lan)
        _sh("ip", "link", "set", inside, "netns", router)
        _sh("ip", "link", "set", lan, "netns", home)
        _sh("ip", "-n", router, "addr", "add", f"{LAN_ROUTER}/24", "dev", inside)
        _sh("ip", "-n", router, "link", "set", inside, "up")
        _sh("ip", "-n", home, "addr", "add", f"{LAN_HOST}/24", "dev", lan)
        _sh("ip", "-n", home, "link", "set", lan, "up")
        _sh("ip", "-n", home, "route", "add", "default", "via", LAN_ROUTER)
        masquerade(router, "wan0")

    def down(self) -> None:
        if self.emulator is not None:
            self.emulator.terminate()
            try:
                self.emulator.wait(10)
            except subprocess.TimeoutExpired:
                self.emulator.kill()
                self.emulator.wait()
            self.emulator = None
        if self._folder is not None:
            stats = Path(self._folder.name) / "stats.json"
            if stats.exists():
                self.stats = json.loads(stats.read_text())
            trace = Path(self._folder.name) / "trace.json"
            if trace.exists():
                self.packets = json.loads(trace.read_text())
            self._folder.cleanup()
            self._folder = None
        for ns in self.namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def wan_lab(name: str, hosts: Sequence[str], *, natted: Sequence[str] = (),
            link: LinkConfig | None = None, trace_packets: bool = False,
            congestion_control: str | None = None) -> Iterator[WanLab]:
    """Build the lab, yield it, and remove every namespace and the emulator however the block exits
    (`trace_packets`: the emulator's packet trace is in `lab.packets` afterwards)."""
    lab = WanLab(name, list(hosts), list(natted), link or LinkConfig(), trace_packets=trace_packets,
                 congestion_control=congestion_control)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


__all__ = ["LinkConfig", "WanLab", "leftover_namespaces", "wan_lab"]
