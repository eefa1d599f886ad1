"""Framing shared by both protocols: a 4-byte big-endian length, then one CBOR item.

Owns: splitting a byte stream into frame payloads with a hard size limit, encoding one CBOR
item into a frame, and a frame's head. Does not own: what the CBOR item means (the message
registry, `_base.py`).

The head of a frame: every frame is a CBOR array (definite length) whose first items are
unsigned integers: the channel (agent protocol only), the message kind and, for requests and
replies, the request id. `read_head` reads them without decoding the rest of the frame (the
body: the remaining items, as they came), and `frame_with_head` builds a frame from a new head
and a body. That is how the daemon forwards file, env and DNS requests and their replies
between a layer and its agent channel (kinds 1-99 are the same message in both protocols):
it rewrites the head (request id, channel) and passes the body through as bytes, never
decoding it. Our encoders (cbor2, the C layer's) always write the head in its shortest form;
a frame whose head is not of this form (an indefinite-length array, a kind that is no
unsigned integer) is simply not forwarded undecoded: the full decoder judges it.

Memory is bounded: the decoder never buffers more than one frame plus one read, and it
refuses a frame whose announced length exceeds the limit before reading its body.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence, Sized
from typing import Any

import cbor2

from mirrord.protocol._exceptions import FrameTooLarge, MalformedFrame

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME_SIZE",
    "FrameDecoder",
    "bytes_frame",
    "bytes_frame_head",
    "bytes_frame_parts",
    "decode_payload",
    "encode_frame",
    "frame_parts_with_head",
    "frame_with_head",
    "read_head",
    "read_optional_uint",
    "read_uints_then_bytes",
]

HEADER_SIZE = 4
# The largest data a single message carries is MAX_DATA_CHUNK (1 MiB) plus a few fields.
MAX_FRAME_SIZE = 2 * 1024 * 1024
_HEADER = struct.Struct(">I")


def encode_frame(item: Any) -> bytes:
    """One CBOR item as a frame."""
    payload = cbor2.dumps(item)
    return _HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes | bytearray) -> Any:
    """The CBOR item in one frame payload; `MalformedFrame` if it is not exactly one item."""
    if len(payload) >= _LARGE_FRAME:
        flat = _decode_flat_array(payload)
        if flat is not None:
            return flat
    fp = io.BytesIO(payload)
    try:
        item = cbor2.CBORDecoder(fp).decode()
    except RecursionError as exc:
        raise MalformedFrame("CBOR item nested too deeply") from exc
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise MalformedFrame(f"invalid CBOR: {exc}") from exc
    extra = len(payload) - fp.tell()  # cbor2.loads would ignore them
    if extra:
        raise MalformedFrame(f"invalid CBOR: {extra} bytes after the frame's item")
    return item


_UINT_SIZES = {24: 1, 25: 2, 26: 4, 27: 8}  # CBOR additional info -> bytes of the value


def _uint_at(payload: bytes | bytearray | memoryview, pos: int, major: int) -> tuple[int, int]:
    """The unsigned value of the CBOR head at `pos` whose major type must be `major` (0: an
    unsigned integer, 4: an array's length); (-1, pos) if it is something else or cut short."""
    if pos >= len(payload):
        return -1, pos
    initial = payload[pos]
    if initial >> 5 != major:
        return -1, pos
    info = initial & 0x1F
    if info < 24:
        return info, pos + 1
    size = _UINT_SIZES.get(info)
    if size is None or pos + 1 + size > len(payload):
        return -1, pos  # indefinite length, reserved values, or cut short
    return int.from_bytes(payload[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


def _decode_flat_array(payload: bytes | bytearray) -> list[Any] | None:
    """A large frame's array of plain items (integers, null, booleans, definite byte
    strings), decoded here with each byte string copied once: cbor2 copies a large one three
    times (its input into a stream, then the string out of it in pieces, then the pieces
    joined), which for a relayed MiB cost more than the rest of its decoding. None if the
    payload is anything else, or not exactly that one array: cbor2 decodes it (or says what
    is wrong with it)."""
    count, pos = _uint_at(payload, 0, 4)
    if not 0 <= count <= 16:
        return None
    end = len(payload)
    items: list[Any] = []
    with memoryview(payload) as view:
        for _ in range(count):
            if pos >= end:
                return None
            initial = payload[pos]
            major = initial >> 5
            if major <= 1:  # an unsigned or a negative integer
                value, pos = _uint_at(payload, pos, major)
                if value < 0:
                    return None
                items.append(value if major == 0 else -1 - value)
            elif major == 2:
                length, start = _uint_at(payload, pos, 2)
                if length < 0 or start + length > end:
                    return None
                items.append(bytes(view[start : start + length]))
                pos = start + length
            elif initial in _SIMPLE:
                items.append(_SIMPLE[initial])
                pos += 1
            else:
                return None
    return items if pos == end else None


_SIMPLE = {0xF4: False, 0xF5: True, 0xF6: None}


def read_head(
    payload: bytes | bytearray | memoryview, ints: int
) -> tuple[list[int], int, int] | None:
    """The frame's first `ints` items, each an unsigned integer (e.g. 3: channel, kind,
    request id of an agent-protocol request), without decoding the rest: (those integers, the
    array's number of items, the offset of the body, i.e. of the items after them). None when
    the frame does not start that way (the full decoder then judges it)."""
    items, pos = _uint_at(payload, 0, 4)
    head = _uints_at(payload, pos, ints) if items >= ints else None
    return None if head is None else (head[0], items, head[1])


def _uints_at(
    payload: bytes | bytearray | memoryview, pos: int, count: int
) -> tuple[list[int], int] | None:
    """`count` unsigned integers at `pos`: (them, the offset after them), or None."""
    values = []
    for _ in range(count):
        value, pos = _uint_at(payload, pos, 0)
        if value < 0:
            return None
        values.append(value)
    return values, pos


def read_uints_then_bytes(
    payload: bytes | bytearray | memoryview, pos: int, ints: int
) -> tuple[list[int], int, int] | None:
    """At `pos` (a body's offset, `read_head`'s): `ints` unsigned integers, then the head of a
    definite byte string, read without the string itself (e.g. a `FileWrite`'s handle and
    data): (those integers, the string's length, the offset of its first byte). None when the
    body does not start that way (the full decoder then judges it)."""
    found = _uints_at(payload, pos, ints)
    if found is None:
        return None
    length, start = _uint_at(payload, found[1], 2)
    return None if length < 0 else (found[0], length, start)


def read_optional_uint(item: bytes | bytearray | memoryview) -> int | None:
    """`item`, exactly one CBOR item: an unsigned integer, or null (None). `MalformedFrame`
    for anything else (e.g. a frame's last item, read apart from the rest of it)."""
    if bytes(item) == b"\xf6":
        return None
    value, end = _uint_at(item, 0, 0)
    if value < 0 or end != len(item):
        raise MalformedFrame("not an unsigned integer or null")
    return value


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes((major << 5 | value,))
    if value < 0x100:
        return bytes((major << 5 | 24, value))
    if value < 0x10000:
        return bytes((major << 5 | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((major << 5 | 26,)) + value.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + value.to_bytes(8, "big")


def frame_with_head(head: list[int], items: int, body: bytes | memoryview) -> bytes:
    """A frame (length prefix included) holding an array of `items` items: the unsigned
    integers `head`, then `body`, the encoding of the remaining items exactly as it came (one
    copy of it)."""
    prefix = _cbor_head(4, items) + b"".join(_cbor_head(0, value) for value in head)
    return b"".join((_HEADER.pack(len(prefix) + len(body)), prefix, body))


# A body at least this big is sent as its own part of a scatter write (`frame_parts_with_head`),
# not copied into a joined frame: a file's 1 MiB chunk crosses the daemon with no copy of its
# own.
SCATTER_BODY = 64 * 1024


def frame_parts_with_head(
    head: list[int], items: int, body: bytes | memoryview, tail: Sequence[Sized] = ()
) -> bytes | list[Any]:
    """`frame_with_head`'s frame, as parts when the body is large (`SCATTER_BODY`): the new
    length prefix and head, then `body` itself, uncopied (for `socket.sendmsg` or a writer that
    takes a list of parts); a small frame is one joined `bytes`. `tail`: the body's last
    bytes, held elsewhere (`mirrord._splice.PipePart`s), parts of their own after `body`."""
    if not tail and len(body) < SCATTER_BODY:
        return frame_with_head(head, items, body)
    prefix = _cbor_head(4, items) + b"".join(_cbor_head(0, value) for value in head)
    size = len(prefix) + len(body) + sum(len(part) for part in tail)
    parts: list[Any] = [_HEADER.pack(size) + prefix]
    if body:
        parts.append(body)
    parts.extend(tail)
    return parts


def bytes_frame(head: list[int], data: bytes) -> bytes:
    """The frame of an array of the unsigned integers `head` followed by the byte string
    `data`, byte for byte what `encode_frame` makes of it, with one copy of `data` instead of
    two (connection `Data`: the relays' bulk)."""
    prefix = b"".join(
        [_cbor_head(4, len(head) + 1), *(_cbor_head(0, v) for v in head), _cbor_head(2, len(data))]
    )
    return b"".join((_HEADER.pack(len(prefix) + len(data)), prefix, data))


def bytes_frame_parts(head: list[int], data: bytes) -> bytes | list[bytes | memoryview]:
    """`bytes_frame`'s frame, as two parts when `data` is large (`SCATTER_BODY`): the length
    prefix and head, then `data` itself, uncopied."""
    if len(data) < SCATTER_BODY:
        return bytes_frame(head, data)
    return [bytes_frame_head(head, len(data)), data]


def bytes_frame_head(head: list[int], size: int) -> bytes:
    """`bytes_frame`'s frame up to its byte string of `size` bytes (length prefix included):
    the bytes themselves follow as a part of their own (`bytes_frame_parts`, or a pipe's)."""
    prefix = b"".join(
        [_cbor_head(4, len(head) + 1), *(_cbor_head(0, v) for v in head), _cbor_head(2, size)]
    )
    return _HEADER.pack(len(prefix) + size) + prefix


# A frame at least this big is collected in a buffer of its own, sized by its header: each
# byte received is copied once (into it), not appended, sliced and copied out again.
_LARGE_FRAME = 64 * 1024
# The read after a large frame (`FrameDecoder.free_space`): the next frame's length prefix and
# head, and at most this much of its payload to copy if it is large too.
_HEAD_READ = 4096


class FrameDecoder:
    """Bytes in, frame payloads out. Raises `FrameTooLarge` as soon as a header is too big.

    A large payload (a file's data) is copied once on its way through: into a bytearray of
    the size its header announced, which `next_payload` hands out as it is (a bytes-like
    object the caller owns). A reader may even receive the rest of it in place:
    `free_space()` is the part of that buffer still to fill; a memoryview of it handed back
    to `receive_data` counts as received, with no copy (`FrameReader.run(into=...)`).

    Right after a large frame, `free_space()` is a small buffer of the decoder's own
    (`_HEAD_READ` bytes): in a stream of large frames the next one's first bytes arrive there,
    so only those few are copied into its buffer, not a whole read's worth. One such small
    read per large frame; a stream of small frames never gets one.

    A large payload's buffer is made when its next bytes come (`receive_data`, `free_space`),
    not when its header is read: until then the payload may be given up (`take_large`, the
    daemon's splice), and a buffer that nobody fills is not zero-filled for nothing."""

    __slots__ = (
        "_after_large",
        "_buffer",
        "_filled",
        "_head",
        "_large",
        "_max_frame_size",
        "_pending",
        "large_frames",
    )

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._large: bytearray | None = None  # the payload being collected, if large
        self._filled = 0
        self._max_frame_size = max_frame_size
        self._after_large = False  # a large payload was just handed out
        self._head: bytearray | None = None  # the small read after one (`_HEAD_READ`)
        # a large payload's size while its buffer is not made yet (`_open_large`): `_buffer`
        # holds its header and its first bytes
        self._pending = 0
        self.large_frames = 0  # large frames begun: tells one from the next (`large_prefix`)

    def __repr__(self) -> str:
        return f"<FrameDecoder buffered={self.buffered} max={self._max_frame_size}>"

    def receive_data(self, data: bytes | memoryview) -> None:
        if self._pending:
            self._open_large()
        large = self._large
        if large is None or self._filled == len(large):
            self._after_large = False
            self._buffer += data  # a slice of `_head` too: its bytes are copied out here
            return
        if isinstance(data, memoryview) and data.obj is large:
            self._filled += len(data)  # received in place, into `free_space()`
            return
        with memoryview(data) as view:
            n = min(len(view), len(large) - self._filled)
            large[self._filled : self._filled + n] = view[:n]
            self._filled += n
            if n < len(view):
                self._buffer += view[n:]

    def next_payload(self) -> bytes | None:
        """The next complete frame's payload, or None when more bytes are needed."""
        if self._pending:
            return None
        large = self._large
        if large is not None:
            if self._filled < len(large):
                return None
            self._large = None
            self._after_large = True
            return large  # type: ignore[return-value]  # bytes-like, the caller's from here
        if len(self._buffer) < HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > self._max_frame_size:
            raise FrameTooLarge(size, self._max_frame_size)
        end = HEADER_SIZE + size
        if len(self._buffer) < end:
            if size >= _LARGE_FRAME:  # the rest goes straight into a buffer of its own
                self.large_frames += 1
                self._pending = size
            return None
        with memoryview(self._buffer) as view:
            payload = bytes(view[HEADER_SIZE:end])
        del self._buffer[:end]
        return payload

    def free_space(self) -> memoryview | None:
        """Where the next bytes go, if the decoder has a place for them: the rest of the large
        payload being collected, or right after one the small `_head` buffer. A reader may
        receive into it and pass the filled part (a slice of this view) to `receive_data`.
        None: pass what was read."""
        if self._pending:
            self._open_large()
        large = self._large
        if large is not None and self._filled < len(large):
            return memoryview(large)[self._filled :]
        if not self._after_large or self._buffer:
            return None
        if self._head is None:
            self._head = bytearray(_HEAD_READ)
        return memoryview(self._head)

    def _open_large(self) -> None:
        size, self._pending = self._pending, 0
        self._large = bytearray(size)
        self._filled = len(self._buffer) - HEADER_SIZE
        with memoryview(self._buffer) as view:
            self._large[: self._filled] = view[HEADER_SIZE:]
        self._buffer.clear()

    def large_prefix(self, at_most: int = 64) -> tuple[bytes, int] | None:
        """While a large payload is being collected and is not complete: (its first bytes, at
        most `at_most` of what came so far; the bytes still to come). Nothing else is buffered
        then: the stream's next bytes are that payload's."""
        view = self._large_view()
        if view is None:
            return None
        with view:
            return bytes(view[:at_most]), self._large_size() - len(view)

    def _large_view(self) -> memoryview | None:
        if self._pending:
            return memoryview(self._buffer)[HEADER_SIZE:]
        large = self._large
        if large is None or self._filled >= len(large):
            return None
        return memoryview(large)[: self._filled]

    def _large_size(self) -> int:
        return self._pending or len(self._large or b"")

    def take_large(self) -> tuple[bytes, int]:
        """Give up the large payload being collected (`large_prefix`): (what came so far, the
        bytes still to come). Whoever takes it takes that many next bytes of the stream
        (never passed to `receive_data`); the decoder then expects the next frame's header."""
        view = self._large_view()
        if view is None:
            raise ValueError("no large payload being collected")
        with view:
            taken = bytes(view)
        rest = self._large_size() - len(taken)
        self._pending = 0
        self._buffer.clear()
        self._large = None
        self._filled = 0
        self._after_large = True
        return taken, rest

    @property
    def buffered(self) -> int:
        return len(self._buffer) + (self._filled if self._large is not None else 0)
