"""Turning pydantic's validation errors into lines a user can act on.

Owns: the wording of config errors: `<source>: <key.path>: <what is wrong> (<bad value>);
<what is allowed>`, with a did-you-mean for unknown keys and near-miss values.
Does not own: deciding what is valid (`_model.py`) or where a value came from (`_loader.py`
passes a function that names the source of a key path).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from mirrord.config._model import MirrordConfig

__all__ = ["did_you_mean", "format_validation_error", "key_path", "keys_at"]

Loc = tuple[int | str, ...]


def key_path(loc: Iterable[int | str]) -> str:
    """`("feature", "fs", "read_only", 1)` → `feature.fs.read_only[1]`; a dict key that is
    itself wrong (pydantic's `"[key]"` marker) is shown as `mapping['(']`."""
    parts = list(loc)
    out = ""
    for i, part in enumerate(parts):
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif i + 1 < len(parts) and parts[i + 1] == "[key]":
            out += f"[{part!r}]"
        elif out:
            out += f".{part}"
        else:
            out = str(part)
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
    return found


def _model_at(loc: Loc, root: type[BaseModel] = MirrordConfig) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, int) or part == "[key]":
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        models = _models_in(field.annotation)
        cls = models[0] if models else None
    return cls


def keys_at(loc: Loc) -> list[str]:
    """The keys the model accepts at `loc` (a path to an object), or [] if it is not one."""
    cls = _model_at(loc)
    return list(cls.model_fields) if cls is not None else []


def _paths_under(cls: type[BaseModel], prefix: tuple[str, ...], depth: int = 0) -> list[Loc]:
    out: list[Loc] = []
    for name, field in cls.model_fields.items():
        out.append((*prefix, name))
        if depth < 8:
            for sub in _models_in(field.annotation):
                out.extend(_paths_under(sub, (*prefix, name), depth + 1))
    return out


def misplaced_hint(loc: Loc) -> str:
    """For an unknown key that exists elsewhere below its parent (or at all): where it goes."""
    key = loc[-1] if loc else ""
    if not isinstance(key, str):
        return ""
    parent = tuple(p for p in loc[:-1])
    for base in (parent, ()):
        cls = _model_at(base)
        if cls is None:
            continue
        found = [p for p in _paths_under(cls, tuple(str(x) for x in base)) if p[-1] == key]
        found = [p for p in found if p != loc]
        if found:
            return f" (it belongs at {key_path(found[0])})"
    return ""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'steal'?)"` or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_TYPE_WORDS = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a pair [a, b]",
    "dict_type": "an object (key: value table)",
    "model_type": "an object (key: value table)",
    "model_attributes_type": "an object (key: value table)",
}


def _one(error: Any, source_of: Callable[[Loc], str]) -> str:
    loc: Loc = tuple(error["loc"])
    kind: str = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    where = f"{source_of(loc)}: {key_path(loc)}" if loc else source_of(loc)

    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        allowed = keys_at(loc[:-1])
        hint = did_you_mean(key, allowed) or misplaced_hint(loc)
        listing = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key {key!r}{hint}{listing}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
        hint = did_you_mean(str(value), choices) if isinstance(value, str) else ""
        return f"{where}: invalid value {_short(value)}{hint}; allowed values: {expected}"
    if kind in _TYPE_WORDS:
        return f"{where}: invalid value {_short(value)}: expected {_TYPE_WORDS[kind]}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bounds = {
            "greater_than_equal": ">= {ge}",
            "less_than_equal": "<= {le}",
            "greater_than": "> {gt}",
            "less_than": "< {lt}",
        }[kind]
        return (
            f"{where}: invalid value {_short(value)}: must be "
            f"{bounds.format(**{k: ctx.get(k) for k in ('ge', 'le', 'gt', 'lt')})}"
        )
    if kind == "missing" and isinstance(value, list) and loc and isinstance(loc[-1], int):
        # the second item of a pair such as [LOCAL, REMOTE]: name the pair, not its slot
        pair = loc[:-1]
        return (
            f"{source_of(pair)}: {key_path(pair)}: invalid value {_short(value)}: "
            "expected a pair [a, b]"
        )
    if kind in ("too_long", "too_short"):
        if isinstance(value, list) and "tuple" in str(error["msg"]).lower():
            # a pair such as port_mapping's [LOCAL, REMOTE]; pydantic says "tuple ... after
            # validation", which a config file has no notion of
            return f"{where}: invalid value {_short(value)}: expected a pair [a, b]"
        return f"{where}: invalid value {_short(value)}: {error['msg'].lower()}"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind in ("value_error", "assertion_error") and _short(value) not in message:
        message = f"invalid value {_short(value)}: {message}"
    return f"{where}: {message}"


def format_validation_error(exc: ValidationError, source_of: Callable[[Loc], str]) -> list[str]:
    """One line per pydantic error; `source_of(loc)` names the file or variable."""
    lines: list[str] = []
    for error in exc.errors():
        line = _one(error, source_of)
        if line not in lines:
            lines.append(line)
    return lines
