"""Bad input of every kind against running daemons: each gets a clear error or a clean close.

Every test attacks real `petalsd` processes over libp2p with a raw client (rawclient.py) while an
honest client generates through the same daemons (`honest(...)`): the honest session must finish
token for token equal to local transformers, without needing a single recovery (a recovery would
mean the attack disturbed it), and the attacked daemons must still be up and serving afterwards.

Two sets of daemons, shared by all tests of this module:
- `llama_swarm` (conftest): three daemons 0:2, 2:4, 4:6 with default limits;
- `limited`: one daemon 0:6 with small limits (2 sessions, a 512 KiB KV-cache budget, 1 MiB
  frames, batch 2, max_length 256) and a control socket to inspect its sessions.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from petals_client import AutoDistributedModelForCausalLM
from petals_client.ctl import UnixHTTPConnection
from petals_client.localswarm import DaemonProcess, LocalSwarm
from petals_protocol.errors import ErrorCode
from petals_protocol.ids import FORWARD_PROTOCOL, INFERENCE_PROTOCOL, INFO_PROTOCOL
from petals_protocol.messages import (
    CloseSession,
    ErrorReply,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
    InfoRequest,
    OpenSession,
)
from petals_protocol.models.span import load_span
from petals_protocol.p2p.streams import StreamClosed
from petals_protocol.tensors import TensorPayload, to_torch
from petalsd.daemon import MESSAGE_OVERHEAD

from rawclient import (
    REPLY_TIMEOUT,
    RawClient,
    assert_readable,
    expect_end,
    expect_error,
    hidden_payload,
    new_id,
    pack,
    request,
    run_raw,
    step,
    step_ok,
)

pytestmark = pytest.mark.integration

HIDDEN = 64  # conftest.make_model's hidden size
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
# KV cache per token of the whole model: 6 blocks x (K, V) x hidden x 4 bytes (fp32) = 3 KiB, so
# the limited daemon's 512 KiB budget holds 170 tokens: the honest session's 64 plus small ones.
CACHE_BYTES_PER_TOKEN = 6 * 2 * HIDDEN * 4
CACHE_BUDGET = 512 * 1024
LIMITED_FRAME = 2**20
LIMITED_ARGS = ["--max-sessions", "2", "--cache-budget", str(CACHE_BUDGET), "--max-frame-size", str(LIMITED_FRAME),
                "--max-batch-size", "2", "--max-length", "256"]
HONEST_MAX_LENGTH = 64
# How long the daemon may take to notice a vanished client (a killed process's socket is closed
# by the kernel at once, so this is only slack for a loaded machine).
FREE_TIMEOUT = 15.0


# ------------------------------------------------------------------------------------ fixtures

@dataclass
class Limited:
    """The one daemon with small limits, and how to look at its sessions."""

    swarm: LocalSwarm
    control_socket: Path

    @property
    def daemon(self) -> DaemonProcess:
        return self.swarm.daemons[0]

    @property
    def addr(self) -> str:
        return self.daemon.addrs[0]

    def sessions(self) -> list[dict]:
        """GET /v1/sessions on the daemon's control socket."""
        conn = UnixHTTPConnection(str(self.control_socket), timeout=10.0)
        try:
            conn.request("GET", "/v1/sessions")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 200, body
        sessions = json.loads(body)
        assert isinstance(sessions, list), sessions
        return sessions

    def wait_sessions(self, predicate: Callable[[set[str]], bool], what: str) -> set[str]:
        """Poll the open session ids (hex) until `predicate` holds; fail after FREE_TIMEOUT."""
        deadline = time.monotonic() + FREE_TIMEOUT
        while True:
            ids = {s["session_id"] for s in self.sessions()}
            if predicate(ids):
                return ids
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon sessions {sorted(ids)} never reached: {what}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def limited_daemon(llama_path, tmp_path_factory) -> Iterator[Limited]:
    control = tmp_path_factory.mktemp("ctl") / "control.sock"
    swarm = LocalSwarm(llama_path, extra_args=["--num-threads", "1", "--log-level", "info", *LIMITED_ARGS,
                                               "--control-socket", str(control)])
    try:
        swarm.start("0:6", initial_peers=[])
        yield Limited(swarm, control)
    finally:
        swarm.stop()


@pytest.fixture
def limited(limited_daemon) -> Iterator[Limited]:
    """The limited daemon, left with no sessions after each test: with only 2 slots, a session
    still closing from one test would make the next test's opens busy."""
    yield limited_daemon
    limited_daemon.wait_sessions(lambda ids: not ids, "every session closed after the test")


@pytest.fixture(scope="module")
def local_model(llama_path):
    return AutoModelForCausalLM.from_pretrained(llama_path).eval()


@pytest.fixture(scope="module")
def swarm_model(llama_path, llama_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=llama_swarm.addrs)
    yield model
    model.close()


@pytest.fixture(scope="module")
def limited_model(llama_path, limited_daemon):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_path, initial_peers=[limited_daemon.addr])
    yield model
    model.close()


@pytest.fixture(scope="module")
def fingerprint(llama_swarm) -> str:
    return run_raw(lambda client: client.info(llama_swarm.addrs[0])).model_fingerprint


# ------------------------------------------------------------------------------ honest client

@dataclass
class HonestSession:
    """A real client generating turn after turn in one inference session, in a thread.

    Every turn is checked against local transformers greedy generation over the whole context.
    The session stays open (holding its daemon slot and cache) until the test is done with it.
    """

    model: object
    local: object
    opened: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    turns: int = 0
    recoveries: int = -1
    error: BaseException | None = None

    TOKENS_PER_TURN = 4

    def run(self) -> None:
        try:
            with self.model.inference_session(max_length=HONEST_MAX_LENGTH) as session:
                context = PROMPT[:, :0]
                new = PROMPT
                while True:
                    out = self.model.generate(new, session=session, max_new_tokens=self.TOKENS_PER_TURN,
                                              do_sample=False)
                    full = torch.cat([context, new], dim=1)
                    with torch.inference_mode():
                        ref = self.local.generate(full, max_new_tokens=self.TOKENS_PER_TURN, do_sample=False)
                    assert out.tolist() == ref[:, context.shape[1]:].tolist(), f"turn {self.turns} diverged"
                    self.turns += 1
                    # Open at the daemon now: its answer to OpenSession came before the first result
                    # (entering inference_session only sends the open), so tests may count its slot.
                    self.opened.set()
                    context = ref
                    new = torch.tensor([[7, 11 + self.turns]])
                    room = HONEST_MAX_LENGTH - context.shape[1] - new.shape[1] - self.TOKENS_PER_TURN
                    if self.stop.is_set() or room < 0:
                        break
                self.stop.wait(120)  # keep the session (and its slot) until the attack is over
                self.recoveries = session.recoveries
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread by `finish`
            self.error = exc
        finally:
            self.opened.set()

    def finish(self, thread: threading.Thread) -> None:
        self.stop.set()
        thread.join(120)
        assert not thread.is_alive(), "the honest session hung"
        if self.error is not None:
            raise AssertionError(f"the honest session failed: {self.error!r}") from self.error
        assert self.turns >= 1
        assert self.recoveries == 0, f"the honest session needed {self.recoveries} recoveries"


@contextmanager
def honest(model, local) -> Iterator[HonestSession]:
    """Run an honest session for the duration of the block; it must end correct and undisturbed."""
    session = HonestSession(model, local)
    thread = threading.Thread(target=session.run, name="honest-session", daemon=True)
    thread.start()
    assert session.opened.wait(60), "the honest session did not open"
    try:
        yield session
    finally:
        session.finish(thread)


def assert_serving(daemons: list[DaemonProcess]) -> None:
    """Every daemon process is alive, answers /petals/info/1, and blamed no bad input on itself
    (an "internal error" or a traceback in its log would mean bad input reached a bug)."""
    for daemon in daemons:
        log = list(daemon.log)
        assert daemon.process.poll() is None, f"daemon {daemon.name} exited:\n" + "\n".join(log[-20:])
        # (libp2p's own ERROR lines are about dialing back clients that left, not about our input.)
        bugs = [line for line in log if "internal error" in line or "Traceback" in line or " ERROR petalsd" in line]
        assert not bugs, f"daemon {daemon.name} logged: " + "\n".join(bugs)

    async def ask_all(client: RawClient) -> None:
        for daemon in daemons:
            info = await client.info(daemon.addrs[0])
            assert info.state == "online"

    run_raw(ask_all)


def open_msg(fingerprint: str, start: int, end: int, *, max_length: int = 32, batch_size: int = 1,
             session_id: bytes | None = None) -> OpenSession:
    return OpenSession(session_id=session_id or new_id(), model_fingerprint=fingerprint, start_block=start,
                       end_block=end, max_length=max_length, batch_size=batch_size)


def step_map(session_id: bytes, step_no: int, position: int, hidden: dict) -> dict:
    """A hand-built InferenceStep wire map, for tensors the codec would refuse to build."""
    return {"t": "step", "session_id": session_id, "step": step_no, "position": position, "hidden": hidden,
            "hypo_ids": None}


def frame_header(length: int) -> bytes:
    return length.to_bytes(4, "big")


# ----------------------------------------------------------------------------- garbage bytes

# (name, raw bytes written to the stream, whether our side then closes it for writing). Bytes that
# announce a frame within the limit make the daemon wait for the rest of it, as it must: only our
# EOF tells it that the frame will never be whole.
GARBAGE = [
    ("random bytes", bytes(range(256)) * 4, True),  # header 0x00010203: a 66 KB frame, cut short
    ("huge header", b"\xde\xad\xbe\xef" * 16, False),  # announces 3.7 GB
    ("not msgpack", frame_header(5) + b"hello", False),
    ("truncated msgpack", frame_header(3) + b"\x93\x01\x02", False),
    ("msgpack nil", frame_header(1) + b"\xc0", False),
    ("frame cut by EOF", frame_header(100) + b"\x81\xa1t", True),
    ("header cut by EOF", b"\x00\x00", True),
]


@pytest.mark.parametrize("protocol", [INFO_PROTOCOL, INFERENCE_PROTOCOL, FORWARD_PROTOCOL])
def test_garbage_bytes_get_an_error_or_a_close(protocol, llama_swarm, swarm_model, local_model):
    async def attack(client: RawClient) -> None:
        for addr in llama_swarm.addrs:
            for name, junk, eof in GARBAGE:
                stream = await client.open(addr, protocol)
                await stream.stream.write(junk)
                if eof:
                    await stream.stream.close()  # our FIN: the daemon sees the partial frame end
                with trio.fail_after(REPLY_TIMEOUT):  # name the case that hangs, if one does
                    replies, ending = await expect_end(stream)
                for reply in replies:
                    assert isinstance(reply, ErrorReply), (name, reply)
                    assert reply.code in (ErrorCode.MALFORMED, ErrorCode.TOO_LARGE), (name, reply)
                    assert_readable(reply.message)
                if name == "not msgpack":  # a whole frame: the daemon can and must say what is wrong
                    assert [r.code for r in replies] == [ErrorCode.MALFORMED], replies
                    assert "msgpack" in replies[0].message
                await stream.reset()

    with honest(swarm_model, local_model):
        run_raw(attack)
    assert_serving(llama_swarm.daemons)


# ------------------------------------------------------------------------ frame over the limit

def test_frame_over_the_limit_is_refused_from_its_header(limited, limited_model, local_model):
    async def attack(client: RawClient) -> None:
        for protocol in (INFO_PROTOCOL, INFERENCE_PROTOCOL, FORWARD_PROTOCOL):
            stream = await client.open(limited.addr, protocol)
            # Only the header: if the daemon waited to buffer the announced 2 MiB body, it would
            # never answer, and expect_end would time out.
            await stream.stream.write(frame_header(2 * LIMITED_FRAME))
            started = time.monotonic()
            replies, ending = await expect_end(stream)
            assert time.monotonic() - started < 5.0
            # The daemon says why (too_large), then resets: the byte stream cannot be resynchronised.
            assert len(replies) == 1 and isinstance(replies[0], ErrorReply), replies
            assert replies[0].code == ErrorCode.TOO_LARGE, replies
            for reply in replies:
                assert_readable(reply.message)
            await stream.reset()
        # A frame of exactly the limit is read whole (and refused as a message, not as a frame).
        # The info protocol's limit is the daemon's room for a message without tensors.
        stream = await client.open(limited.addr, INFO_PROTOCOL, max_frame_size=2 * LIMITED_FRAME)
        await stream.send_frame(b"\xc4" + b"x" * (MESSAGE_OVERHEAD - 1))
        await expect_error(stream, ErrorCode.MALFORMED)
        await stream.reset()

    with honest(limited_model, local_model):
        run_raw(attack)
    assert_serving(limited.swarm.daemons)


# ---------------------------------------------------------------- valid msgpack, wrong content

def _wrong_messages(fingerprint: str) -> list[tuple[str, object]]:
    good_open = {"t": "open", "session_id": new_id(), "model_fingerprint": fingerprint, "start_block": 0,
                 "end_block": 2, "max_length": 16, "batch_size": 1}
    return [
        ("a list", [1, 2, 3]),
        ("a string", "hello"),
        ("a map without a tag", {"session_id": new_id()}),
        ("an unknown tag", {"t": "gimme_weights"}),
        ("a tag of the wrong type", {"t": 7}),
        ("session_id as text", {**good_open, "session_id": "0123456789abcdef"}),
        ("session_id too short", {**good_open, "session_id": b"short"}),
        ("negative block", {**good_open, "start_block": -1}),
        ("bool for an int", {**good_open, "max_length": True}),
        ("float for an int", {**good_open, "batch_size": 1.0}),
        ("missing field", {k: v for k, v in good_open.items() if k != "batch_size"}),
        ("extra field", {**good_open, "evil": 1}),
        ("reversed span", {**good_open, "start_block": 2, "end_block": 0}),
        ("bad fingerprint", {**good_open, "model_fingerprint": "../../etc/passwd"}),
        ("extra field on info", {"t": "info_req", "x": 1}),
    ]


@pytest.mark.parametrize("protocol", [INFO_PROTOCOL, INFERENCE_PROTOCOL, FORWARD_PROTOCOL])
def test_valid_msgpack_with_wrong_types_is_malformed(protocol, llama_swarm, fingerprint, swarm_model, local_model):
    async def attack(client: RawClient) -> None:
        addr = llama_swarm.addrs[0]
        for name, obj in _wrong_messages(fingerprint):
            stream = await client.open(addr, protocol)
            await stream.send_frame(pack(obj))
            reply = await expect_error(stream, ErrorCode.MALFORMED)
            assert reply.session_id is None
            await stream.reset()

    with honest(swarm_model, local_model):
        run_raw(attack)
    assert_serving(llama_swarm.daemons)


def test_messages_of_another_protocol_are_bad_requests(llama_swarm, fingerprint, swarm_model, local_model):
    forward = ForwardRequest(request_id=new_id(), model_fingerprint=fingerprint, start_block=0, end_block=2,
                             hidden=hidden_payload(1, 2, HIDDEN))
    step_first = InferenceStep(session_id=new_id(), step=0, position=0, hidden=hidden_payload(1, 1, HIDDEN),
                               hypo_ids=None)

    async def attack(client: RawClient) -> None:
        addr = llama_swarm.addrs[0]
        # The info stream answers and stays open.
        info = await client.open(addr, INFO_PROTOCOL)
        await info.send(forward)
        await expect_error(info, ErrorCode.BAD_REQUEST)
        assert (await request(info, InfoRequest())).model_fingerprint == fingerprint
        await info.close()
        # A stateless stream answers and stays open.
        stateless = await client.open(addr, FORWARD_PROTOCOL)
        await stateless.send(InfoRequest())
        await expect_error(stateless, ErrorCode.BAD_REQUEST)
        assert isinstance(await request(stateless, forward), ForwardResponse)
        await stateless.close()
        # An inference stream must start with OpenSession: anything else is refused and closed.
        for first in (step_first, InfoRequest(), CloseSession(session_id=new_id()), forward):
            stream = await client.open(addr, INFERENCE_PROTOCOL)
            await stream.send(first)
            replies, ending = await expect_end(stream)
            assert [r.code for r in replies] == [ErrorCode.BAD_REQUEST], replies
            assert "OpenSession" in replies[0].message
            assert ending.clean, ending

    with honest(swarm_model, local_model):
        run_raw(attack)
    assert_serving(llama_swarm.daemons)


# ------------------------------------------------------------------- bad tensors in a session

def _reference_steps(llama_path, start: int, end: int, chunks: list[TensorPayload]) -> list[torch.Tensor]:
    """What a correct daemon returns for these consecutive steps of one session (local Span)."""
    span = load_span(llama_path, start, end, dtype=torch.float32)
    cache = span.new_cache(1, 32)
    with torch.inference_mode():
        return [span.forward(to_torch(chunk), cache) for chunk in chunks]


def test_bad_tensors_get_bad_tensor_and_the_session_stays_usable(llama_path, llama_swarm, fingerprint,
                                                                 swarm_model, local_model):
    chunks = [hidden_payload(1, 3, HIDDEN, seed=1), hidden_payload(1, 2, HIDDEN, seed=2),
              hidden_payload(1, 1, HIDDEN, seed=3)]
    expected = _reference_steps(llama_path, 2, 4, chunks)
    good_hidden = chunks[1].to_wire()
    bad_tensors: list[tuple[str, object]] = [
        # (float16 / bfloat16 hidden states are compressed activations, accepted: test_compression.py)
        ("wrong hidden size", hidden_payload(1, 2, HIDDEN // 2)),
        ("rank 2", TensorPayload("float32", (2, HIDDEN), bytes(8 * HIDDEN))),
        ("rank 4", TensorPayload("float32", (1, 1, 2, HIDDEN), bytes(8 * HIDDEN))),
        ("batch 2 in a batch-1 session", hidden_payload(2, 2, HIDDEN)),
        ("zero tokens", TensorPayload("float32", (1, 0, HIDDEN), b"")),
        ("int64 hidden states", TensorPayload("int64", (1, 2, HIDDEN), bytes(16 * HIDDEN))),
        # Hand-built wire maps that the decoder itself refuses:
        ("byte length disagrees with shape", {**good_hidden, "data": good_hidden["data"][:-4]}),
        ("byte length too long", {**good_hidden, "data": good_hidden["data"] + b"\0\0\0\0"}),
        ("dtype not whitelisted", {**good_hidden, "dtype": "complex128"}),
        ("negative dimension", {**good_hidden, "shape": [1, -2, HIDDEN]}),
        ("shape is not a list", {**good_hidden, "shape": "1x2x64"}),
        ("tensor is not a map", [1, 2, 3]),
        ("too many elements", {**good_hidden, "shape": [1, 2**20, 2**10]}),
    ]

    async def attack(client: RawClient) -> None:
        opened = open_msg(fingerprint, 2, 4)
        sid = opened.session_id
        stream = await client.open_session(llama_swarm.addrs[1], opened)
        first = await step_ok(stream, sid, 0, 0, chunks[0])
        assert torch.equal(to_torch(first.hidden), expected[0])
        for name, bad in bad_tensors:
            if isinstance(bad, TensorPayload):
                await stream.send(InferenceStep(session_id=sid, step=1, position=3, hidden=bad, hypo_ids=None))
            else:
                await stream.send_frame(pack(step_map(sid, 1, 3, bad)))
            reply = await expect_error(stream, ErrorCode.BAD_TENSOR)
            assert reply.session_id == sid, name
        # The bad steps changed nothing: the next valid steps give exactly the right hidden states.
        second = await step_ok(stream, sid, 1, 3, chunks[1])
        assert torch.equal(to_torch(second.hidden), expected[1])
        third = await step_ok(stream, sid, 2, 5, chunks[2])
        assert torch.equal(to_torch(third.hidden), expected[2])
        await stream.send(CloseSession(session_id=sid))
        replies, ending = await expect_end(stream)
        assert replies == [] and ending.clean

    with honest(swarm_model, local_model):
        run_raw(attack)
    assert_serving(llama_swarm.daemons)


def test_bad_steps_get_typed_errors_and_the_session_stays_usable(llama_path, llama_swarm, fingerprint,
                                                                 swarm_model, local_model):
    chunks = [hidden_payload(1, 4, HIDDEN, seed=4), hidden_payload(1, 1, HIDDEN, seed=5)]
    expected = _reference_steps(llama_path, 0, 2, chunks)

    async def attack(client: RawClient) -> None:
        opened = open_msg(fingerprint, 0, 2, max_length=8)
        sid = opened.session_id
        stream = await client.open_session(llama_swarm.addrs[0], opened)
        await step_ok(stream, sid, 0, 0, chunks[0])
        cases = [
            ("unknown session id", new_id(), 4, hidden_payload(1, 1, HIDDEN), ErrorCode.UNKNOWN_SESSION),
            ("position past the cached tokens", sid, 5, hidden_payload(1, 1, HIDDEN), ErrorCode.BAD_REQUEST),
            ("far past the cache", sid, 2**40, hidden_payload(1, 1, HIDDEN), ErrorCode.BAD_REQUEST),
            ("step past max_length", sid, 4, hidden_payload(1, 5, HIDDEN), ErrorCode.TOO_LONG),
            ("prefill longer than max_length", sid, 0, hidden_payload(1, 9, HIDDEN), ErrorCode.TOO_LONG),
        ]
        for name, session_id, position, hidden, code in cases:
            reply = await step(stream, session_id, 1, position, hidden)
            assert isinstance(reply, ErrorReply) and reply.code == code, (name, reply)
            assert_readable(reply.message)
        # A message that is not a step: the session answers and goes on.
        await stream.send(InfoRequest())
        await expect_error(stream, ErrorCode.BAD_REQUEST)
        # Frames that are not valid messages at all: malformed, and the session goes on.
        good = step_map(sid, 1, 4, chunks[1].to_wire())
        for name, obj in [("step as text", {**good, "step": "1"}), ("unknown tag", {**good, "t": "steps"}),
                          ("missing hidden", {k: v for k, v in good.items() if k != "hidden"}),
                          ("not a map", [sid, 1, 4])]:
            await stream.send_frame(pack(obj))
            reply = await expect_error(stream, ErrorCode.MALFORMED)
            assert reply.session_id == sid, name
        await stream.send_frame(b"\xc1")  # a byte msgpack never uses
        await expect_error(stream, ErrorCode.MALFORMED)
        result = await step_ok(stream, sid, 1, 4, chunks[1])
        assert torch.equal(to_torch(result.hidden), expected[1])
        await stream.close()

    with honest(swarm_model, local_model):
        run_raw(attack)
    assert_serving(llama_swarm.daemons)


# -------------------------------------------------------------------------- opening a session

def test_bad_opens_are_refused_with_typed_errors(llama_swarm, limited, fingerprint, swarm_model, local_model):
    other_model = "f" * 64

    async def refused(client: RawClient, addr: str, msg: OpenSession, code: ErrorCode) -> ErrorReply:
        stream = await client.open(addr, INFERENCE_PROTOCOL)
        await stream.send(msg)
        replies, ending = await expect_end(stream)
        assert [r.code for r in replies] == [code], replies
        assert replies[0].session_id == msg.session_id
        assert_readable(replies[0].message)
        assert ending.clean, ending
        return replies[0]

    async def attack(client: RawClient) -> None:
        d1, d2, _ = llama_swarm.addrs
        await refused(client, d2, open_msg(other_model, 2, 4), ErrorCode.WRONG_MODEL)
        reply = await refused(client, d2, open_msg(fingerprint, 0, 4), ErrorCode.BAD_REQUEST)
        assert "2:4" in reply.message
        await refused(client, d2, open_msg(fingerprint, 4, 6), ErrorCode.BAD_REQUEST)
        await refused(client, limited.addr, open_msg(fingerprint, 0, 6, max_length=257), ErrorCode.TOO_LONG)
        await refused(client, limited.addr, open_msg(fingerprint, 0, 6, batch_size=3), ErrorCode.BAD_REQUEST)
        # A session id already open (on another stream) is refused, and the first session goes on.
        opened = open_msg(fingerprint, 0, 2)
        first = await client.open_session(d1, opened)
        await refused(client, d1, opened, ErrorCode.SESSION_EXISTS)
        await step_ok(first, opened.session_id, 0, 0, hidden_payload(1, 2, HIDDEN))
        # A second OpenSession inside a session is not a valid in-session message.
        await first.send(open_msg(fingerprint, 0, 2))
        await expect_error(first, ErrorCode.BAD_REQUEST)
        await step_ok(first, opened.session_id, 1, 2, hidden_payload(1, 1, HIDDEN))
        await first.close()

    with honest(swarm_model, local_model):
        run_raw(attack)
    assert_serving(llama_swarm.daemons + limited.swarm.daemons)


# ---------------------------------------------------------------------------- forward limits

def test_forward_requests_past_the_limits(llama_path, llama_swarm, limited, fingerprint, limited_model,
                                          local_model):
    hidden = hidden_payload(1, 3, HIDDEN, seed=6)
    span = load_span(llama_path, 0, 6, dtype=torch.float32)
    with torch.inference_mode():
        expected = span.forward(to_torch(hidden))

    def forward(payload: TensorPayload, *, start: int = 0, end: int = 6, model: str = fingerprint) -> ForwardRequest:
        return ForwardRequest(request_id=new_id(), model_fingerprint=model, start_block=start, end_block=end,
                              hidden=payload)

    async def attack(client: RawClient) -> None:
        stream = await client.open(limited.addr, FORWARD_PROTOCOL)
        cases = [
            ("batch over max_batch_size", forward(hidden_payload(3, 2, HIDDEN)), ErrorCode.TOO_LONG),
            ("tokens over max_length", forward(hidden_payload(1, 257, HIDDEN)), ErrorCode.TOO_LONG),
            # (bfloat16 / float16 hidden states are compressed activations, accepted and answered in kind)
            ("wrong dtype", forward(TensorPayload("int64", (1, 2, HIDDEN), bytes(16 * HIDDEN))), ErrorCode.BAD_TENSOR),
            ("wrong hidden size", forward(hidden_payload(1, 2, 2 * HIDDEN)), ErrorCode.BAD_TENSOR),
            ("wrong model", forward(hidden, model="0" * 64), ErrorCode.WRONG_MODEL),
            ("span not served", forward(hidden, start=5, end=7), ErrorCode.BAD_REQUEST),
        ]
        for name, msg, code in cases:
            reply = await request(stream, msg)
            assert isinstance(reply, ErrorReply) and reply.code == code, (name, reply)
            assert reply.request_id == msg.request_id, name
            assert_readable(reply.message)
        # A request over the daemon's frame limit: refused from its header.
        too_big = hidden_payload(2, LIMITED_FRAME // (4 * HIDDEN) + 1, HIDDEN)
        stream_big = await client.open(limited.addr, FORWARD_PROTOCOL, max_frame_size=4 * LIMITED_FRAME)
        try:
            await stream_big.send(forward(too_big))
        except StreamClosed:
            pass  # the daemon may reset the stream before the whole frame is written
        replies, ending = await expect_end(stream_big)
        assert all(r.code == ErrorCode.TOO_LARGE for r in replies), replies
        # The stream that got the errors still serves a valid request, with the right result.
        ok = await request(stream, forward(hidden))
        assert isinstance(ok, ForwardResponse), ok
        assert torch.equal(to_torch(ok.hidden), expected)
        await stream.close()

    with honest(limited_model, local_model):
        run_raw(attack)
    assert_serving(limited.swarm.daemons + llama_swarm.daemons[:1])


# ---------------------------------------------------------------- session slots and the budget

def test_max_sessions_busy_at_open_and_closing_frees_the_slot(limited, fingerprint, limited_model, local_model):
    async def attack(client: RawClient) -> None:
        # The honest session holds one of the 2 slots.
        first = open_msg(fingerprint, 0, 6, max_length=16)
        stream = await client.open_session(limited.addr, first)
        extra = open_msg(fingerprint, 0, 6, max_length=16)
        refused = await client.open(limited.addr, INFERENCE_PROTOCOL)
        await refused.send(extra)
        replies, ending = await expect_end(refused)
        assert [r.code for r in replies] == [ErrorCode.BUSY], replies
        assert "session" in replies[0].message and replies[0].session_id == extra.session_id
        assert_readable(replies[0].message)
        # The open sessions keep working.
        await step_ok(stream, first.session_id, 0, 0, hidden_payload(1, 2, HIDDEN))
        info = await client.info(limited.addr)
        assert (info.max_sessions, info.active_sessions) == (2, 2)
        # Closing one frees its slot: the daemon ends the stream once the session is gone.
        await stream.send(CloseSession(session_id=first.session_id))
        replies, ending = await expect_end(stream)
        assert replies == [] and ending.clean
        again = await client.open_session(limited.addr, extra)
        await step_ok(again, extra.session_id, 0, 0, hidden_payload(1, 3, HIDDEN))
        await again.close()

    with honest(limited_model, local_model):
        run_raw(attack)
        limited.wait_sessions(lambda ids: len(ids) == 1, "only the honest session left")
    assert_serving(limited.swarm.daemons)


def test_cache_budget_busy_at_open(limited, fingerprint, limited_model, local_model):
    async def attack(client: RawClient) -> None:
        info = await client.info(limited.addr)
        # The honest session reserved 64 tokens of the 170 the budget holds.
        assert info.cache_tokens_free == (CACHE_BUDGET - HONEST_MAX_LENGTH * CACHE_BYTES_PER_TOKEN) // CACHE_BYTES_PER_TOKEN
        greedy = open_msg(fingerprint, 0, 6, max_length=info.cache_tokens_free + 1)
        stream = await client.open(limited.addr, INFERENCE_PROTOCOL)
        await stream.send(greedy)
        replies, ending = await expect_end(stream)
        assert [r.code for r in replies] == [ErrorCode.BUSY], replies
        assert "KV cache" in replies[0].message
        assert_readable(replies[0].message)
        # A session that fits exactly is accepted, and works.
        fits = open_msg(fingerprint, 0, 6, max_length=info.cache_tokens_free)
        ok = await client.open_session(limited.addr, fits)
        await step_ok(ok, fits.session_id, 0, 0, hidden_payload(1, 4, HIDDEN))
        assert (await client.info(limited.addr)).cache_tokens_free == 0
        await ok.close()

    with honest(limited_model, local_model):
        run_raw(attack)
        limited.wait_sessions(lambda ids: len(ids) == 1, "only the honest session left")
    assert_serving(limited.swarm.daemons)


# ------------------------------------------------------------------------- vanishing clients

def test_client_stream_reset_mid_session_frees_the_session(limited, fingerprint, limited_model, local_model):
    async def attack(client: RawClient) -> None:
        opened = open_msg(fingerprint, 0, 6, max_length=16)
        sid = opened.session_id.hex()
        stream = await client.open_session(limited.addr, opened)
        await step_ok(stream, opened.session_id, 0, 0, hidden_payload(1, 2, HIDDEN))
        # Reset while the daemon is busy with the next step: the reply has nowhere to go. The
        # connection stays up, so only the stream's end can tell the daemon.
        await stream.send(InferenceStep(session_id=opened.session_id, step=1, position=2,
                                        hidden=hidden_payload(1, 8, HIDDEN), hypo_ids=None))
        await stream.reset()
        await trio.to_thread.run_sync(limited.wait_sessions, lambda ids: sid not in ids and len(ids) == 1,
                                      "the reset session freed")
        # Its slot is free again: a new session opens (the honest one holds the other slot).
        await _open_step_close(client, limited.addr, fingerprint)

    with honest(limited_model, local_model):
        run_raw(attack)
    assert_serving(limited.swarm.daemons)


async def _open_step_close(client: RawClient, addr: str, fingerprint: str) -> None:
    opened = open_msg(fingerprint, 0, 6, max_length=16)
    stream = await client.open_session(addr, opened)
    await step_ok(stream, opened.session_id, 0, 0, hidden_payload(1, 1, HIDDEN))
    await stream.close()


def test_client_process_killed_mid_session_frees_the_session(limited, fingerprint, limited_model, local_model):
    with honest(limited_model, local_model):
        before = {s["session_id"] for s in limited.sessions()}
        holder = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("rawclient.py")), "hold-session", limited.addr,
             fingerprint, "0", "6", str(HIDDEN)],
            stdout=subprocess.PIPE, text=True)
        try:
            line = holder.stdout.readline()
            assert line.startswith("holding "), line
            sid = line.split()[1]
            assert sid in {s["session_id"] for s in limited.sessions()}
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
            holder.stdout.close()
        limited.wait_sessions(lambda ids: ids == before, "the killed client's session freed")
        run_raw(lambda client: _open_step_close(client, limited.addr, fingerprint))
    assert_serving(limited.swarm.daemons)
