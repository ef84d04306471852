"""`petals ctl`: talk to the local daemon's control API over its Unix socket.

    petals ctl [--socket PATH] [--json] status|sessions|peers|metrics|drain|reload|stop

Without --socket (or $PETALSD_CONTROL_SOCKET) it finds the local daemons' sockets where they
create them (petals_protocol.localpaths): with one daemon running it talks to that one; with
several it lists them and asks which.

Plain standard library (http.client on an AF_UNIX socket): the tool must work in the smallest
install and must not import the daemon (client and daemon never import each other), so it only
knows the HTTP routes and renders whatever JSON comes back.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from petals_protocol.localpaths import SYSTEMD_CONTROL_SOCKET, candidate_sockets, control_socket_dir

DEFAULT_SOCKET = str(SYSTEMD_CONTROL_SOCKET)
SOCKET_ENV = "PETALSD_CONTROL_SOCKET"
#: Seconds to wait for the daemon; drain/reload/stop return once the action has started.
TIMEOUT = 30.0

#: command -> (HTTP method, path)
COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("GET", "/v1/status"),
    "sessions": ("GET", "/v1/sessions"),
    "peers": ("GET", "/v1/peers"),
    "metrics": ("GET", "/v1/metrics"),
    "drain": ("POST", "/v1/drain"),
    "reload": ("POST", "/v1/reload"),
    "stop": ("POST", "/v1/stop"),
}


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection whose transport is a Unix stream socket instead of TCP."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class CtlError(Exception):
    """A failure to show the user as one line."""


class SeveralDaemons(CtlError):
    """No socket was named and several daemons run here; the message lists them."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add `petals ctl`'s arguments to `parser` (the `ctl` subparser of `petals`)."""
    parser.add_argument("--socket", metavar="PATH",
                        help=f"control socket (default: ${SOCKET_ENV}, else the one running daemon's "
                             f"socket, found in {DEFAULT_SOCKET} or {control_socket_dir()}/)")
    parser.add_argument("--json", action="store_true", help="print the daemon's raw JSON")
    # dest differs from "command": the `petals` parser uses that name for its subcommand.
    parser.add_argument("ctl_command", metavar="command", choices=list(COMMANDS),
                        help="status, sessions, peers, metrics (Prometheus text), or an action: "
                             "drain (stop taking sessions, finish open ones), reload (re-read "
                             "the config), stop (drain, then exit)")


def socket_path(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """The socket to talk to: --socket, else $PETALSD_CONTROL_SOCKET, else the only live one
    (`CtlError` listing them when several daemons run, or saying where none was found)."""
    env = os.environ if environ is None else environ
    chosen = args.socket or env.get(SOCKET_ENV)
    if chosen:
        return chosen
    live = [path for path in candidate_sockets(env) if _answers(path)]
    if len(live) == 1:
        return str(live[0])
    if not live:
        folders = dict.fromkeys([str(SYSTEMD_CONTROL_SOCKET.parent), str(control_socket_dir(env))])
        raise CtlError(f"no running petalsd found (no live control socket in {' or '.join(folders)}); "
                       "give --socket PATH if it uses another one")
    lines = [f"{len(live)} daemons are running here; choose one with --socket PATH:"]
    for path in live:
        lines.append(f"  {path}  {_describe_daemon(str(path))}")
    raise SeveralDaemons("\n".join(lines))


def _answers(path: Any) -> bool:
    """Whether a daemon listens on `path` (a socket left by a killed daemon refuses)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _describe_daemon(path: str) -> str:
    try:
        status, _ctype, body = request(path, "GET", "/v1/status")
        data = json.loads(body) if status == 200 else {}
    except (CtlError, ValueError):
        data = {}
    peer = data.get("peer_id", "?")
    blocks = data.get("blocks")
    span = f"{blocks[0]}:{blocks[1]}" if isinstance(blocks, list) and len(blocks) == 2 else "?"
    return f"peer {peer}  blocks {span}  model {data.get('model', '?')}"


def request(path: str, method: str, target: str) -> tuple[int, str, bytes]:
    """One request; (status, content type, body). Connection failures become `CtlError`."""
    conn = UnixHTTPConnection(path)
    try:
        conn.request(method, target, headers={"Host": "localhost"})
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    except FileNotFoundError:
        raise CtlError(f"no control socket at {path}: is petalsd running? (choose another with "
                       f"--socket or ${SOCKET_ENV})") from None
    except PermissionError:
        raise CtlError(f"permission denied on {path}: run as the daemon's user, root, or a "
                       "member of its control_group") from None
    except ConnectionRefusedError:
        raise CtlError(f"{path} exists but nobody is listening: petalsd is not running "
                       "(a stale socket from a crash)") from None
    except TimeoutError:
        raise CtlError(f"petalsd did not answer on {path} within {TIMEOUT:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise CtlError(f"talking to {path} failed: {e}") from None
    finally:
        conn.close()


def metrics(path: str) -> dict[str, float]:
    """The daemon's /v1/metrics as {'name' or 'name{labels}': value} (Prometheus text, as written)."""
    status, _, body = request(path, "GET", "/v1/metrics")
    if status != 200:
        raise CtlError(f"{path}: /v1/metrics answered {status}: {body.decode(errors='replace')[:200]}")
    samples = (line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Execute `petals ctl`; 0 on success, 1 when the daemon answered with an error or could
    not be reached (the reason printed as one line on stderr)."""
    out = out or sys.stdout
    err = err or sys.stderr
    method, target = COMMANDS[args.ctl_command]
    try:
        path = socket_path(args)
        status, _ctype, body = request(path, method, target)
    except SeveralDaemons as e:
        if args.ctl_command == "status":  # a question about "the daemon": each one answers
            out.write(f"{e}\n")
            return 0
        print(f"petals ctl: {e}", file=err)  # an action needs one daemon named
        return 1
    except CtlError as e:
        print(f"petals ctl: {e}", file=err)
        return 1
    text = body.decode("utf-8", errors="replace")
    if status != 200:
        print(f"petals ctl: {args.ctl_command}: {_error_message(status, text)}", file=err)
        return 1
    if args.ctl_command == "metrics" or args.json:
        out.write(text if text.endswith("\n") else text + "\n")
        return 0
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        print(f"petals ctl: the daemon sent invalid JSON: {text[:200]!r}", file=err)
        return 1
    out.write(render(data))
    return 0


def _error_message(status: int, text: str) -> str:
    try:
        error = json.loads(text)["error"]
        return f"{error['message']} ({status} {error['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {text.strip()[:200]}"


# --------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            rows.append((prefix + key, f"{len(value)} entries"))
        else:
            rows.append((prefix + key, _cell(value)))
    return rows


def render_mapping(data: Mapping[str, Any]) -> str:
    """`key: value` lines, nested mappings flattened to dotted keys, keys aligned."""
    rows = _flatten(data)
    if not rows:
        return "(empty)\n"
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k + ':':<{width + 1}} {v}\n" for k, v in rows)


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A column-aligned table; columns are keys in order of first appearance."""
    if not rows:
        return "(none)\n"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def render(data: Any) -> str:
    if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
        return render_table(data)
    if isinstance(data, Mapping):
        return render_mapping(data)
    return json.dumps(data, indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m petals_client.ctl ...`), for when `petals` is not wired."""
    parser = argparse.ArgumentParser(prog="petals ctl", description=__doc__.splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
