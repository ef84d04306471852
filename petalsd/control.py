"""The control API: HTTP/1.1 with JSON on a Unix socket (like Docker's), for `petals ctl` and curl.

    curl --unix-socket /run/petalsd/control.sock http://localhost/v1/status

Routes: GET /v1/status /v1/sessions /v1/peers /v1/metrics (Prometheus text 0.0.4),
POST /v1/drain /v1/reload /v1/stop. Errors are JSON: {"error": {"code": ..., "message": ...}}.

Who may talk to it is decided twice. The file mode keeps others from connecting at all (0600, or
0660 with a group); then SO_PEERCRED is checked on every connection, so a socket made reachable
by accident (a loose directory ACL, a bind mount) still refuses foreign uids with 403. The socket
is never exposed on TCP.

Bounds, so that one misbehaving local client cannot wedge the daemon: request heads up to
`MAX_HEAD_SIZE`, bodies up to `MAX_BODY_SIZE` (the API takes no input; bodies are read and
dropped), `READ_TIMEOUT` seconds to send a whole request (also the keep-alive idle limit) and at
most `MAX_CONNECTIONS` connections served at once (further ones wait in the accept backlog).

This module is sans-daemon: it calls a `ControlBackend` and knows nothing of sessions or peers.
"""
from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import math
import os
import socket
import stat
import struct
from http import HTTPStatus
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import h11
import trio

log = logging.getLogger(__name__)

MAX_HEAD_SIZE = 16 * 1024
MAX_BODY_SIZE = 64 * 1024
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
#: After an error reply, how long and how much unread input is discarded before closing.
LINGER_TIMEOUT = 1.0
MAX_LINGER_BYTES = 1 << 20
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
#: Linux getsockopt option for the peer's supplementary groups (not exported by Python).
SO_PEERGROUPS = 59
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """One Prometheus sample. Samples sharing a `name` form one metric family; their `type` and
    `help` must agree (the first one wins when rendering)."""

    name: str
    type: Literal["counter", "gauge", "untyped"]
    help: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render_metrics(metrics: Iterable[Metric]) -> str:
    """Prometheus text exposition format 0.0.4: per family one HELP and TYPE line, then its
    samples, families in order of first appearance."""
    families: dict[str, list[Metric]] = {}
    for m in metrics:
        families.setdefault(m.name, []).append(m)
    lines = []
    for name, samples in families.items():
        help_ = samples[0].help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {samples[0].type}")
        for s in samples:
            labels = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in s.labels.items())
            lines.append(f"{name}{{{labels}}} {_format_value(s.value)}" if labels
                         else f"{name} {_format_value(s.value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- backend


class ControlBackend(Protocol):
    """What the daemon provides to the control API. Every method returns JSON-able data; a
    method may raise `ControlError` to answer with a specific status (e.g. 409 while draining).
    drain/reload/stop must return promptly: they start the action, the reply says it started."""

    async def status(self) -> dict[str, Any]: ...
    async def sessions(self) -> list[dict[str, Any]]: ...
    async def peers(self) -> list[dict[str, Any]]: ...
    async def metrics(self) -> list[Metric]: ...
    async def drain(self) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...
    async def stop(self) -> dict[str, Any]: ...


class ControlError(Exception):
    """Raised by a backend method to answer with `status` and a JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ControlSocketError(OSError):
    """The control socket cannot be set up (path in use by a live daemon, not a socket, too
    long, unknown group). Fatal at start: the message says what to fix."""


#: (method, path) -> backend method name. The only routes there are.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/v1/status"): "status",
    ("GET", "/v1/sessions"): "sessions",
    ("GET", "/v1/peers"): "peers",
    ("GET", "/v1/metrics"): "metrics",
    ("POST", "/v1/drain"): "drain",
    ("POST", "/v1/reload"): "reload",
    ("POST", "/v1/stop"): "stop",
}


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> PeerCredentials:
    """The connecting process's pid/uid/gid as the kernel recorded them at connect()."""
    fmt = "3i"
    pid, uid, gid = struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       struct.calcsize(fmt)))
    return PeerCredentials(pid, uid, gid)


def _peer_groups(sock: Any) -> set[int]:
    """The peer's supplementary groups (Linux SO_PEERGROUPS); empty if the kernel lacks it."""
    for size in (4 * 256, 4 * 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            return set()
        return set(struct.unpack(f"{len(raw) // 4}I", raw))
    return set()


def is_allowed(creds: PeerCredentials, sock: Any, group_id: int | None) -> bool:
    """Root, the daemon's own uid, or (with a control group) a member of that group."""
    if creds.uid in (0, os.getuid()):
        return True
    if group_id is None:
        return False
    return creds.gid == group_id or group_id in _peer_groups(sock)


# --------------------------------------------------------------------------- HTTP


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json_reply(status: int, data: object) -> _Reply:
    return _Reply(status, (json.dumps(data, default=str, indent=None) + "\n").encode())


def _error_reply(status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> _Reply:
    return _Reply(status, (json.dumps({"error": {"code": code, "message": message}}) + "\n")
                  .encode(), headers=headers or [])


async def _route(backend: ControlBackend, method: str, target: str) -> _Reply:
    path = target.split("?", 1)[0]
    name = ROUTES.get((method, path))
    if name is None:
        allowed = sorted(m for (m, p) in ROUTES if p == path)
        if allowed:
            return _error_reply(405, "method_not_allowed", f"{path} accepts {', '.join(allowed)}",
                                [("allow", ", ".join(allowed))])
        return _error_reply(404, "not_found", f"no such endpoint: {path}; see /v1/status, "
                                              "/v1/sessions, /v1/peers, /v1/metrics")
    call: Callable[[], Awaitable[Any]] = getattr(backend, name)
    try:
        result = await call()
    except ControlError as e:
        return _error_reply(e.status, e.code, e.message)
    except Exception as e:  # a bug in one handler answers 500 instead of killing the daemon
        log.exception("control API %s %s failed", method, path)
        return _error_reply(500, "internal", f"{type(e).__name__}: {e}")
    if name == "metrics":
        return _Reply(200, render_metrics(result).encode(), METRICS_CONTENT_TYPE)
    return _json_reply(200, result)


class _Connection:
    """One client connection: h11 state machine + the stream it reads from and writes to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(16 * 1024)
            self.conn.receive_data(data)  # b"" marks EOF, which h11 turns into an event

    async def read_request(self) -> h11.Request | None:
        """The next request with its body drained, or None at EOF. Raises h11.RemoteProtocolError
        for malformed or oversized input."""
        event = await self.next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)
        received = 0
        while True:
            part = await self.next_event()
            if isinstance(part, h11.EndOfMessage):
                return event
            if isinstance(part, h11.Data):
                received += len(part.data)
                if received > MAX_BODY_SIZE:
                    raise h11.RemoteProtocolError("request body too large", 413)

    async def linger(self) -> None:
        """After an error reply to a request we did not read in full: stop writing and drop
        what the client still sends (bounded), so closing does not reset the connection and
        destroy the reply before the client read it."""
        await self.stream.send_eof()
        dropped = 0
        with trio.move_on_after(LINGER_TIMEOUT):
            while dropped < MAX_LINGER_BYTES and (data := await self.stream.receive_some(65536)):
                dropped += len(data)

    async def send(self, reply: _Reply, *, close: bool = False) -> None:
        headers = [("content-type", reply.content_type),
                   ("content-length", str(len(reply.body))), *reply.headers]
        if close:
            headers.append(("connection", "close"))
        data = self.conn.send(h11.Response(status_code=reply.status, headers=headers,
                                           reason=HTTPStatus(reply.status).phrase))
        data += self.conn.send(h11.Data(data=reply.body)) + self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)


async def _serve_connection(stream: trio.SocketStream, backend: ControlBackend,
                            group_id: int | None) -> None:
    """Serve requests on one connection until EOF, an error, idle timeout or `connection:
    close`. Never raises: a broken client only ends its own connection."""
    c = _Connection(stream)
    try:
        creds = peer_credentials(stream.socket)
        allowed = is_allowed(creds, stream.socket, group_id)
        while True:
            request = None
            with trio.move_on_after(READ_TIMEOUT):
                try:
                    request = await c.read_request()
                except h11.RemoteProtocolError as e:
                    if c.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await c.send(_error_reply(e.error_status_hint, "bad_request", str(e)),
                                     close=True)
                        await c.linger()
                    return
            if request is None:  # EOF or idle timeout
                return
            if not allowed:
                log.warning("control API: refused uid %d (pid %d)", creds.uid, creds.pid)
                await c.send(_error_reply(403, "forbidden", f"uid {creds.uid} may not use this "
                                          "socket; use the daemon's user, root or its control "
                                          "group"), close=True)
                return
            reply = await _route(backend, request.method.decode(), request.target.decode())
            await c.send(reply)
            if c.conn.our_state is h11.MUST_CLOSE:
                return
            c.conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
        log.debug("control API: client went away: %s", e)
    except h11.LocalProtocolError as e:
        log.warning("control API: %s", e)
    finally:
        await stream.aclose()


# --------------------------------------------------------------------------- socket setup


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left by a daemon that died; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"control socket path {path} exists and is not a socket; "
                                 "refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise ControlSocketError(f"cannot check existing control socket {path}: {e}") from e
    finally:
        probe.close()
    raise ControlSocketError(f"another process is serving control socket {path}; "
                             "is a second petalsd running?")


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(f"control group {group!r} does not exist") from None


async def _bind(path: Path, group_id: int | None) -> tuple[trio.socket.SocketType, int]:
    """Bind under a temporary name, set mode and group, then rename into place: the socket is
    never reachable at `path` with looser permissions, and listen() comes last, so nobody can
    connect before the mode is right. Returns the socket and its inode (to unlink only ours)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ControlSocketError(f"control socket path {path} is longer than "
                                 f"{MAX_SOCKET_PATH} bytes (the AF_UNIX limit)")
    _remove_stale_socket(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(tmp))
        os.chmod(tmp, 0o600 if group_id is None else 0o660)
        if group_id is not None:
            os.chown(tmp, -1, group_id)
        os.rename(tmp, path)
        sock.listen(MAX_CONNECTIONS)
        return sock, path.stat().st_ino
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise


async def serve_control(path: Path, backend: ControlBackend, *, group: str | None = None,
                        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control API on `path` until cancelled, then unlink the socket (only if it is
    still ours). Reports `path` through `task_status` once connections are accepted, so
    `await nursery.start(serve_control, ...)` returns when the API is up. Setup failures raise
    `ControlSocketError` (or OSError) before `started`."""
    path = Path(path)
    group_id = _group_id(group)
    sock, inode = await _bind(path, group_id)
    listener = trio.SocketListener(sock)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def serve_one(stream: trio.SocketStream, token: object) -> None:
        try:
            await _serve_connection(stream, backend, group_id)
        finally:
            limiter.release_on_behalf_of(token)

    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            log.info("control API listening on %s", path)
            while True:
                token = object()
                # Bounds concurrent connections: beyond the limit, clients wait in the backlog.
                await limiter.acquire_on_behalf_of(token)
                try:
                    stream = await listener.accept()
                except OSError as e:
                    limiter.release_on_behalf_of(token)
                    if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                        raise
                    log.warning("control API: accept failed (%s); retrying", e)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    limiter.release_on_behalf_of(token)
                    raise
                nursery.start_soon(serve_one, stream, token)
    finally:
        # Synchronous on purpose: an await here would be cancelled before the cleanup ran.
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == inode:
                path.unlink()
        sock.close()
