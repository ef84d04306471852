"""The `petalsd` command: parse the configuration, set up logging, run the daemon.

Exit status: 0 after a clean drain (SIGTERM/SIGINT/`petals ctl stop`), 2 for a bad command line
or configuration, 1 for any other fatal error, always with a one-line reason on stderr.

Only the configuration module is imported before the command line is parsed: torch and libp2p
take seconds to import, and `petalsd --help` or a typo should answer at once.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

from . import config as config_mod

log = logging.getLogger("petalsd")


def setup_logging(level: str) -> None:
    """One line per event on stderr; no timestamps under systemd (journald adds its own)."""
    from petals_protocol.p2p.host import quiet_libp2p_logs

    under_systemd = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr, force=True)
    quiet_libp2p_logs()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        invocation = config_mod.load_invocation(argv)
    except config_mod.ConfigError as exc:
        print(f"petalsd: configuration error: {exc}", file=sys.stderr)
        return 2
    config = invocation.config
    if invocation.print_config:
        print(config_mod.to_toml(config), end="")
        return 0
    setup_logging(config.log_level)
    from petals_protocol.threads import quiet_openmp_waits

    quiet_openmp_waits()  # before torch is imported: its OpenMP runtime reads this once
    import trio

    from .daemon import build_daemon
    from .notify import Notifier

    notifier = Notifier.from_env()
    try:
        daemon = build_daemon(config, argv, notifier)
        trio.run(daemon.serve)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        reason = _expected_failure(exc)
        if reason is None:
            raise
        if config.log_level == "debug":
            traceback.print_exception(reason, file=sys.stderr)
        print(f"petalsd: fatal: {reason}", file=sys.stderr)
        notifier.stopping()
        return 1
    return 0


def _expected_failure(exc: BaseException) -> BaseException | None:
    """The error to report in one line (bad model path, port in use, unreadable identity...), even
    when trio wrapped it in exception groups; None for a bug, which keeps its traceback."""
    from petals_protocol.errors import PetalsError, first_error

    return first_error(exc, (PetalsError, OSError))
