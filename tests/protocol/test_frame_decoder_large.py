"""A large frame is collected in a buffer of its own (copied once), however its bytes are
split: the payloads are the frames sent, in order, with the small ones around it."""

from __future__ import annotations

import random

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.protocol import FrameDecoder, FrameTooLarge, MalformedFrame, encode_frame
from mirrord.protocol._framing import _HEAD_READ, decode_payload


def _frames() -> list[tuple[object, bytes]]:
    items: list[object] = [
        [13, 1, b"a" * (1 << 20)],
        [1, 2],
        [13, 3, bytes(range(256)) * 300],
        [13, 4, b"b" * (64 * 1024 - 10)],  # around the large-frame threshold
        [13, 5, b"c" * (64 * 1024 + 10)],
        [2, 6, "end"],
    ]
    return [(item, encode_frame(item)) for item in items]


@pytest.mark.parametrize("seed", range(6))
def test_large_frames_in_any_split(seed: int) -> None:
    rng = random.Random(seed)
    frames = _frames()
    stream = b"".join(frame for _, frame in frames)
    decoder = FrameDecoder()
    got: list[object] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 3, 4, 5, 100, 4096, 65536, 300_000, 2_000_000])
        decoder.receive_data(stream[pos : pos + step])
        pos += step
        while (payload := decoder.next_payload()) is not None:
            got.append(cbor2.loads(payload))
    assert got == [item for item, _ in frames]
    assert decoder.buffered == 0


def test_a_large_frame_counts_as_buffered_until_complete() -> None:
    frame = encode_frame([13, 1, b"x" * 200_000])
    decoder = FrameDecoder()
    decoder.receive_data(frame[:70_000])
    assert decoder.next_payload() is None
    decoder.receive_data(frame[70_000:150_000])
    assert decoder.next_payload() is None
    assert decoder.buffered == 150_000 - 4
    decoder.receive_data(frame[150_000:] + encode_frame([1, 2])[:3])
    payload = decoder.next_payload()
    assert payload is not None and cbor2.loads(payload) == [13, 1, b"x" * 200_000]
    assert decoder.next_payload() is None and decoder.buffered == 3


def test_a_too_large_header_is_refused_before_its_body() -> None:
    decoder = FrameDecoder(max_frame_size=100_000)
    decoder.receive_data((100_001).to_bytes(4, "big") + b"\0" * 10)
    with pytest.raises(FrameTooLarge):
        decoder.next_payload()


@pytest.mark.parametrize("seed", range(4))
def test_a_large_frame_received_in_place_is_the_same_frame(seed: int) -> None:
    """A reader that receives into `free_space()` (in steps of any size) and hands back the
    filled slice gets the frames sent; the payload is the buffer it filled (no copy)."""
    rng = random.Random(seed)
    frames = _frames()
    stream = memoryview(b"".join(frame for _, frame in frames))
    decoder = FrameDecoder()
    got: list[object] = []
    in_place = 0
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 5, 4096, 65536, 300_000, 2_000_000])
        space = decoder.free_space()
        if space is None:  # a read of at most 4096 bytes, as the reader's max_bytes
            decoder.receive_data(stream[pos : pos + min(step, 4096)].tobytes())
            pos += min(step, 4096)
        else:
            n = min(step, len(space), len(stream) - pos)
            space[:n] = stream[pos : pos + n]  # what recv_into(space) does
            decoder.receive_data(space[:n])
            pos += n
            in_place += n
        while (payload := decoder.next_payload()) is not None:
            got.append(cbor2.loads(payload))
    assert got == [item for item, _ in frames]
    assert decoder.buffered == 0 and decoder.free_space() is None
    assert in_place > 1 << 20  # most of the large frames' bytes went in place


def test_free_space_is_offered_inside_a_large_frame_and_small_right_after_it() -> None:
    decoder = FrameDecoder()
    assert decoder.free_space() is None
    frame = encode_frame([13, 1, b"y" * 100_000])
    decoder.receive_data(frame[:10])
    assert decoder.next_payload() is None
    space = decoder.free_space()
    assert space is not None and len(space) == len(frame) - 10
    space[:] = frame[10:]
    decoder.receive_data(space)
    payload = decoder.next_payload()
    assert payload is not None and cbor2.loads(payload) == [13, 1, b"y" * 100_000]
    # right after it, a small read: the next frame's head (what is read there is copied)
    head = decoder.free_space()
    assert head is not None and 0 < len(head) <= _HEAD_READ
    small = encode_frame([1, 2])
    head[: len(small)] = small
    decoder.receive_data(head[: len(small)])
    payload = decoder.next_payload()
    assert payload is not None and cbor2.loads(payload) == [1, 2]
    assert decoder.free_space() is None  # then plain reads again, until another large frame


def test_a_stream_of_small_frames_is_never_offered_a_buffer() -> None:
    decoder = FrameDecoder()
    for i in range(100):
        decoder.receive_data(encode_frame([1, i, b"z" * (i * 500)]))
        payload = decoder.next_payload()
        assert payload is not None and cbor2.loads(payload) == [1, i, b"z" * (i * 500)]
        assert decoder.free_space() is None


def test_in_a_stream_of_large_frames_only_each_ones_first_bytes_are_copied() -> None:
    """A reader as `FrameReader.run` is (a read of 256 KiB when `free_space()` is None, else
    into it): after the first large frame, each next one's bytes land in its own buffer but
    for at most `_HEAD_READ` of them, not a whole read's worth copied over."""
    count, size, read = 12, 1 << 20, 256 * 1024
    items = [[13, i, bytes([i]) * size] for i in range(count)]
    stream = memoryview(b"".join(encode_frame(item) for item in items))
    decoder = FrameDecoder()
    got: list[bytes] = []
    in_place: list[tuple[object, int]] = []  # (the buffer received into, bytes)
    pos = 0
    for _ in range(10 * len(stream) // read + 100):  # bounded: every step takes > 0 bytes
        if pos == len(stream):
            break
        space = decoder.free_space()
        if space is None:
            decoder.receive_data(stream[pos : pos + read].tobytes())
            pos += min(read, len(stream) - pos)
        else:
            n = min(len(space), len(stream) - pos)
            space[:n] = stream[pos : pos + n]
            in_place.append((space.obj, n))
            decoder.receive_data(space[:n])
            pos += n
        while (payload := decoder.next_payload()) is not None:
            got.append(payload)
    assert [cbor2.loads(p) for p in got] == items
    payload_ids = {id(p) for p in got}
    straight = sum(n for obj, n in in_place if id(obj) in payload_ids)
    copied = len(stream) - straight
    assert copied <= read + count * _HEAD_READ, copied


_plain = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.none(),
    st.booleans(),
    st.binary(max_size=64),
)


@settings(max_examples=200, deadline=None)
@given(
    head=st.lists(_plain, max_size=6),
    big=st.integers(min_value=64 * 1024, max_value=(1 << 20) + 7),
    tail=st.lists(_plain, max_size=4),
    other=st.one_of(st.none(), st.text(max_size=8), st.floats(allow_nan=False), st.lists(_plain)),
)
def test_a_large_payload_decodes_as_cbor2_decodes_it(
    head: list[object], big: int, tail: list[object], other: object
) -> None:
    """decode_payload reads a large frame's plain array itself (each byte string copied
    once); whatever it holds, the result is cbor2's, and anything else still goes to cbor2."""
    item = [*head, bytes([len(head)]) * big, *tail]
    payload = bytearray(cbor2.dumps(item))
    assert decode_payload(payload) == cbor2.loads(payload) == item
    with_other = [*item, other]  # a text, a float, a nested array: cbor2's own decoding
    assert decode_payload(bytearray(cbor2.dumps(with_other))) == with_other


@pytest.mark.parametrize(
    "payload",
    [
        cbor2.dumps([1, b"x" * 70_000])[:-1],  # cut short
        b"\x83\x01" + cbor2.dumps(b"x" * 70_000),  # an array of 3 with 2 items
        b"\x9f\x01" + cbor2.dumps(b"x" * 70_000),  # an indefinite array never ended
        b"\x82\x01\x5b"
        + (2**40).to_bytes(8, "big")
        + b"x" * 70_000,  # a string's length past the end
    ],
)
def test_a_malformed_large_payload_is_still_refused(payload: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_payload(payload)
