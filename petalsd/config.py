"""The daemon's configuration: a TOML file merged with command-line flags into one `DaemonConfig`.

Precedence, lowest to highest: built-in defaults, defaults taken from systemd's environment
($STATE_DIRECTORY / $RUNTIME_DIRECTORY), the TOML file, then the flags actually given on the
command line. A flag that was not typed never overrides the file (argparse defaults are
suppressed for exactly that reason).

Everything is validated once, at start (and again on every reload), so that a typo fails fast
with an error that names the key and where it came from (`ConfigError`), instead of surfacing
an hour later as a strange runtime failure.

Keys in the file are the field names of `DaemonConfig` (snake_case, flat: no tables); flags are
the same names in kebab-case (`max_length` <-> `--max-length`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import multiaddr.exceptions

from petals_protocol.ids import __version__

#: Where a unit started by systemd looks for its file when no --config is given.
SYSTEM_CONFIG_PATH = Path("/etc/petalsd/petalsd.toml")

#: Where the origin of a value is reported when it was typed as a flag.
COMMAND_LINE = "command line"

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_BLOCKS_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
#: A public name is shown to other users in `petals swarm`; keep it short and printable.
MAX_PUBLIC_NAME = 64
#: Client peer ids one daemon may vouch for as contributors (own_clients): a few, or one daemon
#: could lend its priority to a crowd of consumers.
MAX_OWN_CLIENTS = 4


class ConfigError(ValueError):
    """A configuration value is invalid. `key` is the option's name, `source` where it came from
    (a file path, "command line", or None for a rule that spans several sources)."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


class _Invalid(ValueError):
    """Raised by a value parser; turned into a `ConfigError` that names the key and source."""


# --------------------------------------------------------------------------- value parsers


def parse_size(value: object) -> int:
    """Parse a byte count: an int, or a string such as "2GiB", "512MiB", "1.5G", "1000000".

    Binary suffixes (KiB, MiB, GiB, TiB and the bare K, M, G, T) are powers of 1024; SI ones
    (KB, MB, GB, TB) are powers of 1000. Case does not matter.
    """
    if isinstance(value, bool):
        raise _Invalid(f"expected a size such as 2GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise _Invalid(f"a size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise _Invalid(f"expected a size such as 2GiB or an integer, got {value!r}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise _Invalid(f"cannot parse size {value!r}; use e.g. 2GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """The shortest exact binary spelling of `n` bytes ("1GiB", "1536MiB", "1000")."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        mult = _SIZE_UNITS[unit.lower()]
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {value!r}")
    return value


def _nonempty_str(value: object) -> str:
    s = _str(value)
    if not s.strip():
        raise _Invalid("must not be empty")
    return s


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {value!r}")
    return value


def _positive_int(value: object) -> int:
    n = _int(value)
    if n <= 0:
        raise _Invalid(f"must be positive, got {n}")
    return n


def _positive_size(value: object) -> int:
    n = parse_size(value)
    if n <= 0:
        raise _Invalid("must be more than 0 bytes")
    return n


def _positive_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"expected a number of seconds, got {value!r}")
    if not 0 < value < float("inf"):
        raise _Invalid(f"must be a positive finite number of seconds, got {value!r}")
    return float(value)


def _path(value: object) -> Path:
    return Path(_nonempty_str(value)).expanduser()


def _peer_id(value: object) -> str:
    """A peer id with an embedded Ed25519 key ("12D3KooW..."), as `petals keygen` prints it."""
    from petals_protocol.errors import PetalsError
    from petals_protocol.membership import parse_owner

    s = _nonempty_str(value).strip()
    try:
        parse_owner(s)
    except PetalsError as exc:
        raise _Invalid(f"must be an Ed25519 peer id (12D3KooW...): {exc}") from None
    return s


def _peer_id_list(value: object) -> list[str]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of peer ids, got {type(value).__name__}")
    if len(value) > MAX_OWN_CLIENTS:
        raise _Invalid(f"lists at most {MAX_OWN_CLIENTS} peer ids")
    return [_peer_id(v) for v in value]


def _choice(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        s = _str(value).lower()
        if s not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
        return s
    return parse


def _device(value: object) -> str:
    s = _str(value)
    if not _DEVICE_RE.match(s):
        raise _Invalid(f"must be auto, cpu, cuda or cuda:N; got {s!r}")
    return s


def check_device_available(device: str) -> None:
    """Refuse a CUDA device this machine's torch cannot use, before anything is loaded. Imports
    torch only when CUDA was asked for, so validating a CPU or auto config stays cheap."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
        raise _Invalid(f"{device} is not available: {why}; use --device cpu or auto")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise _Invalid(f"{device} is not available: this machine has "
                       f"{torch.cuda.device_count()} CUDA device(s)")


def resolve_device(device: str) -> str:
    """"auto" -> cuda when torch sees a GPU, else cpu; anything else as configured."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _blocks(value: object) -> str:
    s = _str(value)
    m = _BLOCKS_RE.match(s)
    if not m:
        raise _Invalid(f"must be START:END (e.g. 0:12), got {s!r}")
    start, end = int(m.group(1)), int(m.group(2))
    if start >= end:
        raise _Invalid(f"START must be less than END, got {s!r}")
    return f"{start}:{end}"


def _public_name(value: object) -> str:
    s = _str(value)
    if len(s) > MAX_PUBLIC_NAME or not s.isprintable():
        raise _Invalid(f"must be printable and at most {MAX_PUBLIC_NAME} characters")
    return s


def _throughput(value: object) -> float | str:
    """"auto" (measure at start) or a positive number of tokens per second."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise _Invalid(f'must be "auto" or a number, got {value!r}') from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f'must be "auto" or a number, got {value!r}')
    if not 0 < value < float("inf"):
        raise _Invalid(f"must be positive, got {value!r}")
    return float(value)


def _quality(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _Invalid(f"must be a number in (0, 1], got {value!r}")
    return float(value)


def _path_strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"expected a list of paths, got {value!r}")
    return list(value)


def _multiaddr_list(require_peer_id: bool) -> Callable[[object], list[str]]:
    def parse(value: object) -> list[str]:
        if not isinstance(value, list):
            raise _Invalid(f"expected a list of multiaddrs, got {value!r}")
        out = []
        for item in value:
            text = _str(item)
            try:
                addr = multiaddr.Multiaddr(text)
            except (ValueError, multiaddr.exceptions.Error) as e:
                raise _Invalid(f"invalid multiaddr {text!r}: {e}") from None
            names = [p.name for p in addr.protocols()]
            if require_peer_id and "p2p" not in names:
                raise _Invalid(f"{text!r} must end in /p2p/PEER_ID so the peer can be authenticated")
            out.append(str(addr))
        return out
    return parse


# --------------------------------------------------------------------------- the config


def _opt(default: Any, parse: Callable[[object], Any], help: str, *,
         flag_type: Callable[[str], Any] | None = str, reload: bool = False,
         factory: Callable[[], Any] | None = None, choices: Sequence[str] | None = None) -> Any:
    """A `DaemonConfig` field: its default, its parser, its help (the field's documentation,
    shown in --help, --print-config and the example file) and whether reload applies it."""
    meta = {"parse": parse, "help": help, "flag_type": flag_type, "reload": reload,
            "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DaemonConfig:
    """Everything a daemon needs to start. Build it with `load_config`, which validates every
    field; constructing it directly (in tests) skips validation."""

    model: str = field(metadata={
        "parse": _nonempty_str, "flag_type": str, "reload": False, "choices": None,
        "help": "Local Hugging Face checkpoint folder, or a Hub model id ORG/NAME (fetched through the "
                "Hugging Face cache: HF_HOME, HF_TOKEN, HF_HUB_OFFLINE; only the shards of the served blocks). Required."})
    blocks: str | None = _opt(
        None, _blocks, "Serve exactly blocks START:END (end exclusive). Excludes num_blocks; "
        "with neither, the daemon chooses a span that fits its memory.")
    num_blocks: int | None = _opt(
        None, _positive_int, "Serve this many blocks, placed where the swarm needs them most.",
        flag_type=int)
    revision: str | None = _opt(
        None, _nonempty_str, "Hub models: the branch, tag or commit to serve (default: main), pinned to "
        "its commit at start.")
    max_disk_space: int | None = _opt(
        None, _positive_size, "Hub models: most bytes of this model's shards to keep in the Hugging Face "
        "cache; shards of blocks no longer served are deleted to stay under it (default: no limit).")
    initial_peers: list[str] = _opt(
        None, _multiaddr_list(require_peer_id=True), "Multiaddrs (ending in /p2p/PEER_ID) of "
        "peers already in the swarm. Exactly one of initial_peers and new_swarm is required.",
        factory=list)
    new_swarm: bool = _opt(
        False, _bool, "Start a new swarm instead of joining one (this daemon is the first peer).",
        flag_type=None)
    listen: list[str] = _opt(
        None, _multiaddr_list(require_peer_id=False), "Multiaddrs to listen on.",
        factory=lambda: ["/ip4/0.0.0.0/tcp/31330"])
    announce_addrs: list[str] = _opt(
        None, _multiaddr_list(require_peer_id=False), "Addresses to announce instead of the "
        "listen addresses (e.g. a public IP behind port forwarding). Empty: announce what we "
        "listen on plus relay addresses.", factory=list)
    identity: Path | None = _opt(
        None, _path, "Ed25519 key file (created if missing) that fixes the peer id across "
        "restarts; a second daemon given a key file in use is refused. Under systemd defaults to "
        "$STATE_DIRECTORY/identity.key. Unset elsewhere: the first key file of "
        "$XDG_STATE_HOME/petalsd/identity.key, identity-2.key, ... that no running daemon holds, "
        "so daemons on one host never share a peer id and each keeps its own across restarts.")
    control_socket: Path | None = _opt(
        None, _path, "Unix socket of the control API (`petals ctl`). Under systemd defaults to "
        "$RUNTIME_DIRECTORY/control.sock; elsewhere to $XDG_RUNTIME_DIR/petalsd/PEER.sock "
        "(/run/petalsd/PEER.sock as root), PEER being the end of the daemon's peer id.")
    control_api: bool = _opt(
        True, _bool, "Serve the control API on the control socket; --no-control-api turns it off.",
        flag_type=None)
    control_group: str | None = _opt(
        None, _nonempty_str, "Group allowed to use the control socket (mode 0660); unset: "
        "only the daemon's user and root (mode 0600).")
    dtype: str = _opt(
        "auto", _choice(DTYPES), "Weights and activations dtype; auto takes the checkpoint's "
        "dtype (float32 on CPU when that is float16).", choices=DTYPES)
    device: str = _opt("auto", _device, "Where blocks run: auto (cuda when torch sees a GPU, "
                       "else cpu), cpu, cuda or cuda:N. An unavailable device is refused at start.")
    public_name: str = _opt(
        "", _public_name, "A name shown to others in `petals swarm` (e.g. a URL).", reload=True)
    swarm_key: Path | None = _opt(
        None, _path, "Private swarm key file (libp2p pnet); only peers with it can connect.")
    swarm_owner: str | None = _opt(
        None, _peer_id, "Members-only swarm: the owner's peer id (`petals keygen`). Every connection, "
        "in and out, is refused right after its handshake unless the other side is the owner or "
        "shows the owner's membership certificate for its own peer id, not revoked.")
    member_certificate: Path | None = _opt(
        None, _path, "This daemon's membership certificate (`petals member add PEER_ID` run by the "
        "owner, for the peer id of --identity); the owner's own daemon needs none. Shown in info "
        "replies, so clients may choose daemons by issuer (allowed_peers); without swarm_owner the "
        "swarm stays open and the certificate only does that.")
    own_clients: list[str] = _opt(
        None, _peer_id_list, "Peer ids of clients this daemon's operator runs (their --identity). The "
        "daemon's record lists them, so that busy daemons serve them first, as contributors "
        f"(at most {MAX_OWN_CLIENTS}).", factory=list, reload=True)
    max_length: int = _opt(
        2048, _positive_int, "Most tokens one inference session may hold in its cache.",
        flag_type=int)
    max_batch_size: int = _opt(
        8, _positive_int, "Largest batch one request or session may send.", flag_type=int,
        reload=True)
    max_sessions: int = _opt(
        32, _positive_int, "Most concurrent inference sessions.", flag_type=int, reload=True)
    cache_budget: int = _opt(
        2**30, _positive_size, "Memory for KV caches of all sessions and for the activations of "
        "forward/backward requests while they run, in bytes or with a unit (2GiB, 512MiB). Sessions "
        "and requests that would exceed it are refused (busy).", reload=True)
    session_idle_timeout: float = _opt(
        300.0, _positive_seconds, "Seconds without a step before a session is closed and its "
        "cache freed.", flag_type=float, reload=True)
    step_timeout: float = _opt(
        60.0, _positive_seconds, "Seconds one step or forward/backward may compute before it "
        "fails with a timeout error.", flag_type=float)
    idle_connection_timeout: float = _opt(
        120.0, _positive_seconds, "Seconds a connection with no new streams and no session steps is kept; "
        "closing it frees its sessions (clients replay). Keep it above step_timeout.",
        flag_type=float)
    max_frame_size: int = _opt(
        64 * 2**20, _positive_size, "Largest protocol frame accepted, in bytes or with a unit; "
        "bigger frames are refused from their header alone.")
    drain_grace: float = _opt(
        30.0, _positive_seconds, "On SIGTERM or drain: seconds open sessions may finish before "
        "they are closed.", flag_type=float)
    announce_period: float = _opt(
        30.0, _positive_seconds, "Seconds between DHT record refreshes.", flag_type=float)
    record_ttl: float = _opt(
        90.0, _positive_seconds, "Seconds a DHT record stays valid; must exceed "
        "announce_period so records never lapse between refreshes.", flag_type=float)
    log_level: str = _opt(
        "info", _choice(LOG_LEVELS), "Least severe log level written to stderr.", reload=True,
        choices=LOG_LEVELS)
    throughput: float | str = _opt(
        "auto", _throughput, 'Announced block-steps/s (blocks x one-token steps per second, what '
        'routing divides by); "auto" measures it at start.')
    adapters: list[str] = _opt(
        None, _path_strings, "LoRA adapters to serve, each a folder in PEFT format (adapter_config.json, "
        "adapter_model.safetensors), named after the folder; clients choose one with active_adapter. "
        "An adapter that does not fit the model is refused at start.", factory=list)
    num_threads: int | None = _opt(
        None, _positive_int, "torch intra-op threads; unset: the cores free at start (usable cores "
        "less the load average, at least one).", flag_type=int)
    batching: bool = _opt(
        False, _bool, "Merge concurrent sessions' decode steps into one batched forward (Llama "
        "family). Several times the throughput for many sessions, but batched matmuls round "
        "differently from single-row ones (max abs diff ~1e-5 in fp32), so off by default. On CPU "
        "it keeps a oneDNN-packed copy of the linear weights (about the span's weight bytes again).",
        flag_type=None)
    balance_quality: float = _opt(
        0.75, _quality, "Move to other blocks only when the swarm's weakest block would gain: old minimum "
        "throughput < balance_quality x new minimum (near 0 never moves; 1.0 moves on any gain).",
        flag_type=float)
    rebalance_period: float = _opt(
        120.0, _positive_seconds, "Seconds between checks whether to move to other blocks.",
        flag_type=float)
    # -- resource limits against hostile peers (petalsd/limits.py gathers them; /v1/status shows them)
    max_sessions_per_peer: int = _opt(
        16, _positive_int, "Most inference sessions one peer may hold at once (the rest of "
        "max_sessions stays open to others); more are refused with busy.", flag_type=int, reload=True)
    max_streams_per_peer: int = _opt(
        64, _positive_int, "Most protocol streams one peer may have open here at once; more are "
        "refused with busy.", flag_type=int, reload=True)
    max_jobs_per_peer: int = _opt(
        16, _positive_int, "Most compute jobs (steps, forward, backward) of one peer queued or "
        "running at once; more are refused with busy.", flag_type=int, reload=True)
    peer_request_rate: float = _opt(
        100.0, _positive_seconds, "Requests per second one peer may make on average (new streams, "
        "session opens, forward and backward requests; decode steps are bounded by sessions "
        "instead); more are refused with busy.", flag_type=float, reload=True)
    peer_request_burst: int = _opt(
        200, _positive_int, "Requests one peer may make at once above peer_request_rate.",
        flag_type=int, reload=True)
    max_buffered_per_peer: int = _opt(
        256 * 2**20, _positive_size, "Bytes of unread frames one peer may make this daemon hold "
        "across its streams; a stream that would go past it is reset.", reload=True)
    max_buffered_total: int = _opt(
        2**30, _positive_size, "Bytes of unread frames all peers together may make this daemon "
        "hold; a stream that would go past it is reset.", reload=True)
    peer_strikes: int = _opt(
        20, _positive_int, "Streams a peer may have end in a protocol error or a limit refusal per "
        "minute; past it the peer is cut off for peer_ban_seconds.", flag_type=int, reload=True)
    peer_ban_seconds: float = _opt(
        60.0, _positive_seconds, "Seconds a peer that used up its strikes is cut off (its connections "
        "closed on arrival).", flag_type=float, reload=True)
    max_push_targets_per_session: int = _opt(
        4, _positive_int, "Most distinct next daemons one session may have its steps pushed to "
        "(a client replacing a failed hop needs a few).", flag_type=int, reload=True)
    reachability: str = _opt(
        "auto", _choice(("auto", "public", "private")), "Whether other peers can dial this daemon: "
        "auto asks other daemons to dial it back (loopback and private addresses never count as "
        "public); public serves as a relay for others; private reserves slots on relays and "
        "announces relayed addresses.", choices=("auto", "public", "private"))
    relay: list[str] = _opt(
        None, _multiaddr_list(require_peer_id=True), "Circuit Relay v2 relays (any implementation) "
        "to reserve on when not publicly reachable, tried before relays found in the swarm.",
        factory=list)
    relay_service: bool = _opt(
        True, _bool, "Offer Circuit Relay v2 hop service when publicly reachable.", flag_type=None)
    hole_punching: bool = _opt(
        True, _bool, "Behind NAT, turn relayed push links to daemons behind NAT into direct "
        "connections by TCP hole punching (asking and answering).", flag_type=None)
    relay_max_reservations: int = _opt(
        32, _positive_int, "Relay service: peers behind NAT that may hold a slot here at once.",
        flag_type=int)
    relay_max_circuits: int = _opt(
        16, _positive_int, "Relay service: relayed connections per reserved peer at once.",
        flag_type=int)
    relay_circuit_duration: float = _opt(
        86400.0, _positive_seconds, "Relay service: seconds one relayed connection may last (a long "
        "session's activations must not be cut).", flag_type=float)
    relay_circuit_data: int = _opt(
        64 * 2**30, _positive_size, "Relay service: bytes one relayed connection may carry "
        "(e.g. 64GiB).")
    relay_max_bandwidth: int | None = _opt(
        None, _positive_size, "Relay service: bytes per second all relayed connections together may "
        "carry (e.g. 10MiB); unset: no cap.")
    relay_circuit_bandwidth: int | None = _opt(
        None, _positive_size, "Relay service: bytes per second one relayed connection may carry, "
        "both directions together (e.g. 2MiB); unset: no cap.")

    def span(self) -> tuple[int, int] | None:
        """`blocks` as (start, end), or None when the daemon chooses its span."""
        if self.blocks is None:
            return None
        start, end = self.blocks.split(":")
        return int(start), int(end)


FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(DaemonConfig)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)

#: Keys a reload (SIGHUP or POST /v1/reload) applies to the running daemon. They only steer
#: future decisions (admitting a session, the next record, log filtering). Everything else needs
#: a restart: it fixes what was loaded (model, blocks, dtype, device), the libp2p host (listen,
#: identity, swarm_key, relay) or the cache layout sessions were admitted under (max_length is
#: announced and every open session's cache was sized by it).
RELOADABLE_KEYS: frozenset[str] = frozenset(f.name for f in FIELDS if f.metadata["reload"])

#: Pairs where one choice excludes the other. A higher-precedence source that picks one side
#: replaces whatever a lower one picked on the other side; one source picking both is an error.
EXCLUSIVE = (("blocks", "num_blocks"), ("initial_peers", "new_swarm"))


def _is_chosen(value: object) -> bool:
    return value not in (None, False, [])


# --------------------------------------------------------------------------- flags


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a pointer to --help, not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\nhint: `{self.prog} --help` lists the options\n")


def build_arg_parser() -> argparse.ArgumentParser:
    """The `petalsd` command line: one flag per `DaemonConfig` field plus --config and
    --print-config. Defaults are suppressed so that only flags actually given override the file.
    """
    p = _Parser(
        prog="petalsd", argument_default=argparse.SUPPRESS,
        description="Serve a span of a language model's transformer blocks to a petals swarm. "
                    "Options come from --config FILE (TOML, keys as below in snake_case) and "
                    "flags; flags win.",
        epilog="Exit status: 0 after a clean stop (SIGTERM, SIGINT, `petals ctl stop`); 1 for a "
               "fatal error at run time (model, identity, port, peers); 2 for a bad command line "
               "or configuration. Errors are one line on stderr; --log-level debug adds tracebacks.")
    p.add_argument("--version", action="version", version=f"petalsd {__version__}")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"TOML file; under systemd defaults to {SYSTEM_CONFIG_PATH} if it exists")
    p.add_argument("--print-config", action="store_true",
                   help="print the merged, validated configuration as TOML and exit")
    span = p.add_mutually_exclusive_group()
    swarm = p.add_mutually_exclusive_group()
    group_of = {"blocks": span, "num_blocks": span, "initial_peers": swarm, "new_swarm": swarm}
    for f in FIELDS:
        target = group_of.get(f.name, p)
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"].replace("%", "%%")
        if f.name == "new_swarm":  # a one-way switch: the file cannot make it true by default
            target.add_argument(flag, action="store_true", help=help_)
        elif f.type == "bool":
            target.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_ + _shown_default(f))
        elif f.type == "list[str]":
            target.add_argument(flag, nargs="+", metavar={"own_clients": "PEER_ID", "adapters": "PATH"}.get(f.name, "MULTIADDR"),
                                help=help_ + _shown_default(f))
        else:
            choices = f.metadata["choices"]
            target.add_argument(flag, type=f.metadata["flag_type"], help=help_ + _shown_default(f),
                                metavar="{" + ",".join(choices) + "}" if choices else _metavar(f),
                                choices=choices)
    return p


def _shown_default(f: dataclasses.Field) -> str:
    """" (default: X)" for --help, from the field itself (argparse's own defaults are suppressed
    so that an untyped flag never overrides the file)."""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return ""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None or value == [] or f.name == "new_swarm":
        return ""
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    if f.metadata["parse"] is _positive_size:
        return f" (default: {format_size(value)})"
    if isinstance(value, list):
        return f" (default: {' '.join(value)})"
    return f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"


def _metavar(f: dataclasses.Field) -> str:
    by_parser = {_positive_seconds: "SECONDS", _positive_int: "N", _path: "FILE",
                 _positive_size: "SIZE", _blocks: "START:END", _peer_id: "PEER_ID"}
    return by_parser.get(f.metadata["parse"], "PATH" if f.name == "model" else f.name.upper())


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Invocation:
    """The result of parsing `petalsd`'s arguments: the config and what else was asked for."""

    config: DaemonConfig
    config_path: Path | None
    print_config: bool


def load_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Parse flags, read the TOML file, merge (flags win), validate. Raises `ConfigError`;
    argparse exits with status 2 on a malformed flag. A reload calls this again with the same
    argv, so flags keep winning over the edited file."""
    return load_invocation(argv, environ).config


def load_invocation(argv: Sequence[str],
                    environ: Mapping[str, str] | None = None) -> Invocation:
    """Like `load_config`, but also says which file was read and whether --print-config was
    given (the daemon's entry point then prints `to_toml(config)` and exits)."""
    env = os.environ if environ is None else environ
    ns = vars(build_arg_parser().parse_args(list(argv)))
    config_path: Path | None = ns.pop("config", None)
    print_config = bool(ns.pop("print_config", False))
    if config_path is None and "INVOCATION_ID" in env and SYSTEM_CONFIG_PATH.exists():
        config_path = SYSTEM_CONFIG_PATH

    layers: list[tuple[str, dict[str, object]]] = [("environment", _environment_defaults(env))]
    if config_path is not None:
        layers.append((str(config_path), read_config_file(config_path)))
    layers.append((COMMAND_LINE, ns))
    return Invocation(merge_layers(layers), config_path, print_config)


def _environment_defaults(env: Mapping[str, str]) -> dict[str, object]:
    """Defaults systemd makes obvious: the identity in the StateDirectory, the control socket in
    the RuntimeDirectory (each variable may list several directories, colon-separated)."""
    out: dict[str, object] = {}
    if env.get("STATE_DIRECTORY"):
        out["identity"] = str(Path(env["STATE_DIRECTORY"].split(":")[0]) / "identity.key")
    if env.get("RUNTIME_DIRECTORY"):
        out["control_socket"] = str(Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock")
    return out


def read_config_file(path: Path) -> dict[str, object]:
    """Read a TOML file; unknown keys are rejected with a "did you mean" hint."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"file {path} does not exist", str(path)) from None
    except PermissionError:
        raise ConfigError("config", f"file {path} is not readable by this user", str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"not valid TOML: {e}", str(path)) from None
    for key in data:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"unknown key{hint}", str(path))
    return data


def merge_layers(layers: Sequence[tuple[str, Mapping[str, object]]]) -> DaemonConfig:
    """Merge (source, values) layers, later ones winning, then validate into a `DaemonConfig`.
    Values are raw (TOML values or flag strings); each is parsed by its field's parser."""
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    for source, layer in layers:
        parsed: dict[str, object] = {}
        for key, raw in layer.items():
            parse = _field(key).metadata["parse"]
            try:
                parsed[key] = parse(raw)
            except _Invalid as e:
                raise ConfigError(key, str(e), source) from None
        for a, b in EXCLUSIVE:
            if _is_chosen(parsed.get(a)) and _is_chosen(parsed.get(b)):
                raise ConfigError(f"{a}/{b}", f"{a} and {b} exclude each other; set one", source)
            for mine, other in ((a, b), (b, a)):
                if _is_chosen(parsed.get(mine)) and other in values:
                    del values[other], origin[other]
        values.update(parsed)
        origin.update(dict.fromkeys(parsed, source))

    if "model" not in values:
        raise ConfigError("model", "is required (--model PATH or model = \"...\" in the file)")
    if not _is_chosen(values.get("initial_peers")) and not values.get("new_swarm"):
        raise ConfigError("initial_peers", "give --initial-peers MULTIADDR... to join a swarm, "
                                           "or --new-swarm to start one")
    config = DaemonConfig(**values)  # type: ignore[arg-type]
    if config.record_ttl <= config.announce_period:
        raise ConfigError("record_ttl", f"({config.record_ttl:g} s) must exceed announce_period "
                                        f"({config.announce_period:g} s)",
                          origin.get("record_ttl") or origin.get("announce_period"))
    if config.control_group is not None and not config.control_api:
        raise ConfigError("control_group", "needs the control API (not --no-control-api)",
                          origin["control_group"])
    try:
        check_device_available(config.device)
    except _Invalid as e:
        raise ConfigError("device", str(e), origin.get("device")) from None
    return config


def _field(key: str) -> dataclasses.Field:
    for f in FIELDS:
        if f.name == key:
            return f
    raise ConfigError(key, "unknown key")


# --------------------------------------------------------------------------- reload & output


def diff_reload(old: DaemonConfig, new: DaemonConfig) -> tuple[list[str], list[str]]:
    """Compare the running config with a re-read one: (keys a reload applies now, changed keys
    that only take effect after a restart). Both lists are in field order."""
    changed = [n for n in FIELD_NAMES if getattr(old, n) != getattr(new, n)]
    return ([n for n in changed if n in RELOADABLE_KEYS],
            [n for n in changed if n not in RELOADABLE_KEYS])


def reloaded(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    """The config to run with after a reload: `old` with only the reloadable changes of `new`."""
    applied, _ = diff_reload(old, new)
    return dataclasses.replace(old, **{k: getattr(new, k) for k in applied})


def _toml_value(value: object, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and key in ("cache_budget", "max_frame_size", "max_disk_space", "max_buffered_per_peer",
                                          "max_buffered_total"):
        return json.dumps(format_size(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes


def to_toml(config: DaemonConfig, *, comments: bool = True) -> str:
    """Render `config` as TOML that `load_config` reads back to an equal config. Unset optional
    keys are written commented out; with `comments`, each key is preceded by its help."""
    lines = []
    for f in FIELDS:
        if comments:
            lines.extend(textwrap.wrap(f.metadata["help"], 96, initial_indent="# ",
                                       subsequent_indent="# "))
        value = getattr(config, f.name)
        if value is None:
            lines.append(f"# {f.name} =")
        else:
            lines.append(f"{f.name} = {_toml_value(value, f.name)}")
        if comments:
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
