"""petalsd.config: precedence, validation errors that name key and file, sizes, reload diff."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from petalsd.config import (
    COMMAND_LINE, FIELD_NAMES, RELOADABLE_KEYS, ConfigError, DaemonConfig, _Invalid,
    build_arg_parser, diff_reload, format_size, load_config, load_invocation, parse_size,
    reloaded, to_toml,
)

PEER = "/ip4/127.0.0.1/tcp/31330/p2p/12D3KooWGzBVa5x9XhhzmTjG3FJDDLaxk5fPfNsXTvvVupvM5gKh"
EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "petalsd.toml.example"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "petalsd.toml"
    path.write_text(text)
    return path


def test_defaults_and_required_choices() -> None:
    c = load_config(["--model", "m", "--new-swarm"], environ={})
    assert c == DaemonConfig(model="m", new_swarm=True)
    assert c.listen == ["/ip4/0.0.0.0/tcp/31330"]
    assert c.cache_budget == 2**30 and c.max_frame_size == 64 * 2**20
    assert c.identity is None and c.control_socket is None and c.span() is None


def test_flags_override_file_and_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, f'model = "from-file"\ninitial_peers = ["{PEER}"]\n'
                           'max_length = 512\npublic_name = "file"\ncache_budget = "512MiB"\n')
    c = load_config(["--config", str(path), "--max-length", "1024"], environ={})
    assert c.model == "from-file"
    assert c.max_length == 1024  # flag wins
    assert c.public_name == "file"  # not given as a flag: the file's value stays
    assert c.cache_budget == 512 * 2**20
    assert c.initial_peers == [PEER]
    assert c.max_sessions == 32  # neither: default


def test_flag_choice_replaces_the_files_exclusive_choice(tmp_path: Path) -> None:
    path = write(tmp_path, f'model = "m"\nblocks = "0:4"\ninitial_peers = ["{PEER}"]\n')
    c = load_config(["--config", str(path), "--num-blocks", "3", "--new-swarm"], environ={})
    assert (c.blocks, c.num_blocks) == (None, 3)
    assert (c.initial_peers, c.new_swarm) == ([], True)
    assert load_config(["--config", str(path)], environ={}).span() == (0, 4)


def test_systemd_environment_defaults(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": "/var/lib/petalsd", "RUNTIME_DIRECTORY": "/run/petalsd"}
    c = load_config(["--model", "m", "--new-swarm"], environ=env)
    assert c.identity == Path("/var/lib/petalsd/identity.key")
    assert c.control_socket == Path("/run/petalsd/control.sock")
    c = load_config(["--model", "m", "--new-swarm", "--control-socket", str(tmp_path / "s")],
                    environ=env)
    assert c.control_socket == tmp_path / "s"


def test_invalid_value_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'model = "m"\nnew_swarm = true\nmax_sessions = "many"\n')
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path)], environ={})
    assert e.value.key == "max_sessions" and e.value.source == str(path)
    assert str(e.value).startswith(f"{path}: max_sessions: expected an integer")


@pytest.mark.parametrize("text, key", [
    ('blocks = "4:2"', "blocks"),
    ('dtype = "float8"', "dtype"),
    ('device = "gpu"', "device"),
    ('listen = ["/ip4/1.2.3/tcp/1"]', "listen"),
    ('listen = "/ip4/1.2.3.4/tcp/1"', "listen"),
    ('session_idle_timeout = -1', "session_idle_timeout"),
    ('balance_quality = 1.5', "balance_quality"),
    ('throughput = "fast"', "throughput"),
    ('cache_budget = "2 parsecs"', "cache_budget"),
    ('batching = "yes"', "batching"),
    ('record_ttl = 10', "record_ttl"),
])
def test_each_invalid_value_is_rejected(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, f'model = "m"\nnew_swarm = true\n{text}\n')
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path)], environ={})
    assert e.value.key == key
    assert str(path) in str(e.value)


def test_initial_peer_needs_peer_id() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(["--model", "m", "--initial-peers", "/ip4/127.0.0.1/tcp/1"], environ={})
    assert e.value.key == "initial_peers" and e.value.source == COMMAND_LINE
    assert "/p2p/PEER_ID" in e.value.message


def test_unknown_key_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, 'model = "m"\nnew_swarm = true\nmax_lenght = 10\n')
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path)], environ={})
    assert e.value.key == "max_lenght"
    assert "did you mean 'max_length'?" in str(e.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.toml")], environ={})
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load_config(["--config", str(write(tmp_path, "model = \n"))], environ={})
    assert e.value.key == "config"


def test_required_and_exclusive_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(["--new-swarm"], environ={})
    assert e.value.key == "model"
    with pytest.raises(ConfigError) as e:
        load_config(["--model", "m"], environ={})
    assert e.value.key == "initial_peers" and "--new-swarm" in e.value.message
    path = write(tmp_path, 'model = "m"\nnew_swarm = true\nblocks = "0:2"\nnum_blocks = 2\n')
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path)], environ={})
    assert e.value.key == "blocks/num_blocks" and e.value.source == str(path)
    with pytest.raises(SystemExit):  # argparse: not allowed together
        build_arg_parser().parse_args(["--blocks", "0:2", "--num-blocks", "2"])
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--new-swarm", "--initial-peers", PEER])


def test_system_config_used_only_under_systemd(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, 'model = "sys"\nnew_swarm = true\n')
    monkeypatch.setattr("petalsd.config.SYSTEM_CONFIG_PATH", path)
    inv = load_invocation([], environ={"INVOCATION_ID": "abc"})
    assert inv.config.model == "sys" and inv.config_path == path
    with pytest.raises(ConfigError):
        load_invocation([], environ={})


@pytest.mark.parametrize("text, n", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", 3 * 2**29), ("10kb", 10_000),
    ("1000", 1000), (4096, 4096), (" 3 mib ", 3 * 2**20),
])
def test_parse_size(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "GiB", "1 XB", "-1", -5, True, 1.5, None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(_Invalid):
        parse_size(bad)


def test_size_flag_and_format() -> None:
    c = load_config(["--model", "m", "--new-swarm", "--cache-budget", "2GiB",
                     "--max-frame-size", "1048576"], environ={})
    assert c.cache_budget == 2**31 and c.max_frame_size == 2**20
    assert [format_size(n) for n in (2**30, 1536 * 2**20, 1000)] == ["1GiB", "1536MiB", "1000"]


def test_print_config_round_trips(tmp_path: Path) -> None:
    inv = load_invocation(["--model", "m", "--initial-peers", PEER, "--blocks", "2:6",
                           "--throughput", "12.5", "--batching", "--print-config",
                           "--public-name", 'a "quoted" name'], environ={})
    assert inv.print_config
    text = to_toml(inv.config)
    tomllib.loads(text)
    again = load_config(["--config", str(write(tmp_path, text))], environ={})
    assert again == inv.config
    assert again.throughput == 12.5 and again.batching is True


def test_every_field_has_a_flag_and_help() -> None:
    help_text = build_arg_parser().format_help()
    for f in dataclasses.fields(DaemonConfig):
        assert "--" + f.name.replace("_", "-") in help_text
        assert f.metadata["help"]


def test_example_file_lists_every_key_and_loads(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    for name in FIELD_NAMES:
        assert f"# {name} = " in text or f"\n{name} = " in text, name
    # Uncommenting every example line yields a valid config (except the exclusive alternates).
    lines = [line[2:] for line in text.splitlines()
             if line.startswith("# ") and " = " in line.split("#", 2)[1]]
    data = tomllib.loads("\n".join(lines))
    assert set(data) == set(FIELD_NAMES)
    header = text.split("\n\n", 1)[0]
    assert all(key in header for key in RELOADABLE_KEYS)
    out = "\n".join(line for line in lines if not line.startswith(("num_blocks", "new_swarm")))
    load_config(["--config", str(write(tmp_path, out))], environ={})


def test_diff_reload() -> None:
    old = DaemonConfig(model="m", new_swarm=True)
    new = dataclasses.replace(old, max_sessions=4, log_level="debug", max_length=99,
                              device="cuda")
    applied, restart = diff_reload(old, new)
    assert applied == ["max_sessions", "log_level"]
    assert restart == ["device", "max_length"]
    merged = reloaded(old, new)
    assert (merged.max_sessions, merged.log_level, merged.max_length, merged.device) == \
        (4, "debug", 2048, "auto")
    assert diff_reload(old, old) == ([], [])
    assert "max_length" not in RELOADABLE_KEYS and "cache_budget" in RELOADABLE_KEYS
