"""Hypothesis strategies that build a valid instance of every message kind."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from hypothesis import strategies as st

from mirrord.protocol import Message
from mirrord.protocol.messages import (
    MAX_DATA_CHUNK,
    MAX_DIR_BATCH,
    STAT_FIELDS,
    STATFS_FIELDS,
)

_int = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_small = st.integers(min_value=0, max_value=2**31)

# Fields whose values are constrained beyond their type.
_SPECIAL: dict[str, st.SearchStrategy[Any]] = {
    "port": st.integers(0, 65535),
    "bound_port": st.integers(0, 65535),
    "relay_port": st.integers(0, 65535),
    "local_port": st.integers(0, 65535),
    "remote_port": st.integers(0, 65535),
    "protocol": st.sampled_from(["tcp", "udp"]),
    "mode": st.sampled_from(["mirror", "steal"]),
    "size": st.integers(0, MAX_DATA_CHUNK),
    "offset": _small,
    "max_size": st.integers(min_value=0, max_value=MAX_DATA_CHUNK),
    "length": _small,
    "max_entries": st.integers(1, MAX_DIR_BATCH),
    "amount": st.integers(1, 2**31),
    "parent": st.none() | st.integers(1, 2**31),
    "data": st.binary(max_size=256),
    "stat": st.lists(_int, min_size=len(STAT_FIELDS), max_size=len(STAT_FIELDS)),
    "statfs": st.lists(_int, min_size=len(STATFS_FIELDS), max_size=len(STATFS_FIELDS)),
}


def _for_type(tp: Any) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*(_for_type(arm) for arm in typing.get_args(tp)))
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _int
    if tp is str:
        return st.text(max_size=40)
    if tp is bytes:
        return st.binary(max_size=64)
    if tp is Any:
        return st.none() | st.integers() | st.text(max_size=10)
    if origin is list:
        return st.lists(_for_type(typing.get_args(tp)[0]), max_size=5)
    if origin is tuple:
        return st.tuples(*(_for_type(a) for a in typing.get_args(tp))).map(list)
    if origin is dict:
        k, v = typing.get_args(tp)
        return st.dictionaries(_for_type(k), _for_type(v), max_size=5)
    raise TypeError(tp)


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        special = _SPECIAL.get(f.name)
        if f.name in ("mode", "protocol") and hints[f.name] is int:
            special = None  # a file mode / socket protocol number, not a string enum
        if special is not None and type(None) in typing.get_args(hints[f.name]):
            special = st.none() | special
        kwargs[f.name] = special if special is not None else _for_type(hints[f.name])
    if cls.__name__ in ("FileStat", "StatFs", "DirOpen", "Utimens", "Chown"):
        # exactly one of path / handle
        return st.one_of(
            st.builds(cls, request_id=_small, path=st.binary(max_size=30)),
            st.builds(cls, request_id=_small, handle=_small),
        )
    if cls.__name__ == "FileFetched":
        # a handle, the content, or both
        return st.one_of(
            st.builds(cls, request_id=_small, stat=kwargs["stat"], handle=_small),
            st.builds(cls, request_id=_small, stat=kwargs["stat"], data=st.binary(max_size=64)),
        )
    if cls.__name__ == "LayerConnect":
        # a socket family; a source endpoint (sendto, the supervisor's connect) for tcp/udp
        kwargs["family"] = st.sampled_from([0, 2, 10])
        kwargs["source_port"] = _SPECIAL["port"]
        return st.builds(cls, **dict(kwargs, protocol=st.sampled_from(["tcp", "udp"])))
    return st.builds(cls, **kwargs)
