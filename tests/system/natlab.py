"""A NAT lab in Linux network namespaces: one public network and hosts behind masquerading routers.

    with nat_lab("pl1") as lab:          # removed on exit, even when the test fails
        lab.run("pub", "ip", "addr")     # or lab.prefix("home") + [cmd...] for Popen

Hosts (namespace names are "<name>-<host>"):
  pub    198.51.100.1  the public network (a bridge): bootstrap daemons, relays, clients
  home   203.0.113.2   behind router rtr (198.51.100.2 outside): masquerading NAT, it can dial
                       out to 198.51.100.0/24 and nobody can dial in (unsolicited connections
                       to the router are dropped, as a home router's firewall does)
  home2  192.0.2.2     behind its own router rtr2 (198.51.100.3 outside), for hole punching

Only documentation (TEST-NET) addresses are used, inside namespaces the lab made; nothing is
routed outside them. Needs root, iproute2 and iptables; `ensure_tools()` installs iptables with
apt-get when it is missing (a fresh CI machine), `lab_available()` says whether the lab can run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PUBLIC_IP = "198.51.100.1"
ROUTER_IPS = {"home": "198.51.100.2", "home2": "198.51.100.3"}
HOME_IPS = {"home": "203.0.113.2", "home2": "192.0.2.2"}
_ROUTERS = {"home": ("rtr", "203.0.113.1", "a"), "home2": ("rtr2", "192.0.2.1", "b")}


class LabError(RuntimeError):
    """The lab could not be built (not root, a tool missing, a command refused)."""


def _sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()[:300]}")


def ensure_tools() -> str | None:
    """None when root, `ip` and `iptables` are there (installing iptables if needed), else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (apt-get install -y iproute2)"
    if shutil.which("iptables") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "iptables"]):
            subprocess.run(cmd, capture_output=True, env=env, timeout=600)
        if shutil.which("iptables") is None:
            return "needs iptables and apt-get could not install it"
    probe = subprocess.run(["ip", "netns", "add", "petals-probe"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", "petals-probe"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()[:200]}"
    return None


@dataclass
class NatLab:
    name: str

    def ns(self, host: str) -> str:
        return f"{self.name}-{host}"

    def prefix(self, host: str) -> list[str]:
        """Run what follows inside `host`'s namespace (for subprocess argument lists)."""
        return ["ip", "netns", "exec", self.ns(host)]

    def run(self, host: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(host), *cmd], capture_output=True, text=True, timeout=timeout)

    def python(self, host: str, folder: Path) -> str:
        """A `python` that runs inside `host`'s namespace (for tools that take an interpreter path)."""
        wrapper = folder / f"python-{self.name}-{host}"
        wrapper.write_text(f'#!/bin/sh\nexec {" ".join(self.prefix(host))} {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper)

    def namespaces(self) -> list[str]:
        return [self.ns(h) for h in ("pub", "rtr", "home", "rtr2", "home2")]

    def down(self) -> None:
        for ns in self.namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def up(self) -> None:
        self.down()
        pub = self.ns("pub")
        bridge = f"br{self.name}"[:15]
        _sh("ip", "netns", "add", pub)
        _sh("ip", "-n", pub, "link", "set", "lo", "up")
        _sh("ip", "-n", pub, "link", "add", bridge, "type", "bridge")
        _sh("ip", "-n", pub, "addr", "add", f"{PUBLIC_IP}/24", "dev", bridge)
        _sh("ip", "-n", pub, "link", "set", bridge, "up")
        for home, (router, inside_ip, tag) in _ROUTERS.items():
            self._nat_router(bridge, home, router, inside_ip, tag)

    def _nat_router(self, bridge: str, home: str, router: str, inside_ip: str, tag: str) -> None:
        """`home` behind `router`: a masquerading NAT that forwards only replies inwards."""
        pub, rtr, hns = self.ns("pub"), self.ns(router), self.ns(home)
        short = self.name[:8] + tag
        up_pub, up_rtr, in_home, in_rtr = f"p{short}", f"r{short}", f"h{short}", f"i{short}"
        _sh("ip", "netns", "add", rtr)
        _sh("ip", "netns", "add", hns)
        _sh("ip", "link", "add", up_pub, "type", "veth", "peer", "name", up_rtr)
        _sh("ip", "link", "set", up_pub, "netns", pub)
        _sh("ip", "link", "set", up_rtr, "netns", rtr)
        _sh("ip", "link", "add", in_home, "type", "veth", "peer", "name", in_rtr)
        _sh("ip", "link", "set", in_home, "netns", hns)
        _sh("ip", "link", "set", in_rtr, "netns", rtr)
        _sh("ip", "-n", pub, "link", "set", up_pub, "master", bridge)
        _sh("ip", "-n", pub, "link", "set", up_pub, "up")
        _sh("ip", "-n", rtr, "addr", "add", f"{ROUTER_IPS[home]}/24", "dev", up_rtr)
        _sh("ip", "-n", rtr, "addr", "add", f"{inside_ip}/24", "dev", in_rtr)
        for dev in (up_rtr, in_rtr, "lo"):
            _sh("ip", "-n", rtr, "link", "set", dev, "up")
        _sh("ip", "-n", hns, "addr", "add", f"{HOME_IPS[home]}/24", "dev", in_home)
        for dev in (in_home, "lo"):
            _sh("ip", "-n", hns, "link", "set", dev, "up")
        _sh("ip", "-n", hns, "route", "add", "default", "via", inside_ip)
        masquerade(rtr, up_rtr)


def masquerade(router_ns: str, outside: str) -> None:
    """Make `router_ns` a home router: masquerade out of `outside`, forward only replies inwards."""
    ex = ["ip", "netns", "exec", router_ns]
    _sh(*ex, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _sh(*ex, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", outside, "-j", "MASQUERADE")
    _sh(*ex, "iptables", "-A", "FORWARD", "-i", outside, "-m", "state", "--state", "ESTABLISHED,RELATED",
        "-j", "ACCEPT")
    _sh(*ex, "iptables", "-A", "FORWARD", "-i", outside, "-j", "DROP")
    # Like a home router's firewall: unsolicited connections to the router itself are dropped,
    # not answered with a reset (which would also make a hole punch a race against the RST).
    _sh(*ex, "iptables", "-A", "INPUT", "-i", outside, "-p", "tcp", "-m", "state", "--state", "NEW",
        "-j", "DROP")


@contextmanager
def nat_lab(name: str) -> Iterator[NatLab]:
    """Build the lab, yield it, and remove every namespace it made however the block exits."""
    lab = NatLab(name)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def leftover_namespaces(lab: NatLab) -> Sequence[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return [ns for ns in lab.namespaces() if ns in names]
