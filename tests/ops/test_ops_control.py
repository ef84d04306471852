"""The control API with a fake backend through a real Unix socket, and `petals ctl` against it."""
from __future__ import annotations

import argparse
import grp
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from petals_client import ctl
from petalsd import control
from petalsd.control import ControlError, ControlSocketError, Metric, render_metrics, serve_control

T = TypeVar("T")
NOBODY = 65534


class FakeBackend:
    """Answers like a daemon would and records which actions were asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_with: BaseException | None = None

    async def _answer(self, name: str, value: Any) -> Any:
        self.calls.append(name)
        if self.fail_with is not None:
            raise self.fail_with
        return value

    async def status(self) -> dict[str, Any]:
        return await self._answer("status", {
            "state": "serving", "peer_id": "12D3KooWtest", "blocks": "0:4",
            "sessions": {"active": 2, "max": 32}, "ready": True, "addrs": ["/ip4/1.2.3.4/tcp/1"]})

    async def sessions(self) -> list[dict[str, Any]]:
        return await self._answer("sessions", [
            {"id": "ab12", "blocks": "0:4", "tokens": 17, "max_length": 256, "idle_s": 0.5},
            {"id": "cd34", "blocks": "1:3", "tokens": 3, "max_length": 2048, "idle_s": 12.25}])

    async def peers(self) -> list[dict[str, Any]]:
        return await self._answer("peers", [])

    async def metrics(self) -> list[Metric]:
        return await self._answer("metrics", [
            Metric("petalsd_sessions", "gauge", "Open sessions.", 2),
            Metric("petalsd_steps_total", "counter", "Steps.", 7, {"kind": "inference"}),
            Metric("petalsd_steps_total", "counter", "Steps.", 1, {"kind": "forward"})])

    async def drain(self) -> dict[str, Any]:
        return await self._answer("drain", {"state": "draining", "sessions_left": 2})

    async def reload(self) -> dict[str, Any]:
        return await self._answer("reload", {"applied": ["log_level"], "needs_restart": []})

    async def stop(self) -> dict[str, Any]:
        return await self._answer("stop", {"state": "stopping"})


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700), short enough for
    sun_path."""
    path = Path(tempfile.mkdtemp(prefix="petalsd-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def with_server(path: Path, backend: FakeBackend, client: Callable[[Path], T], *,
                group: str | None = None) -> T:
    """Serve the control API on `path` while `client(path)` runs in a thread; return its result
    after the server has shut down (so tests also see the cleanup)."""
    async def main() -> T:
        async with trio.open_nursery() as nursery:
            assert await nursery.start(lambda task_status: serve_control(
                path, backend, group=group, task_status=task_status)) == path
            result = await trio.to_thread.run_sync(client, path)
            nursery.cancel_scope.cancel()
        return result
    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # trio's nurseries wrap errors; tests want the error
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def get(path: Path, method: str, target: str, body: bytes | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    conn = ctl.UnixHTTPConnection(str(path), timeout=5)
    try:
        conn.request(method, target, body=body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_every_endpoint(sock_dir: Path) -> None:
    backend = FakeBackend()
    path = sock_dir / "control.sock"

    def client(path: Path) -> dict[str, Any]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        out = {}
        for method, target in control.ROUTES:
            status, headers, body = get(path, method, target)
            assert status == 200, (target, body)
            out[target] = (headers["content-type"], body)
        return out

    out = with_server(path, backend, client)
    assert backend.calls == ["status", "sessions", "peers", "metrics", "drain", "reload", "stop"]
    assert json.loads(out["/v1/status"][1])["sessions"] == {"active": 2, "max": 32}
    assert json.loads(out["/v1/sessions"][1])[1]["id"] == "cd34"
    assert json.loads(out["/v1/peers"][1]) == []
    assert json.loads(out["/v1/drain"][1]) == {"state": "draining", "sessions_left": 2}
    assert out["/v1/status"][0] == "application/json"
    assert out["/v1/metrics"][0] == "text/plain; version=0.0.4; charset=utf-8"
    assert b'petalsd_steps_total{kind="forward"} 1\n' in out["/v1/metrics"][1]
    assert not path.exists()  # unlinked on exit


def test_errors_and_keep_alive(sock_dir: Path) -> None:
    backend = FakeBackend()

    def client(path: Path) -> list[Any]:
        conn = ctl.UnixHTTPConnection(str(path), timeout=5)
        results = []
        for method, target in [("GET", "/v1/nope"), ("POST", "/v1/status"),
                               ("GET", "/v1/stop"), ("GET", "/v1/status?verbose=1")]:
            conn.request(method, target)
            r = conn.getresponse()
            results.append((r.status, r.getheader("allow"), json.loads(r.read())))
            results.append(conn.sock)  # the same socket each time: keep-alive
        conn.close()
        return results

    out = with_server(sock_dir / "c.sock", backend, client)
    (s404, _, b404), (s405, allow, b405), (s405b, allow_b, _), (s200, _, _) = out[0::2]
    assert len({id(s) for s in out[1::2]}) == 1
    assert (s404, b404["error"]["code"]) == (404, "not_found")
    assert (s405, allow, b405["error"]["code"]) == (405, "GET", "method_not_allowed")
    assert (s405b, allow_b, s200) == (405, "POST", 200)
    assert backend.calls == ["status"]


def test_backend_errors(sock_dir: Path) -> None:
    backend = FakeBackend()

    def client(path: Path) -> list[tuple[int, bytes]]:
        backend.fail_with = ControlError(409, "draining", "already draining")
        a = get(path, "POST", "/v1/drain")
        backend.fail_with = RuntimeError("boom")
        b = get(path, "GET", "/v1/status")
        backend.fail_with = None
        c = get(path, "GET", "/v1/status")
        return [(a[0], a[2]), (b[0], b[2]), (c[0], c[2])]

    (sa, ba), (sb, bb), (sc, _) = with_server(sock_dir / "c.sock", backend, client)
    assert sa == 409 and json.loads(ba)["error"] == {"code": "draining",
                                                     "message": "already draining"}
    assert sb == 500 and "boom" in json.loads(bb)["error"]["message"]
    assert sc == 200  # a failing handler does not take the server down


def raw_exchange(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_bounds(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.3)

    def client(path: Path) -> list[bytes]:
        big_body = b"x" * (control.MAX_BODY_SIZE + 1)
        return [
            raw_exchange(path, b"garbage\r\n\r\n"),
            raw_exchange(path, b"POST /v1/drain HTTP/1.1\r\nhost: x\r\ncontent-length: "
                         + str(len(big_body)).encode() + b"\r\n\r\n" + big_body),
            raw_exchange(path, b"GET /v1/status HTTP/1.1\r\nhost: x\r\nx-pad: "
                         + b"a" * (4 * control.MAX_HEAD_SIZE) + b"\r\n\r\n"),
            raw_exchange(path, b"GET /v1/status HTTP/1.1\r\n"),  # never finished: timeout
        ]

    bad, too_big, head_too_big, slow = with_server(sock_dir / "c.sock", FakeBackend(), client)
    assert bad.startswith(b"HTTP/1.1 400 ")
    assert too_big.startswith(b"HTTP/1.1 413 ")
    assert head_too_big.startswith(b"HTTP/1.1 431 ")
    assert slow == b""  # closed without an answer once READ_TIMEOUT passed


def test_socket_file_handling(sock_dir: Path) -> None:
    path = sock_dir / "c.sock"
    path.write_text("not a socket")
    with pytest.raises(ControlSocketError, match="not a socket"):
        with_server(path, FakeBackend(), lambda p: None)
    assert path.read_text() == "not a socket"
    path.unlink()

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: left by a crash, replaced
    assert with_server(path, FakeBackend(), lambda p: get(p, "GET", "/v1/status")[0]) == 200

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(ControlSocketError, match="another process"):
            with_server(path, FakeBackend(), lambda p: None)
    finally:
        live.close()
        path.unlink()

    with pytest.raises(ControlSocketError, match="longer than"):
        with_server(sock_dir / ("x" * 120), FakeBackend(), lambda p: None)
    with pytest.raises(ControlSocketError, match="does not exist"):
        with_server(path, FakeBackend(), lambda p: None, group="no-such-group-petalsd")
    assert sorted(os.listdir(sock_dir)) == []  # no temporary files left behind


def test_render_metrics() -> None:
    text = render_metrics([
        Metric("a_total", "counter", "Line1\nback\\slash", 3.0, {"x": 'q"u\\o\nte'}),
        Metric("b", "gauge", "B.", float("nan")),
        Metric("a_total", "counter", "ignored", 0.25, {"x": "y"}),
        Metric("c", "gauge", "C.", float("-inf")),
    ])
    assert text == (
        "# HELP a_total Line1\\nback\\\\slash\n# TYPE a_total counter\n"
        'a_total{x="q\\"u\\\\o\\nte"} 3\na_total{x="y"} 0.25\n'
        "# HELP b B.\n# TYPE b gauge\nb NaN\n# HELP c C.\n# TYPE c gauge\nc -Inf\n")


# --------------------------------------------------------------------------- other users


def _python_for_nobody() -> str | None:
    """An interpreter that uid 65534 can execute (the venv's may sit under /root, 0700)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        real = Path(os.path.realpath(candidate))
        chain = [real, *real.parents]
        if real.exists() and all(p.stat().st_mode & stat.S_IXOTH for p in chain):
            return candidate
    return None


CHILD = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", type(e).__name__)
    raise SystemExit
s.sendall(b"GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode().splitlines()[0])
print(data.decode().split("\r\n\r\n", 1)[1])
"""


def run_as(uid: int, gid: int, path: Path) -> str:
    python = _python_for_nobody()
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root and an interpreter uid 65534 can execute")

    def demote() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return subprocess.run([python, "-I", "-c", CHILD, str(path)], preexec_fn=demote,
                          capture_output=True, text=True, timeout=20, check=True).stdout


def test_other_uid_refused(sock_dir: Path) -> None:
    backend = FakeBackend()

    def client(path: Path) -> tuple[str, str]:
        blocked_by_mode = run_as(NOBODY, NOBODY, path)
        path.chmod(0o666)  # reachable by accident: SO_PEERCRED must still refuse
        return blocked_by_mode, run_as(NOBODY, NOBODY, path)

    by_mode, by_creds = with_server(sock_dir / "c.sock", backend, client)
    assert by_mode.strip() == "connect-error PermissionError"
    status_line, body = by_creds.splitlines()[:2]
    assert status_line == "HTTP/1.1 403 Forbidden"
    assert json.loads(body)["error"]["code"] == "forbidden"
    assert backend.calls == []


def test_control_group_member_allowed(sock_dir: Path) -> None:
    group = grp.getgrgid(NOBODY).gr_name
    backend = FakeBackend()

    def client(path: Path) -> str:
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, NOBODY)
        return run_as(NOBODY, NOBODY, path)

    out = with_server(sock_dir / "c.sock", backend, client, group=group)
    assert out.startswith("HTTP/1.1 200 ")
    assert backend.calls == ["status"]


# --------------------------------------------------------------------------- petals ctl


def ctl_run(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    ctl.configure_parser(parser)
    out, err = io.StringIO(), io.StringIO()
    code = ctl.run(parser.parse_args(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_ctl_output(sock_dir: Path) -> None:
    backend = FakeBackend()

    def client(path: Path) -> dict[str, tuple[int, str, str]]:
        s = ["--socket", str(path)]
        results = {c: ctl_run([*s, c]) for c in ("status", "sessions", "peers", "metrics",
                                                 "drain")}
        results["json"] = ctl_run([*s, "--json", "sessions"])
        backend.fail_with = ControlError(409, "draining", "already draining")
        results["error"] = ctl_run([*s, "drain"])
        return results

    r = with_server(sock_dir / "c.sock", backend, client)
    code, out, _ = r["status"]
    assert code == 0
    assert out.splitlines() == [
        "state:           serving",
        "peer_id:         12D3KooWtest",
        "blocks:          0:4",
        "sessions.active: 2",
        "sessions.max:    32",
        "ready:           yes",
        "addrs:           /ip4/1.2.3.4/tcp/1",
    ]
    assert r["sessions"][1].splitlines() == [
        "ID    BLOCKS  TOKENS  MAX_LENGTH  IDLE_S",
        "ab12  0:4     17      256         0.5",
        "cd34  1:3     3       2048        12.2",
    ]
    assert r["peers"][:2] == (0, "(none)\n")
    assert r["metrics"][1].startswith("# HELP petalsd_sessions Open sessions.\n")
    assert r["drain"][1] == "state:         draining\nsessions_left: 2\n"
    assert json.loads(r["json"][1])[0]["id"] == "ab12"
    assert r["error"] == (1, "", "petals ctl: drain: already draining (409 draining)\n")


def test_ctl_connection_errors(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = sock_dir / "missing.sock"
    code, out, err = ctl_run(["--socket", str(missing), "status"])
    assert (code, out) == (1, "")
    assert err.startswith(f"petals ctl: no control socket at {missing}: is petalsd running?")
    assert err.count("\n") == 1

    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_dir / "dead.sock"))
    dead.close()
    monkeypatch.setenv(ctl.SOCKET_ENV, str(sock_dir / "dead.sock"))
    code, _, err = ctl_run(["status"])
    assert code == 1 and "nobody is listening" in err


def test_ctl_explicit_socket_wins() -> None:
    ns = argparse.Namespace(socket=None)
    assert ctl.socket_path(ns, {ctl.SOCKET_ENV: "/x.sock"}) == "/x.sock"
    assert ctl.socket_path(argparse.Namespace(socket="/y.sock"), {ctl.SOCKET_ENV: "/x"}) == "/y.sock"


def test_ctl_finds_the_running_daemons(sock_dir: Path) -> None:
    """Without --socket: none running -> one line saying where it looked; one -> that one (a stale
    socket left by a killed daemon is skipped); several -> each listed, the user chooses."""
    ns = argparse.Namespace(socket=None)
    env = {"XDG_RUNTIME_DIR": str(sock_dir)}
    folder = sock_dir / "petalsd"
    folder.mkdir()
    with pytest.raises(ctl.CtlError, match=f"no running petalsd found .*{folder}"):
        ctl.socket_path(ns, env)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(folder / "0stale.sock"))
    stale.close()
    with pytest.raises(ctl.CtlError, match="no running petalsd found"):
        ctl.socket_path(ns, env)
    assert with_server(folder / "one.sock", FakeBackend(), lambda path: ctl.socket_path(ns, env)) == \
        str(folder / "one.sock")

    async def two() -> str:
        async with trio.open_nursery() as nursery:
            for name in ("a.sock", "b.sock"):
                await nursery.start(lambda task_status, name=name: serve_control(
                    folder / name, FakeBackend(), task_status=task_status))

            def attempt() -> str:
                with pytest.raises(ctl.CtlError) as info:
                    ctl.socket_path(ns, env)
                return str(info.value)
            message = await trio.to_thread.run_sync(attempt)
            nursery.cancel_scope.cancel()
        return message

    message = trio.run(two)
    assert message.startswith("2 daemons are running here; choose one with --socket PATH")
    assert str(folder / "a.sock") in message and str(folder / "b.sock") in message
    assert "0stale" not in message


def test_ctl_does_not_import_the_daemon() -> None:
    code = ("import sys, petals_client.ctl; "
            "sys.exit(any(m == 'petalsd' or m.startswith('petalsd.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
