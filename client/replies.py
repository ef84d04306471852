"""How the client checks a daemon's reply, for every protocol (sessions, forward, backward).

One rule everywhere: an `ErrorReply` becomes the typed error it names (`RemoteError`, blaming
the daemon that sent it), any other message than the one expected is a protocol error, and a
signed reply must verify against what the client sent (the binding) before it is used.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from petals_protocol.errors import ErrorCode, ProtocolError
from petals_protocol.messages import ErrorReply
from petals_protocol.signing import ResponseBinding, peer_id_from_text, verify_response

R = TypeVar("R")


def check_reply(reply: object, expected: type[R], peer: str, binding: Callable[[R], ResponseBinding] | None = None,
                *, signer: bytes | None = None) -> R:
    """`reply` as an `expected` message from daemon `peer` (base58 text), its signature verified
    over `binding(reply)` when a binding is given (`signer`: the peer id's bytes, if known)."""
    if isinstance(reply, ErrorReply):
        raise reply.to_exception(peer)
    if not isinstance(reply, expected):
        raise ProtocolError(ErrorCode.MALFORMED, f"expected {expected.__name__}, got {type(reply).__name__}")
    if binding is not None:
        verify_response(signer if signer is not None else peer_id_from_text(peer), binding(reply),
                        reply.signature)  # type: ignore[attr-defined]
    return reply
