"""petals_protocol: what every peer agrees on. This package (the wire core) is sans-IO: no
sockets, trio, torch or libp2p at import.

Feed bytes, get typed messages; give messages, get bytes::

    decoder = FrameDecoder()
    decoder.feed(data_from_stream)
    while (payload := decoder.next_frame()) is not None:
        msg = decode_message(payload)
    stream_write(encode_frame(encode_message(reply)))

Two subpackages sit on top of it and are not imported from here: `petals_protocol.models`
(torch, transformers: spans, checkpoints, fingerprints) and `petals_protocol.p2p` (trio, libp2p:
hosts, streams, DHT, relays); neither imports the other. ARCHITECTURE.md draws the layers and
tests/protocol/test_layering.py enforces them.
"""

from .errors import (
    BadRecord,
    BadSignature,
    BadTensor,
    ErrorCode,
    FrameTooLarge,
    MalformedMessage,
    PetalsError,
    ProtocolError,
    RemoteError,
)
from .framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, FrameDecoder, encode_frame
from .ids import (
    ALL_PROTOCOLS,
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    MAX_FINGERPRINT_LENGTH,
    PROTOCOL_VERSION,
    __version__,
    is_valid_fingerprint,
)
from .messages import (
    ID_SIZE,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PEER_ID_SIZE,
    MAX_UINT,
    MESSAGE_TYPES,
    SERVER_STATES,
    SIGNATURE_SIZE,
    BackwardRequest,
    BackwardResponse,
    CloseSession,
    ErrorReply,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    Message,
    PUSH_LANDED_FROM,
    OpenSession,
    PushLanded,
    SessionOpened,
    StepResult,
    confirms_landing,
    decode_message,
    encode_message,
    error_reply,
)
from .records import (
    MAX_ADDR_LENGTH,
    MAX_ADDRS,
    MAX_RECORD_SIZE,
    MAX_TTL,
    MODEL_INDEX_NAMESPACE,
    RECORD_NAMESPACE,
    ServerRecord,
    decode_record,
    encode_record,
    model_index_key,
    newer,
    parse_record_key,
    record_key,
    select_record,
)
from .signing import (
    PUBLIC_KEY_SIZE,
    RESPONSE_KINDS,
    ResponseBinding,
    backward_binding,
    forward_binding,
    inference_binding,
    peer_id_from_private_key,
    peer_id_from_public_key,
    peer_id_from_text,
    peer_id_to_text,
    private_key_from_seed,
    public_key_from_peer_id,
    sign_bytes,
    sign_response,
    verify_bytes,
    verify_response,
)
from .tensors import DTYPES, MAX_ELEMENTS, MAX_RANK, TensorPayload, from_torch, to_torch

__all__ = [
    # errors
    "ErrorCode", "PetalsError", "ProtocolError", "FrameTooLarge", "MalformedMessage", "BadTensor",
    "BadSignature", "BadRecord", "RemoteError",
    # framing
    "DEFAULT_MAX_FRAME_SIZE", "FRAME_HEADER_SIZE", "encode_frame", "FrameDecoder",
    # ids
    "INFO_PROTOCOL", "INFERENCE_PROTOCOL", "FORWARD_PROTOCOL", "BACKWARD_PROTOCOL", "ALL_PROTOCOLS",
    "PROTOCOL_VERSION", "__version__", "MAX_FINGERPRINT_LENGTH", "is_valid_fingerprint",
    # tensors
    "DTYPES", "MAX_RANK", "MAX_ELEMENTS", "TensorPayload", "from_torch", "to_torch",
    # messages
    "ID_SIZE", "SIGNATURE_SIZE", "MAX_PEER_ID_SIZE", "MAX_NAME_LENGTH", "MAX_ERROR_MESSAGE_LENGTH",
    "MAX_UINT", "SERVER_STATES", "InfoRequest", "InfoResponse", "OpenSession", "SessionOpened",
    "InferenceStep", "StepResult", "PushLanded", "PUSH_LANDED_FROM", "confirms_landing", "CloseSession", "ForwardRequest", "ForwardResponse",
    "BackwardRequest", "BackwardResponse", "ErrorReply", "Message", "MESSAGE_TYPES",
    "encode_message", "decode_message", "error_reply",
    # signing
    "PUBLIC_KEY_SIZE", "RESPONSE_KINDS", "ResponseBinding", "peer_id_from_public_key",
    "public_key_from_peer_id", "peer_id_from_private_key", "peer_id_to_text", "peer_id_from_text",
    "private_key_from_seed", "sign_response", "verify_response", "sign_bytes", "verify_bytes",
    "inference_binding", "forward_binding", "backward_binding",
    # records
    "MAX_RECORD_SIZE", "MAX_TTL", "MAX_ADDRS", "MAX_ADDR_LENGTH", "RECORD_NAMESPACE",
    "MODEL_INDEX_NAMESPACE", "ServerRecord", "encode_record", "decode_record", "select_record",
    "newer", "record_key", "model_index_key", "parse_record_key",
]  # fmt: skip
