"""The messages between the daemon and its Kubernetes helper process (`mirrord.kube._helper`).

Owns: their framing (a 4-byte big-endian length, then one CBOR map) and its bounds. Both ends
are this package's own code on one machine, over a socketpair nobody else holds; a malformed
or oversized message is still an error that ends the channel, never a hang.

Daemon to helper: `{"op": "start", "id", "target", "config"}` (the session's config as JSON
values), `{"op": "connect", "id", "handle"}`, `{"op": "stop", "id", "handle"}`.
Helper to daemon: `{"id", "progress": text}` (while a start runs), `{"id", "ok": {...}}`
(start: `handle`, `key`, `description`, `secret`; connect: `{"stream": true}`, with the
daemon's end of the new stream passed as SCM_RIGHTS with the message's first byte), `{"id", "error": {"code",
"message", "errors"}}`, and `{"ended": handle, "reason": text or None, "dead": {handle:
reason}}` when a stream the helper carried ended (sent before its socket is closed).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import cbor2

__all__ = ["MAX_MESSAGE", "HelperProtocolError", "MessageDecoder", "encode"]

_HEAD = struct.Struct(">I")
MAX_MESSAGE = 4 * 1024 * 1024  # a session's config is a few KiB


class HelperProtocolError(Exception):
    """A message that is not a CBOR map, or bigger than MAX_MESSAGE."""


def encode(message: dict[str, Any]) -> bytes:
    body = cbor2.dumps(message)
    if len(body) > MAX_MESSAGE:
        raise HelperProtocolError(f"a helper message of {len(body)} bytes (at most {MAX_MESSAGE})")
    return _HEAD.pack(len(body)) + body


class MessageDecoder:
    """Bytes in, whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _HEAD.size:
            (size,) = _HEAD.unpack_from(self._buf)
            if size > MAX_MESSAGE:
                raise HelperProtocolError(
                    f"a helper message of {size} bytes (at most {MAX_MESSAGE})"
                )
            if len(self._buf) < _HEAD.size + size:
                break
            body = bytes(self._buf[_HEAD.size : _HEAD.size + size])
            del self._buf[: _HEAD.size + size]
            fp = io.BytesIO(body)
            try:
                message = cbor2.CBORDecoder(fp).decode()
            except Exception as exc:  # cbor2 raises several types for malformed input
                raise HelperProtocolError(f"a helper message that is not CBOR: {exc}") from None
            if fp.tell() != size:  # cbor2.loads would ignore what follows the item
                raise HelperProtocolError(f"{size - fp.tell()} bytes after a helper message")
            if not isinstance(message, dict):
                raise HelperProtocolError(f"a helper message that is not a map: {message!r:.80}")
            out.append(message)
        return out
