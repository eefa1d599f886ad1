"""The two wire protocols of mirrord, sans-IO: bytes in, events out, messages to bytes.

Owns: framing, message types, the codec, version negotiation, request and channel ids and
the credit window. Does not own any I/O: this package must never import anyio, socket or
scapy (a test checks it), so the agent (trio), the daemon (asyncio) and the tests all share it.

Compatibility: see `mirrord.protocol.messages` (kind ids are forever; the agent protocol only
grows; the layer protocol ships with both ends and is checked by build id).
"""

from __future__ import annotations

from mirrord.protocol import messages
from mirrord.protocol._base import Message, Registry
from mirrord.protocol._connection import (
    AGENT_PROTOCOL_VERSION,
    AGENT_REGISTRY,
    CLOSED,
    CONTROL_CHANNEL,
    INITIAL_WINDOW,
    LAYER_REGISTRY,
    MIN_AGENT_PROTOCOL_VERSION,
    NEED_DATA,
    AgentConnection,
    AgentRole,
    InvalidRequest,
    LayerConnection,
    LayerRole,
    Received,
    State,
    Undecoded,
    UnknownMessage,
)
from mirrord.protocol._exceptions import (
    BuildMismatch,
    FrameTooLarge,
    LocalProtocolError,
    MalformedFrame,
    ProtocolError,
    RemoteProtocolError,
    Unauthenticated,
    VersionMismatch,
)
from mirrord.protocol._flow import WRITE_EOF, Flow, FlowEvent, FlowState
from mirrord.protocol._framing import (
    MAX_FRAME_SIZE,
    FrameDecoder,
    encode_frame,
    frame_with_head,
    read_head,
    read_optional_uint,
    read_uints_then_bytes,
)

__all__ = [
    "AGENT_PROTOCOL_VERSION",
    "AGENT_REGISTRY",
    "CLOSED",
    "CONTROL_CHANNEL",
    "INITIAL_WINDOW",
    "LAYER_REGISTRY",
    "MAX_FRAME_SIZE",
    "MIN_AGENT_PROTOCOL_VERSION",
    "NEED_DATA",
    "WRITE_EOF",
    "AgentConnection",
    "AgentRole",
    "BuildMismatch",
    "Flow",
    "FlowEvent",
    "FlowState",
    "FrameDecoder",
    "FrameTooLarge",
    "InvalidRequest",
    "LayerConnection",
    "LayerRole",
    "LocalProtocolError",
    "MalformedFrame",
    "Message",
    "ProtocolError",
    "Received",
    "Registry",
    "RemoteProtocolError",
    "State",
    "Unauthenticated",
    "Undecoded",
    "UnknownMessage",
    "VersionMismatch",
    "encode_frame",
    "frame_with_head",
    "messages",
    "read_head",
    "read_optional_uint",
    "read_uints_then_bytes",
]
