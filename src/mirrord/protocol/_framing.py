"""Framing shared by both protocols: a 4-byte big-endian length, then one CBOR item.

Owns: splitting a byte stream into frame payloads with a hard size limit, and encoding one
CBOR item into a frame. Does not own: what the CBOR item means (the message registry,
`_base.py`).

Memory is bounded: the decoder never buffers more than one frame plus one read, and it
refuses a frame whose announced length exceeds the limit before reading its body.
"""

from __future__ import annotations

import struct
from typing import Any

import cbor2

from mirrord.protocol._exceptions import FrameTooLarge, MalformedFrame

__all__ = ["HEADER_SIZE", "MAX_FRAME_SIZE", "FrameDecoder", "decode_payload", "encode_frame"]

HEADER_SIZE = 4
# The largest data a single message carries is MAX_DATA_CHUNK (1 MiB) plus a few fields.
MAX_FRAME_SIZE = 2 * 1024 * 1024
_HEADER = struct.Struct(">I")


def encode_frame(item: Any) -> bytes:
    """One CBOR item as a frame."""
    payload = cbor2.dumps(item)
    return _HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> Any:
    """The CBOR item in one frame payload; `MalformedFrame` if it is not exactly one item."""
    try:
        return cbor2.loads(payload)
    except RecursionError as exc:
        raise MalformedFrame("CBOR item nested too deeply") from exc
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise MalformedFrame(f"invalid CBOR: {exc}") from exc


class FrameDecoder:
    """Bytes in, frame payloads out. Raises `FrameTooLarge` as soon as a header is too big."""

    __slots__ = ("_buffer", "_max_frame_size")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._max_frame_size = max_frame_size

    def __repr__(self) -> str:
        return f"<FrameDecoder buffered={len(self._buffer)} max={self._max_frame_size}>"

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_payload(self) -> bytes | None:
        """The next complete frame's payload, or None when more bytes are needed."""
        if len(self._buffer) < HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > self._max_frame_size:
            raise FrameTooLarge(size, self._max_frame_size)
        end = HEADER_SIZE + size
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return payload

    @property
    def buffered(self) -> int:
        return len(self._buffer)
