"""Where a daemon's control socket lives on its host: the one convention `petalsd` (which creates
the socket) and `petals ctl` (which looks for it) must share without importing each other.

- Under systemd the unit's RuntimeDirectory holds `control.sock` (`/run/petalsd/control.sock`).
- A daemon started in a terminal creates `<dir>/<peer>.sock`, `<dir>` being
  `$XDG_RUNTIME_DIR/petalsd` when that is set (a per-user tmpfs that only its user can enter),
  else `/run/petalsd` for root, else `/tmp/petalsd-<uid>` (created 0700 and checked to be ours).
  `<peer>` is the end of the daemon's peer id, so each daemon on a host has its own socket and
  keeps its path across restarts (its identity is persistent).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: The socket of the packaged systemd unit (RuntimeDirectory=petalsd).
SYSTEMD_CONTROL_SOCKET = Path("/run/petalsd/control.sock")
#: Characters of the peer id that name a daemon's socket: enough to tell daemons apart, short
#: enough for the AF_UNIX path limit (108 bytes) under a deep $XDG_RUNTIME_DIR.
PEER_SUFFIX = 12


def control_socket_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The folder where daemons started outside systemd put their control sockets."""
    env = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "petalsd"
    if uid == 0:
        return Path("/run/petalsd")
    return Path(f"/tmp/petalsd-{uid}")


def default_control_socket(peer_id: str, environ: Mapping[str, str] | None = None,
                           uid: int | None = None) -> Path:
    """The control socket of the daemon `peer_id` when none was configured."""
    return control_socket_dir(environ, uid) / f"{peer_id[-PEER_SUFFIX:]}.sock"


def candidate_sockets(environ: Mapping[str, str] | None = None, uid: int | None = None) -> list[Path]:
    """Every socket a local daemon may be listening on, for `petals ctl` to try: the systemd
    unit's, then each daemon's in the terminal folder (sorted). Stale ones are the caller's to
    tell apart (connecting to them is refused)."""
    found = [SYSTEMD_CONTROL_SOCKET] if SYSTEMD_CONTROL_SOCKET.exists() else []
    folder = control_socket_dir(environ, uid)
    try:
        found += sorted(p for p in folder.glob("*.sock") if p not in found)
    except OSError:
        pass
    return found
