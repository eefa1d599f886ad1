"""The layer's C CBOR reader against the Python side's cbor2: everything the protocol
encodes is accepted; whatever the C side accepts, cbor2 reads as one item; no input crashes
it. (Fuzzed with hypothesis; one process per example batch.)"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=32)
)
items = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-10, 10), inner, max_size=4)
    ),
    max_leaves=30,
)


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cbuild") / "cbor_check"
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(ROOT / "native"),
            "-o",
            str(out),
            str(Path(__file__).parent / "c" / "cbor_check.c"),
            str(ROOT / "native" / "cbor.c"),
        ],
        check=True,
        timeout=60,
    )
    return out


def _check(checker: Path, inputs: list[bytes]) -> list[bool]:
    data = b"".join(struct.pack(">I", len(i)) + i for i in inputs)
    out = subprocess.run([str(checker)], input=data, capture_output=True, timeout=30, check=True)
    return [c == "1" for c in out.stdout.decode().strip()]


def _depth(item: object) -> int:
    if isinstance(item, list):
        return 1 + max((_depth(i) for i in item), default=0)
    if isinstance(item, dict):
        return 1 + max((_depth(v) for v in item.values()), default=0)
    return 0


@settings(max_examples=60, deadline=None)
@given(st.lists(items, min_size=1, max_size=20))
def test_what_the_protocol_encodes_is_accepted(checker: Path, values: list[object]) -> None:
    encoded = [cbor2.dumps(v) for v in values]
    assert _check(checker, encoded) == [True] * len(values)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=40), min_size=1, max_size=40),
    st.lists(items, min_size=1, max_size=10),
    st.data(),
)
def test_random_and_mutated_bytes_never_crash_and_stay_sound(
    checker: Path, blobs: list[bytes], values: list[object], data: st.DataObject
) -> None:
    mutated = []
    for v in values:
        buf = bytearray(cbor2.dumps(v))
        if buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
            cut = data.draw(st.integers(0, len(buf)))
            mutated.append(bytes(buf[:cut]) if data.draw(st.booleans()) else bytes(buf))
    inputs = blobs + mutated
    for raw, accepted in zip(inputs, _check(checker, inputs), strict=True):
        if accepted:
            # the C side accepted: it must be exactly one well-formed item for cbor2 too
            item = cbor2.loads(raw)
            assert cbor2.dumps(item) is not None
            assert _depth(item) <= 17


def test_limits_are_refused(checker: Path) -> None:
    deep: object = []
    for _ in range(20):
        deep = [deep]
    cases = [
        cbor2.dumps(deep),  # nested deeper than 16
        b"\x9f\x01\xff",  # indefinite length
        b"\xf9\x3c\x00",  # half float
        b"\xc0\x61a",  # tag
        b"\x62\xc3\x28",  # invalid UTF-8
        b"\xa1\x80\x01",  # array as a map key
        b"\x01\x02",  # two items
        b"\x5a\xff\xff\xff\xff",  # byte string past the end
        b"",  # nothing
    ]
    assert _check(checker, cases) == [False] * len(cases)
