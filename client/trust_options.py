"""The trust options shared by `petals generate`, `chat` and `serve`: spot checks and chosen peers;
and the membership options (identity, members-only swarm) shared by those and `petals swarm`.

One definition of the flags and of how they become `from_pretrained` keywords, so the commands
cannot drift apart (the meaning of each: client/spotcheck.py, client/swarm.py, client/members.py).
"""
from __future__ import annotations

import argparse
from typing import Any


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0.0-1.0, got {text}")
    return value


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spot-check-rate", type=_rate, default=0.0, metavar="R",
                        help="re-compute this fraction (0.0-1.0) of steps on another daemon serving the same blocks; "
                             "a daemon found wrong is avoided and reported (1.0: every step, before any token "
                             "is shown; default 0: off)")
    parser.add_argument("--no-recheck-reports", dest="recheck_reports", action="store_false",
                        help="avoid a daemon accused by a verified evidence report without first running the "
                             "report's inputs again on a daemon not involved (or this machine's copy of the blocks)")
    parser.add_argument("--allowed-peers", nargs="+", metavar="PEER_ID",
                        help="use only these daemons, for routing, recovery and spot checks: peer ids, or the "
                             "peer id of a certificate issuer (`petals keygen` prints it), which allows every "
                             "daemon showing that issuer's valid, unrevoked membership certificate")
    parser.add_argument("--blocked-peers", nargs="+", metavar="PEER_ID",
                        help="never use these daemons (peer ids)")


def trust_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained` keywords from the parsed flags."""
    return {"spot_check_rate": args.spot_check_rate, "recheck_reports": args.recheck_reports,
            "allowed_peers": args.allowed_peers,
            "blocked_peers": args.blocked_peers or ()}


def add_membership_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity", metavar="FILE", help="key file fixing this client's peer id (created if "
                        "missing; see `petals keygen`): for a membership certificate or a daemon's --own-clients")
    parser.add_argument("--swarm-owner", metavar="PEER_ID", help="members-only swarm: the owner's peer id")
    parser.add_argument("--member-certificate", metavar="FILE", help="members-only swarm: this client's "
                        "certificate (`petals member add` for the peer id of --identity)")


def membership_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained` keywords for --identity / --swarm-owner / --member-certificate."""
    return {"identity": args.identity, "swarm_owner": args.swarm_owner, "member_certificate": args.member_certificate}
