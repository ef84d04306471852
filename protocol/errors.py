"""Error codes and exception types shared by every peer.

Two families tell whose fault a failure is (as h11's Local/RemoteProtocolError do):

- `ProtocolError` (and its subclasses): *we* received bytes that break the protocol. Every decoder
  in this package raises only these on hostile input, never KeyError/TypeError/msgpack errors, so
  a handler can answer with an `ErrorReply` carrying `exc.code` and keep serving other streams.
- `RemoteError`: the *peer* told us, in an `ErrorReply`, that our request failed on its side.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

__all__ = [
    "ErrorCode",
    "PetalsError",
    "ProtocolError",
    "FrameTooLarge",
    "MalformedMessage",
    "BadTensor",
    "BadSignature",
    "BadRecord",
    "RemoteError",
]


class ErrorCode(str, Enum):
    """Machine-readable reason carried by `ErrorReply.code` (its value is what crosses the wire)."""

    MALFORMED = "malformed"  # not a valid frame/message: wrong type, missing field, bad msgpack
    TOO_LARGE = "too_large"  # frame above the receiver's maximum frame size
    BAD_TENSOR = "bad_tensor"  # dtype not whitelisted, shape/length disagree, limits exceeded
    BAD_SIGNATURE = "bad_signature"  # a signature or a peer id that embeds no usable key
    BAD_RECORD = "bad_record"  # a DHT record that fails validation
    UNKNOWN_SESSION = "unknown_session"  # step/close for a session this daemon does not hold
    SESSION_EXISTS = "session_exists"  # open with a session id already in use on this stream
    BUSY = "busy"  # no room: sessions, KV-cache tokens or queue are full; retry elsewhere
    TOO_LONG = "too_long"  # a step would go past the session's max_length
    BAD_REQUEST = "bad_request"  # well-formed but wrong: span not served, fingerprint mismatch...
    WRONG_MODEL = "wrong_model"  # the daemon serves other weights than the request names
    INTERNAL = "internal"  # the daemon failed (a bug, out of memory); not the caller's fault
    TIMEOUT = "timeout"  # the daemon gave up waiting (idle session, slow peer)
    DRAINING = "draining"  # the daemon is shutting down and takes no new work
    UNSUPPORTED = "unsupported"  # a feature or message this daemon does not implement


class PetalsError(Exception):
    """Base of every error this project raises on purpose."""


class ProtocolError(PetalsError):
    """Input received from a peer violates the protocol; `code` says how (for an ErrorReply)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class _FixedCodeError(ProtocolError):
    """A ProtocolError whose code is implied by its type, so callers pass only the message."""

    CODE: ClassVar[ErrorCode]

    def __init__(self, message: str) -> None:
        super().__init__(self.CODE, message)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # keep pickling (e.g. across processes) working
        return (type(self), (self.message,))


class FrameTooLarge(_FixedCodeError):
    """A frame header announced (or a caller tried to send) more than the maximum frame size."""

    CODE = ErrorCode.TOO_LARGE


class MalformedMessage(_FixedCodeError):
    """Bytes that do not decode to a valid message (or a truncated frame at end of stream)."""

    CODE = ErrorCode.MALFORMED


class BadTensor(_FixedCodeError):
    """A tensor payload outside the whitelist/limits or whose shape and byte length disagree."""

    CODE = ErrorCode.BAD_TENSOR


class BadSignature(_FixedCodeError):
    """A response signature that does not verify, or a peer id that embeds no Ed25519 key."""

    CODE = ErrorCode.BAD_SIGNATURE


class BadRecord(_FixedCodeError):
    """A DHT record that is oversized, malformed, unsigned, forged, expired or names the wrong model."""

    CODE = ErrorCode.BAD_RECORD


class RemoteError(PetalsError):
    """The peer answered with an ErrorReply: the request failed on its side.

    `peer` is the peer id (text form) of whoever sent the reply, when the caller knows it.
    """

    def __init__(self, code: ErrorCode, message: str, peer: str | None = None) -> None:
        where = f" from {peer}" if peer else ""
        super().__init__(f"{ErrorCode(code).value}{where}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.peer = peer

    def __reduce__(self) -> tuple[type, tuple[ErrorCode, str, str | None]]:
        return (type(self), (self.code, self.message, self.peer))


def first_error(exc: BaseException, wanted: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of one of the `wanted` types in `exc`, looking inside (nested) exception
    groups; None if there is none.

    trio wraps whatever fails inside a nursery in an ExceptionGroup; a user who could not join a
    swarm should read the `DialError` inside, not a group's traceback. Both commands and the
    client library report failures through this one function.
    """
    if isinstance(exc, wanted):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_error(inner, wanted)
            if found is not None:
                return found
    return None
