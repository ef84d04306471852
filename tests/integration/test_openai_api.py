"""`petals serve` against the real `openai` client, over real daemons on 127.0.0.1.

The model is a tiny random Llama with a trained byte-level BPE tokenizer and a chat template
(chatmodel.py). Every generated text is compared with local `transformers` generation decoded
the same way (skip_special_tokens), token for token.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatmodel import make_chat_model
from petals_client import ctl
from petals_client.localswarm import LocalSwarm
from servelib import ServeProcess
from swarmlib import DAEMON_ARGS

API_KEY = "test-key-123"
PROMPT = "Hello, how are you"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is a swarm?"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def reference(chat_model):
    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(chat_model)


@pytest.fixture(scope="module")
def swarm(chat_model, tmp_path_factory):
    """Three daemons, each with its own control socket (to see their sessions)."""
    socks = tmp_path_factory.mktemp("socks")
    local = LocalSwarm(chat_model, extra_args=DAEMON_ARGS)
    try:
        for i, blocks in enumerate(["0:2", "2:4", "4:6"]):
            local.start(blocks, args=["--control-socket", str(socks / f"d{i}.sock")], wait=(i == 0))
        local.wait_all()
        local.sockets = [socks / f"d{i}.sock" for i in range(3)]  # type: ignore[attr-defined]
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def server(chat_model, swarm):
    proc = ServeProcess(chat_model, swarm.addrs[:1], ["--api-key", API_KEY, "--max-concurrent", "3"])
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def expected(reference, ids: list[int], max_new_tokens: int, **sampling) -> tuple[str, list[int]]:
    model, tok = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                             do_sample=bool(sampling), **sampling)
    new = out[0, len(ids):].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def prompt_ids(reference) -> list[int]:
    return reference[1](PROMPT).input_ids


def chat_ids(reference) -> list[int]:
    tok = reference[1]
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def sessions(swarm) -> list[list[dict]]:
    return [json.loads(ctl.request(str(sock), "GET", "/v1/sessions")[2]) for sock in swarm.sockets]


def test_models_list(client, chat_model):
    models = client.models.list()
    assert [m.id for m in models.data] == [chat_model.name]
    assert client.models.retrieve(chat_model.name).id == chat_model.name


def test_completion_equals_transformers(client, chat_model, reference):
    text, new = expected(reference, prompt_ids(reference), 12)
    reply = client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == ("stop" if new[-1] == 1 else "length")
    assert reply.usage.prompt_tokens == len(prompt_ids(reference))
    assert reply.usage.completion_tokens == len(new)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_stream_equals_transformers(client, chat_model, reference):
    text, new = expected(reference, prompt_ids(reference), 12)
    chunks = list(client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == len(new) == 12


def test_chat_equals_transformers(client, chat_model, reference):
    ids = chat_ids(reference)
    text, new = expected(reference, ids, 10)
    reply = client.chat.completions.create(model=chat_model.name, messages=MESSAGES, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(new)

    stream = client.chat.completions.create(model=chat_model.name, messages=MESSAGES, max_tokens=10,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences(client, chat_model, reference):
    text, _ = expected(reference, prompt_ids(reference), 16)
    stop = text[6:9]
    assert stop and text.find(stop) >= 1
    want = text[:text.find(stop)]
    reply = client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=16, temperature=0,
                                      stop=[stop, "never-generated"])
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 16
    chunks = list(client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_transformers(client, chat_model, reference):
    torch.manual_seed(1234)
    text, _ = expected(reference, prompt_ids(reference), 10, temperature=0.8, top_p=0.9, top_k=0)
    replies = [client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=10, temperature=0.8,
                                         top_p=0.9, seed=1234).choices[0].text for _ in range(2)]
    assert replies == [text, text]


def test_errors(server, client, chat_model):
    name = chat_model.name
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert info.value.status_code == 404 and "no-such-model" in info.value.message
    bad_requests = [
        dict(temperature=3.5), dict(top_p=0), dict(n=2), dict(max_tokens=0), dict(max_tokens=10**6),
        dict(stop=["a", "b", "c", "d", "e"]), dict(prompt=""), dict(logprobs=2), dict(max_tokens="many"),
    ]
    for extra in bad_requests:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**{"model": name, "prompt": PROMPT, **extra})
        assert info.value.status_code == 400 and info.value.body["message"], extra
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=name, messages=[])
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    assert info.value.status_code == 401

    headers = {"Authorization": f"Bearer {API_KEY}"}
    raw = httpx.post(f"{server.base_url}/completions", content=b"{not json", headers=headers)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    raw = httpx.get(f"{server.base_url}/nothing-here", headers=headers)
    assert raw.status_code == 404 and raw.json()["error"]["type"] == "invalid_request_error"
    for response in (raw,):
        assert "Traceback" not in response.text


def wait_no_sessions(swarm, timeout: float = 20.0) -> list[list[dict]]:
    """The daemons' sessions once all are closed (a close reaches a daemon a moment after the reply)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sessions(swarm) != [[], [], []]:
        time.sleep(0.1)
    return sessions(swarm)


def test_concurrent_streams_are_exact(client, chat_model, reference, swarm):
    assert wait_no_sessions(swarm) == [[], [], []]
    prompts = [PROMPT, "The quick brown fox"]
    tokens = 48
    wants = [expected(reference, reference[1](p).input_ids, tokens)[0] for p in prompts]
    got: dict[int, str] = {}
    active: list[int] = []
    both_started = threading.Barrier(2, timeout=60)

    def run(i: int) -> None:
        text = []
        for chunk in client.completions.create(model=chat_model.name, prompt=prompts[i], max_tokens=tokens,
                                               temperature=0, stream=True):
            text.append(chunk.choices[0].text)
            if len(text) == 1:  # both responses have begun: both sessions are open
                both_started.wait()
                active.append(min(len(s) for s in sessions(swarm)))
        got[i] = "".join(text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {0: wants[0], 1: wants[1]}
    assert max(active) == 2, "both streams should hold a session on the daemons at once"


def test_disconnect_mid_stream_closes_sessions(client, chat_model, swarm):
    assert wait_no_sessions(swarm) == [[], [], []]
    stream = client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=1000, temperature=0,
                                       stream=True)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    held = sessions(swarm)
    assert [len(s) for s in held] == [1, 1, 1]
    stream.close()  # the HTTP connection goes away mid-stream
    assert wait_no_sessions(swarm) == [[], [], []]

    # a client that gives up waiting for a whole (non-streamed) completion frees its session too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{client.base_url}completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1.5,
                   json={"model": chat_model.name, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0})
    assert wait_no_sessions(swarm) == [[], [], []]
    # and the server goes on serving
    reply = client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2


def test_server_concurrency_limit(server, client, chat_model):
    streams = [client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=1000, temperature=0,
                                         stream=True) for _ in range(3)]
    try:
        for s in streams:
            next(iter(s))
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 429 and info.value.code == "server_busy"
    finally:
        for s in streams:
            s.close()


def count_log(daemon, text: str) -> int:
    return sum(text in line for line in list(daemon.log))


def wait_log(daemon, text: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while count_log(daemon, text) < count:
        assert time.monotonic() < deadline, f"no {count} x {text!r} in the daemon's log"
        time.sleep(0.05)


def test_busy_daemons_dead_daemon_and_no_route(chat_model, tmp_path):
    """429 when the daemons refuse for lack of room; 503 (or, mid-stream, an error event) when the
    only daemon dies during a completion; 503 when no chain covers the model."""
    with LocalSwarm(chat_model, extra_args=DAEMON_ARGS) as local:
        d = local.start("0:6", args=["--max-sessions", "2"])
        proc = ServeProcess(chat_model, local.addrs)
        try:
            c = openai.OpenAI(base_url=proc.base_url, api_key="none", max_retries=0, timeout=120)
            streams = [c.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=1000, temperature=0,
                                            stream=True) for _ in range(2)]
            chunks = [iter(s) for s in streams]
            for it in chunks:
                next(it)
            with pytest.raises(openai.RateLimitError) as info:
                c.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=2)
            assert info.value.code == "daemons_busy" and "busy" in info.value.message
            streams[0].close()
            wait_log(d, "session closed", 1)

            # the daemon dies while one completion streams and another is being generated whole
            outcome: dict[str, openai.APIStatusError] = {}

            def whole() -> None:
                try:
                    c.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=1000, temperature=0)
                except openai.APIStatusError as exc:
                    outcome["error"] = exc

            worker = threading.Thread(target=whole)
            worker.start()
            wait_log(d, "session open", 3)  # the two streams, then this one (a refused open is logged otherwise)
            d.process.kill()
            worker.join(120)
            assert outcome["error"].status_code == 503, outcome
            assert "Traceback" not in outcome["error"].message
            with pytest.raises(openai.APIError) as mid_stream:
                for _ in chunks[1]:
                    pass
            assert "swarm" in mid_stream.value.message and "Traceback" not in mid_stream.value.message
        finally:
            proc.stop()
    with LocalSwarm(chat_model, extra_args=DAEMON_ARGS) as local:
        local.start("0:4")
        proc = ServeProcess(chat_model, local.addrs)
        try:
            c = openai.OpenAI(base_url=proc.base_url, api_key="none", max_retries=0, timeout=120)
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as info:
                    c.completions.create(model=chat_model.name, prompt=PROMPT, max_tokens=2, stream=stream)
                assert info.value.status_code == 503 and "4:6" in info.value.message
        finally:
            proc.stop()
        # the health page names the gap and asks for exactly those blocks
        page = tmp_path / "gap.html"
        result = subprocess.run([sys.executable, "-m", "petals_client.cli", "swarm", "--model", str(chat_model),
                                 "--initial-peers", *local.addrs, "--html", str(page)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr  # as `petals swarm`: 1 when a block is unserved
        embedded = re.search(r'<script id="swarm-data" type="application/json">(.*?)</script>', page.read_text(), re.S)
        data = json.loads(embedded.group(1))
        assert data["gaps"] == [[4, 6]] and data["most_needed"] == [4, 6]
        assert f"--blocks 4:6 --initial-peers {local.addrs[0]}" in data["join"]["daemon"]


def test_refuses_public_address_without_key(chat_model):
    result = subprocess.run([sys.executable, "-m", "petals_client.cli", "serve", "--model", str(chat_model),
                             "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq",
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "without --api-key" in result.stderr and "Traceback" not in result.stderr



def test_port_in_use_is_a_one_line_error(chat_model, swarm):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "petals_client.cli", "serve", "--model", str(chat_model),
                                 "--initial-peers", swarm.addrs[0], "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr.splitlines()[0]


# --------------------------------------------------------------------------- the health page


def find_chromium() -> str:
    """Debian's headless-capable chromium, installed with apt-get when missing (CI runs as root)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be: installing it needs root and apt-get "
                    "(apt-get install -y chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if result.returncode != 0:
            pytest.skip(f"chromium could not be installed ({' '.join(cmd)} failed): {result.stderr[-500:]}")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("apt-get installed chromium but no `chromium` command is on PATH")
    return path


def headless(chromium: str, url: str, *args: str) -> str:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", *args, url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class _Tables(HTMLParser):
    """Cell texts of every <table id=...> in a rendered page, by table id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def rendered_tables(dom: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(dom)
    return {k: [r for r in rows if r] for k, rows in parser.tables.items()}


def check_tables(tables: dict[str, list[list[str]]], swarm) -> None:
    servers = {row[1]: row for row in tables["servers"]}
    for daemon, blocks in zip(swarm.daemons, ["0:2", "2:4", "4:6"]):
        row = servers[daemon.peer_id]
        assert row[0] == daemon.name and row[2] == blocks and row[3] == "online", row
        assert row[6] == "direct" and row[7] not in ("", "?"), row  # reachability and version
    assert [row[0] for row in tables["blocks"]] == ["0:2", "2:4", "4:6"]
    assert [row[1] for row in tables["blocks"]] == ["d1", "d2", "d3"]


def test_health_page_in_chromium(server, swarm, chat_model, tmp_path):
    chromium = find_chromium()
    dom = headless(chromium, server.url + "/", "--dump-dom")
    tables = rendered_tables(dom)
    check_tables(tables, swarm)
    # live: after a refresh period (virtual time) the page has re-fetched health.json and redrawn
    refreshed = headless(chromium, server.url + "/", "--virtual-time-budget=12000", "--dump-dom")
    match = re.search(r'<body[^>]*data-refreshes="(\d+)"', refreshed)
    assert match and int(match.group(1)) >= 1, refreshed[:300]
    check_tables(rendered_tables(refreshed), swarm)
    latencies = [row[8] for row in tables["servers"]]
    assert all(cell.endswith(" ms") for cell in latencies), latencies
    assert "every block is served" in dom and "petalsd --model" in dom and swarm.addrs[0] in dom
    live = httpx.get(server.url + "/health.json", timeout=60).json()  # what the page re-fetches
    assert live["live"] and live["complete"] and len(live["servers"]) == 3
    assert all(s["latency_ms"] > 0 and s["version"] for s in live["servers"])
    shot = tmp_path / "health.png"
    headless(chromium, server.url + "/", f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.stat().st_size > 10_000
    print(f"health page screenshot: {shot}")

    # `petals swarm --html FILE` writes the same page (opened from the file: no server needed)
    page = tmp_path / "swarm.html"
    result = subprocess.run([sys.executable, "-m", "petals_client.cli", "swarm", "--model", str(chat_model),
                             "--initial-peers", swarm.addrs[0], "--html", str(page)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    check_tables(rendered_tables(headless(chromium, page.as_uri(), "--dump-dom")), swarm)
