"""Message base class, field validation and the kind registry used by both protocols.

A message is a frozen, slotted, keyword-only dataclass. It validates every field against its
annotation when built, so handlers never re-check types. On the wire a message is the CBOR
array `[kind, field1, field2, ...]` in declaration order (the agent protocol prefixes the
channel); the C layer relies on that order.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from typing import Any, ClassVar, TypeVar, Union

from mirrord.protocol._exceptions import LocalProtocolError, MalformedFrame

__all__ = ["INT64_MAX", "INT64_MIN", "Message", "Registry", "message"]

INT64_MIN = -(2**63)
INT64_MAX = 2**64 - 1  # CBOR unsigned ints go up to 2**64-1 (inode numbers, sizes)

M = TypeVar("M", bound="Message")


class FieldError(ValueError):
    """A message field does not match its declared type."""


def _check(value: Any, tp: Any, path: str) -> None:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                _check(value, arm, path)
                return
            except FieldError:
                continue
        raise FieldError(f"{path}: {type(value).__name__} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise FieldError(f"{path}: expected null, got {type(value).__name__}")
        return
    if tp is Any:
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(f"{path}: expected bool, got {type(value).__name__}")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(f"{path}: expected int, got {type(value).__name__}")
        if not INT64_MIN <= value <= INT64_MAX:
            raise FieldError(f"{path}: integer {value} out of range")
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldError(f"{path}: expected float, got {type(value).__name__}")
        return
    if tp is str:
        if not isinstance(value, str):
            raise FieldError(f"{path}: expected str, got {type(value).__name__}")
        return
    if tp is bytes:
        if not isinstance(value, bytes):
            raise FieldError(f"{path}: expected bytes, got {type(value).__name__}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise FieldError(f"{path}: expected list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        for i, item in enumerate(value):
            _check(item, item_tp, f"{path}[{i}]")
        return
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise FieldError(f"{path}: expected array, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            for i, item in enumerate(value):
                _check(item, args[0], f"{path}[{i}]")
            return
        if len(value) != len(args):
            raise FieldError(f"{path}: expected {len(args)} items, got {len(value)}")
        for i, (item, item_tp) in enumerate(zip(value, args, strict=True)):
            _check(item, item_tp, f"{path}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(f"{path}: expected map, got {type(value).__name__}")
        key_tp, val_tp = typing.get_args(tp)
        for k, v in value.items():
            _check(k, key_tp, f"{path} key")
            _check(v, val_tp, f"{path}[{k!r}]")
        return
    raise TypeError(f"unsupported field type {tp!r} at {path}")  # a bug in a message definition


def _fast(tp: Any) -> typing.Callable[[Any], bool]:
    """A predicate that accepts only values `_check` accepts, compiled once per field type.

    Messages are built several times per remote call (decoded, re-addressed, encoded), and
    `_check` walks the type with `typing.get_origin` every time. The predicate may say no to a
    value `_check` would accept (then `_check` decides, and words the error): it only has to be
    fast and never wrong in accepting."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = tuple(_fast(arm) for arm in typing.get_args(tp))
        return lambda v: any(arm(v) for arm in arms)
    if tp is type(None):
        return lambda v: v is None
    if tp is Any:
        return lambda v: True
    if tp is bool:
        return lambda v: v is True or v is False
    if tp is int:
        return lambda v: type(v) is int and INT64_MIN <= v <= INT64_MAX
    if tp is float:
        return lambda v: type(v) is float or (type(v) is int)
    if tp is str:
        return lambda v: type(v) is str
    if tp is bytes:
        return lambda v: type(v) is bytes
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if item_tp is int:
            return lambda v: (
                type(v) is list and all(type(i) is int and INT64_MIN <= i <= INT64_MAX for i in v)
            )
        item = _fast(item_tp)
        return lambda v: type(v) is list and all(item(i) for i in v)
    return lambda v: False  # tuples, maps: `_check` decides


class Message:
    """Base of every message. Subclasses are made with `@message(kind)`."""

    __slots__ = ()
    KIND: ClassVar[int]
    _FIELDS: ClassVar[tuple[tuple[str, Any], ...]]
    _CHECKS: ClassVar[tuple[tuple[str, Any, typing.Callable[[Any], bool]], ...]]

    def __post_init__(self) -> None:
        for name, tp, fast in self._CHECKS:
            value = getattr(self, name)
            if fast(value):
                continue
            try:
                _check(value, tp, f"{type(self).__name__}.{name}")
            except FieldError as exc:
                raise LocalProtocolError(str(exc)) from None
        try:
            self._validate()
        except ValueError as exc:
            raise LocalProtocolError(f"{type(self).__name__}: {exc}") from None

    def _validate(self) -> None:
        """Extra checks beyond types; raise `ValueError` with a message naming the field."""

    def to_wire(self) -> list[Any]:
        return [self.KIND, *(getattr(self, name) for name, _ in self._FIELDS)]


# Field annotations evaluated, per (module, annotation text), and their fast predicates, per
# type: the 74 messages declare a dozen distinct field types between them.
_TYPES: dict[tuple[str, str], Any] = {}
_FAST: dict[Any, typing.Callable[[Any], bool]] = {}


def _field_type(cls: type, name: str) -> Any:
    """The type field `name` of `cls` is annotated with, as `typing.get_type_hints` gives it:
    the annotation text (this package uses `from __future__ import annotations`) evaluated in
    the declaring class's module. Each text is evaluated once per module: `get_type_hints`
    evaluates every annotation of every class in the MRO, `Message`'s ClassVars included,
    for each message, which was a third of importing the protocol (about 20 ms of every
    daemon and agent start)."""
    for owner in cls.__mro__:
        annotation = inspect.get_annotations(owner).get(name)
        if annotation is None:
            continue
        if not isinstance(annotation, str):
            return annotation
        key = (owner.__module__, annotation)
        if key not in _TYPES:
            _TYPES[key] = eval(annotation, vars(sys.modules[owner.__module__]))
        return _TYPES[key]
    raise TypeError(f"{cls.__name__}.{name} has no annotation")


def _fast_for(tp: Any) -> typing.Callable[[Any], bool]:
    fast = _FAST.get(tp)
    if fast is None:
        fast = _FAST[tp] = _fast(tp)
    return fast


@typing.dataclass_transform(frozen_default=True, kw_only_default=True)
def message(kind: int) -> typing.Callable[[type[M]], type[M]]:
    """Register a dataclass as message `kind` (its wire id, never reused)."""

    def wrap(cls: type[M]) -> type[M]:
        dc = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
        dc.KIND = kind
        dc._FIELDS = tuple((f.name, _field_type(dc, f.name)) for f in dataclasses.fields(dc))  # type: ignore[arg-type]
        dc._CHECKS = tuple((name, tp, _fast_for(tp)) for name, tp in dc._FIELDS)
        return dc

    return wrap


class Registry:
    """Kind id <-> message class, for one protocol."""

    __slots__ = ("_by_kind", "name")

    def __init__(self, name: str, classes: typing.Iterable[type[Message]]) -> None:
        self.name = name
        self._by_kind: dict[int, type[Message]] = {}
        for cls in classes:
            if cls.KIND in self._by_kind:
                raise TypeError(f"{name}: kind {cls.KIND} registered twice")
            self._by_kind[cls.KIND] = cls

    def __contains__(self, cls: type[Message]) -> bool:
        return self._by_kind.get(cls.KIND) is cls

    def decode_name(self, kind: int) -> str:
        return self._by_kind[kind].__name__

    def message_class(self, kind: int) -> type[Message]:
        return self._by_kind[kind]

    def knows(self, kind: int) -> bool:
        return kind in self._by_kind

    def kinds(self) -> list[type[Message]]:
        return list(self._by_kind.values())

    def decode(self, kind: int, fields: list[Any]) -> Message:
        """Build the message of `kind` from its wire fields; `MalformedFrame` if they are wrong."""
        cls = self._by_kind[kind]
        names = cls._FIELDS
        if len(fields) > len(names):
            # A newer peer may append fields to a message: ignore the extra ones.
            fields = fields[: len(names)]
        if len(fields) < len(names):
            required = [
                f.name
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            if len(fields) < len(required):
                raise MalformedFrame(
                    f"{cls.__name__} needs {len(required)} fields, got {len(fields)}"
                )
        kwargs = {name: value for (name, _), value in zip(names, fields, strict=False)}
        try:
            return cls(**kwargs)
        except (LocalProtocolError, ValueError, TypeError) as exc:
            raise MalformedFrame(f"invalid {cls.__name__}: {exc}") from None
