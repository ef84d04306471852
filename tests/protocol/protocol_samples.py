"""Valid protocol objects shared by the protocol tests (one of every message, a signed record)."""

from __future__ import annotations

import struct

from petals_protocol import (
    BackwardRequest,
    BackwardResponse,
    CloseSession,
    ErrorCode,
    ErrorReply,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    Message,
    OpenSession,
    PushLanded,
    ServerRecord,
    SessionOpened,
    StepResult,
    TensorPayload,
    peer_id_from_private_key,
    peer_id_to_text,
    private_key_from_seed,
)

SESSION_ID = bytes(range(16))
REQUEST_ID = bytes(range(100, 116))
FINGERPRINT = "sha256:" + "ab" * 32
SIGNATURE = bytes(range(64))
SEED = b"\x07" * 32
OTHER_SEED = b"\x08" * 32


def hidden(batch: int = 1, seq: int = 3, dim: int = 4, dtype: str = "float32") -> TensorPayload:
    values = [0.25 * i for i in range(batch * seq * dim)]
    if dtype == "float32":
        data = struct.pack(f"<{len(values)}f", *values)
    elif dtype == "float16":
        data = struct.pack(f"<{len(values)}e", *values)
    else:
        raise ValueError(dtype)
    return TensorPayload(dtype, (batch, seq, dim), data)


def hypo_ids() -> TensorPayload:
    return TensorPayload("int64", (2,), struct.pack("<2q", 1, 0))


def push_targets() -> tuple:
    """Two contiguous next hops (blocks 5:7 and 7:8) for InferenceStep.push."""
    from petals_protocol.messages import PushTarget

    peers = [peer_id_from_private_key(private_key_from_seed(bytes([s]) * 32)) for s in (10, 11)]
    return tuple(
        PushTarget(peer, f"/ip4/127.0.0.1/tcp/{4001 + i}/p2p/{peer_id_to_text(peer)}", bytes([i + 1]) * 16,
                   start, end, step=3 + i)
        for i, (peer, (start, end)) in enumerate(zip(peers, [(5, 7), (7, 8)]))
    )


def sample_messages() -> list[Message]:
    """One instance of every message type, plus the optional-field variants."""
    peer_id = peer_id_from_private_key(private_key_from_seed(SEED))
    return [
        InfoRequest(),
        InfoResponse(
            peer_id=peer_id,
            version="0.1.0",
            model_name="tiny-llama",
            model_fingerprint=FINGERPRINT,
            num_blocks=8,
            start_block=2,
            end_block=6,
            dtype="bfloat16",
            state="online",
            max_length=2048,
            max_batch_size=4,
            max_sessions=16,
            active_sessions=3,
            cache_tokens_free=12345,
            throughput=87.5,
            public_name="alice's box",
        ),
        OpenSession(SESSION_ID, FINGERPRINT, 2, 5, max_length=256, batch_size=1),
        SessionOpened(SESSION_ID, 256),
        InferenceStep(SESSION_ID, step=0, position=0, hidden=hidden()),
        InferenceStep(SESSION_ID, step=7, position=12, hidden=hidden(2, 1, 4, "float16"), hypo_ids=hypo_ids()),
        InferenceStep(SESSION_ID, step=2, position=5, hidden=hidden(), push=push_targets()),
        StepResult(SESSION_ID, 7, 12, hidden(), SIGNATURE),
        PushLanded(SESSION_ID, 7),
        CloseSession(SESSION_ID),
        ForwardRequest(REQUEST_ID, FINGERPRINT, 0, 8, hidden()),
        ForwardResponse(REQUEST_ID, hidden(), SIGNATURE),
        BackwardRequest(REQUEST_ID, FINGERPRINT, 0, 8, hidden(), hidden()),
        BackwardResponse(REQUEST_ID, hidden(), SIGNATURE),
        ErrorReply(ErrorCode.BUSY, "no room for 256 tokens", SESSION_ID, None),
        ErrorReply(ErrorCode.MALFORMED, "bad frame", None, REQUEST_ID),
        ErrorReply(ErrorCode.INTERNAL, "", None, None),
    ]


def sample_record(now: float, *, seed: bytes = SEED, seq: int = 1, ttl: float = 300.0) -> ServerRecord:
    peer_id = peer_id_from_private_key(private_key_from_seed(seed))
    text = peer_id_to_text(peer_id)
    relay = peer_id_to_text(peer_id_from_private_key(private_key_from_seed(b"\x09" * 32)))
    return ServerRecord(
        peer_id=peer_id,
        model_fingerprint=FINGERPRINT,
        model_name="tiny-llama",
        start_block=0,
        end_block=4,
        num_blocks=8,
        state="online",
        throughput=42.0,
        cache_tokens_free=4096,
        addrs=(
            f"/ip4/127.0.0.1/tcp/4001/p2p/{text}",
            f"/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{text}",
        ),
        public_name="alice",
        version="0.1.0",
        expires_at=now + ttl,
        seq=seq,
        using_relay=True,
    )
