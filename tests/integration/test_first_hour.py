"""A new user's first hour: the README's commands exactly as written, and every error one line.

The README test reads the command lines from README.md itself, so the two cannot drift: it runs
them with bash in a scratch folder laid out like the repository root (the shipped model and
`.venv` linked in), HOME and the XDG folders in temp dirs. The one line it changes is
`ADDR=...`, whose value the README tells the user to copy from the first daemon's ready line.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
DEMO_MODEL = ROOT / "client" / "demo" / "model"
READY_ADDR = re.compile(r"\bready\b.*?(/ip4/\S+/tcp/\d+/p2p/\w+)")
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWGzh6ctqCBVkNcfzeZRjRFFRjBd7WXm5BhdDqfEwBT9mq"

pytestmark = pytest.mark.integration


def readme_commands() -> list[str]:
    """The shell lines of README.md's first ```sh block under "## Using it", comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it"):]
    block = section[section.index("```sh\n") + 6:]
    block = block[:block.index("```")]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment with a home of its own: no key file or socket of another test."""
    home = tmp_path / "home"
    runtime = tmp_path / "run"
    for folder in (home, runtime):
        folder.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PETALSD_CONTROL_SOCKET")}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / ".local" / "state"), XDG_RUNTIME_DIR=str(runtime),
               PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    return env


def local_greedy(prompt: str, max_new_tokens: int) -> str:
    """What `transformers` generates from the shipped model, decoded like `petals generate`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from petals_client.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    config = GenerationConfig.from_pretrained(DEMO_MODEL)
    with torch.inference_mode():
        out = model.generate(ids, generation_config=config, max_new_tokens=max_new_tokens, do_sample=False)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist())


def test_readme_commands_work_as_written(tmp_path: Path, user_env: dict[str, str]) -> None:
    commands = readme_commands()
    assert commands[0] == "source .venv/bin/activate"
    work = tmp_path / "checkout"
    (work / "client" / "demo").mkdir(parents=True)
    (work / "client" / "demo" / "model").symlink_to(DEMO_MODEL)
    (work / ".venv").symlink_to(VENV)
    state: list[str] = []  # `source ...` and `NAME=value` lines, replayed before each command
    daemons: list[tuple[subprocess.Popen[str], list[str]]] = []
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for line in commands:
            if line.startswith("source ") or re.match(r"^[A-Z_]+=", line):
                if line.startswith("ADDR="):  # the README says: the address from the ready line
                    line = f"ADDR={first_addr}"
                state.append(line)
                continue
            script = "\n".join([*state, line])
            if line.startswith("petalsd "):  # a daemon: runs until stopped, ready when it says so
                proc = subprocess.Popen(["bash", "-c", script], cwd=work,
                                        env=user_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
                log: list[str] = []
                daemons.append((proc, log))
                addr = _wait_ready(proc, log)
                if len(daemons) == 1:
                    first_addr = addr
                continue
            result = subprocess.run(["bash", "-c", script], cwd=work, env=user_env, capture_output=True,
                                    text=True, timeout=180)
            assert result.returncode == 0, (line, result.stdout[-1500:], result.stderr[-1500:])
            outputs[line.split()[0] + " " + line.split()[1]] = result
    finally:
        for proc, _log in daemons:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _log in daemons:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert (work / "my-llama").is_symlink()
    logs = ["\n".join(log) for _proc, log in daemons]
    assert len(daemons) == 2 and all(proc.returncode == 0 for proc, _ in daemons), logs
    # Two daemons started the same way on one host: distinct peer ids, each from its own key file.
    peers = [re.search(r"ready peer=(\w+)", log).group(1) for log in logs]
    assert peers[0] != peers[1]
    keys = sorted(p.name for p in (Path(user_env["XDG_STATE_HOME"]) / "petalsd").glob("*.key"))
    assert keys == ["identity-2.key", "identity.key"]
    assert "blocks=3:6" in logs[1]  # --num-blocks 3 picked the blocks nobody served
    # Token-exact through both daemons.
    generated = outputs["petals generate"].stdout.rstrip("\n")
    assert generated == local_greedy("Hello", 64)
    swarm = outputs["petals swarm"].stdout
    assert "2 servers" in swarm and " 0:3 " in swarm and " 3:6 " in swarm and "GAP" not in swarm, swarm
    ctl = outputs["petals ctl"].stdout
    assert ctl.startswith("2 daemons are running here") and all(p in ctl for p in peers), ctl


def _wait_ready(proc: subprocess.Popen[str], log: list[str], timeout: float = 120.0) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        log.append(line.rstrip("\n"))
        match = READY_ADDR.search(line)
        if match:
            # keep draining stderr so the daemon never blocks on a full pipe
            import threading

            threading.Thread(target=lambda: [log.append(x.rstrip("\n")) for x in proc.stderr],
                             daemon=True).start()
            return match.group(1)
        if time.monotonic() > deadline:
            break
    raise AssertionError("daemon did not become ready:\n" + "\n".join(log[-20:]))


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit `code`, no traceback, the error on one line (then at most a hint line)."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    lines = err.strip("\n").splitlines()
    assert 1 <= len(lines) <= 2, err
    assert "error" in lines[0] or "fatal" in lines[0], err
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.mark.parametrize("args, code, needles", [
    # an unreachable peer: refused, said once, with the cause
    (["generate", "--model", str(DEMO_MODEL), "--initial-peers", UNREACHABLE, "Hello"], 1,
     ["connection refused"]),
    (["swarm", "--model", str(DEMO_MODEL), "--initial-peers", UNREACHABLE], 1, ["connection refused"]),
    # malformed peer addresses are usage errors, caught before anything starts
    (["generate", "--model", str(DEMO_MODEL), "--initial-peers", "garbage", "Hello"], 2, ["not a multiaddr"]),
    (["swarm", "--model", str(DEMO_MODEL), "--initial-peers", "/ip4/127.0.0.1/tcp/9"], 2, ["/p2p/PEER_ID"]),
    (["generate", "--model", str(DEMO_MODEL), "--initial-peers", UNREACHABLE], 2, ["prompt is missing"]),
    (["generate", "--model", str(DEMO_MODEL), "--initial-peers", UNREACHABLE, "--prompt", "a", "b"], 2,
     ["give the prompt once"]),
    (["generate", "--model", "/nonexistent/model", "--initial-peers", UNREACHABLE, "Hello"], 1,
     ["not a directory"]),
    (["generate", "--bogus"], 2, ["required: --model"]),
    (["nonsense"], 2, ["invalid choice"]),
])
def test_petals_errors_are_one_line(args: list[str], code: int, needles: list[str]) -> None:
    assert_one_line_error(run_cli(["petals_client.cli", *args]), code, *needles)


def test_verbose_shows_the_traceback_and_is_accepted_after_the_subcommand() -> None:
    result = run_cli(["petals_client.cli", "swarm", "-v", "--model", str(DEMO_MODEL), "--initial-peers", UNREACHABLE])
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "connection refused" in result.stderr


def test_ctl_without_a_daemon(user_env: dict[str, str]) -> None:
    result = run_cli(["petals_client.cli", "ctl", "status"], env=user_env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no running petalsd found" in result.stderr and user_env["XDG_RUNTIME_DIR"] in result.stderr


def test_petalsd_errors_are_one_line(tmp_path: Path, user_env: dict[str, str]) -> None:
    base = ["petalsd", "--model", str(DEMO_MODEL), "--listen", "/ip4/127.0.0.1/tcp/0"]
    assert_one_line_error(run_cli([*base, "--new-swarm", "--bogus"], user_env), 2, "unrecognized arguments")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli([*base, "--new-swarm", "--device", "cuda"], user_env), 2,
                              "cuda is not available")
    assert_one_line_error(run_cli(["petalsd", "--model", str(tmp_path / "none"), "--new-swarm"], user_env), 1,
                          "not a directory")
    # (its log lines come first at the default level; at warning only the fatal line is left)
    assert_one_line_error(run_cli([*base, "--initial-peers", UNREACHABLE, "--num-threads", "1",
                                   "--log-level", "warning"], user_env), 1, "connection refused")


def test_a_key_file_in_use_is_refused(tmp_path: Path, user_env: dict[str, str]) -> None:
    key = tmp_path / "shared.key"
    first = subprocess.Popen([sys.executable, "-m", "petalsd", "--model", str(DEMO_MODEL), "--new-swarm",
                              "--listen", "/ip4/127.0.0.1/tcp/0", "--identity", str(key), "--num-threads", "1"],
                             env=user_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(first, [])
        second = run_cli(["petalsd", "--model", str(DEMO_MODEL), "--new-swarm", "--listen", "/ip4/127.0.0.1/tcp/0",
                          "--identity", str(key)], user_env)
        assert_one_line_error(second, 1, f"in use by daemon pid {first.pid}", str(key))
    finally:
        first.terminate()
        assert first.wait(30) == 0


@pytest.mark.parametrize("command", [["petalsd.cli"], ["petals_client.cli"]])
def test_help_and_version_do_not_import_torch(command: list[str]) -> None:
    name = "petalsd" if command[0] == "petalsd.cli" else "petals"
    for flag in ("--help", "--version"):
        code = (f"import sys; sys.argv = [{name!r}, {flag!r}]\n"
                f"from {command[0]} import main\n"
                "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
                "heavy = [m for m in ('torch', 'transformers', 'libp2p') if m in sys.modules]\n"
                "assert not heavy, heavy\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert ("Exit status" in result.stdout) if flag == "--help" else result.stdout.startswith(name), result.stdout


def test_library_raises_the_real_cause() -> None:
    from petals_client import AutoDistributedModelForCausalLM
    from petals_protocol.errors import PetalsError

    with pytest.raises(PetalsError, match="connection refused"):
        AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=[UNREACHABLE], connect_timeout=5)
