"""sd_notify without libsystemd: tell systemd (or any supervisor speaking the protocol) when the
daemon is ready, reloading, stopping, what it is doing, and that it is still alive.

The protocol is one datagram per message to the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
or "@name" for the abstract namespace), each datagram newline-separated KEY=VALUE lines. With
$NOTIFY_SOCKET unset every method is a no-op, so the daemon calls them unconditionally.

Sending never raises: a supervisor that went away must not take the daemon down. The first
failure is logged as a warning, later ones at debug level, so a broken socket cannot flood the
journal.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)


@dataclass
class Notifier:
    """Sends sd_notify messages to `address` (None: do nothing).

    `watchdog_usec` is systemd's WatchdogSec in microseconds (None: no watchdog), honoured only
    when `watchdog_pid` is None or our own pid (systemd sets WATCHDOG_PID so that a child that
    inherited the environment does not ping on its parent's behalf).
    """

    address: str | None
    watchdog_usec: int | None = None
    watchdog_pid: int | None = None
    _sock: socket.socket | None = field(default=None, init=False, repr=False)
    _failed_once: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; malformed numbers mean "unset"."""
        env = os.environ if environ is None else environ
        return cls(address=env.get("NOTIFY_SOCKET") or None,
                   watchdog_usec=_positive_int(env.get("WATCHDOG_USEC")),
                   watchdog_pid=_positive_int(env.get("WATCHDOG_PID")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=VALUE lines; True if it was sent. Never raises."""
        if self.address is None:
            return False
        payload = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                # Non-blocking: a supervisor with a full queue must not stall the event loop.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, target)
            return True
        except OSError as e:
            level = logging.DEBUG if self._failed_once else logging.WARNING
            log.log(level, "sd_notify to %s failed: %s", self.address, e)
            self._failed_once = True
            return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup finished (or a reload completed); systemd marks the unit active."""
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """STATUS=...: one line shown by `systemctl status`."""
        return self.send(STATUS=text.replace("\n", " "))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: the daemon began shutting down (drain)."""
        return self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (the CLOCK_MONOTONIC time the reload began), which
        Type=notify-reload requires to match the reload to the request; send `ready()` when
        the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog(self) -> bool:
        """WATCHDOG=1: still alive. systemd kills the unit when pings stop for WatchdogSec."""
        return self.send(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WatchdogSec as sd_watchdog_enabled(3) recommends, or
        None when there is no watchdog for this process."""
        if self.address is None or self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None
        return self.watchdog_usec / 2 / 1e6

    async def run_watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping at `watchdog_interval()` until cancelled; return at once when there is no
        watchdog. Pinging from the event loop is the point: if the loop hangs (a blocking call
        on the trio thread), pings stop and systemd restarts the daemon. A healthy loop is not
        enough: while `healthy()` is False (a compute job hung past step_timeout) no ping is sent
        either."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            if healthy():
                self.watchdog()
            else:
                log.warning("not pinging the watchdog: a compute job runs past step_timeout")
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _positive_int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        log.warning("ignoring malformed sd_notify variable value %r", text)
        return None
    return value if value > 0 else None
