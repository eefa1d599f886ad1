"""Errors of the protocol package, classified by who is at fault.

- `RemoteProtocolError`: the peer sent something we cannot accept (a malformed or oversize
  frame, a message that is illegal in the current state, a bad handshake). The connection is
  now in the ERROR state; the caller should send `conn.fatal_frame(exc)` if it can and close
  that connection only.
- `LocalProtocolError`: our own code misused the connection object (sending before the
  handshake, exceeding a credit window). It is a bug on our side.
"""

from __future__ import annotations

__all__ = [
    "BuildMismatch",
    "FrameTooLarge",
    "LocalProtocolError",
    "MalformedFrame",
    "ProtocolError",
    "RemoteProtocolError",
    "Unauthenticated",
    "VersionMismatch",
]


class ProtocolError(Exception):
    """Base of every protocol error; `code` is a short machine-readable reason."""

    code = "protocol_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol. Close this connection (after sending a Fatal frame)."""

    code = "remote_protocol_error"


class MalformedFrame(RemoteProtocolError):
    """A frame's payload is not valid CBOR or not a valid message. Close the connection."""

    code = "malformed_frame"


class FrameTooLarge(RemoteProtocolError):
    """A frame announced more bytes than the frame size limit. Close the connection."""

    code = "frame_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class Unauthenticated(RemoteProtocolError):
    """The peer's Hello carries the wrong agent secret: nothing is served to it. The daemon
    that sent it started another agent, or the secret was changed: start the session again."""

    code = "unauthenticated"

    def __init__(self) -> None:
        super().__init__("the agent secret does not match: not authenticated")


class VersionMismatch(RemoteProtocolError):
    """The two ends speak no common protocol version: upgrade the older one (the message says
    which ranges each end speaks)."""

    code = "version_mismatch"


class BuildMismatch(RemoteProtocolError):
    """The layer and the daemon come from different installs (their build ids differ): run
    the command with the `mirrord` of the install whose daemon answers, or stop that daemon."""

    code = "build_mismatch"


class LocalProtocolError(ProtocolError):
    """Our own code misused a connection object: this is a bug in mirrord, please report it."""

    code = "local_protocol_error"
