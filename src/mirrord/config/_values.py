"""The value types and the section base every part of the configuration model uses.

Owns: mirrord's value shapes (`VecOrSingle` lists, "A;B" name lists, ports, regexes, address
filters), the strict, frozen `_Section` base with its shorthand schema hook, and the error a
shorthand of the wrong type raises. Does not own any section (`_target.py`, `_agent.py`,
`_feature.py`, `_network.py`, `_model.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    Strict,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from mirrord.config._filters import check_fs_pattern, check_regex, parse_address_filter

__all__ = [
    "FsPatternList",
    "NameList",
    "Port",
    "PortPair",
    "Regex",
    "RegexList",
    "Seconds",
    "expand_shorthand",
]


def _single_to_list(value: Any) -> Any:
    # mirrord's `VecOrSingle`: a lone value in a file means a one-element list (it is NOT split
    # on ';' -- a regex may contain ';'). Environment variables are split by the loader.
    if isinstance(value, str | int) and not isinstance(value, bool):
        return [value]
    return value


def _split_semicolons(value: Any) -> Any:
    # `feature.env.include/exclude` and `skip_processes` also take "A;B;C" in files (mirrord).
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(";")) if part]
    return value


def _check_nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _check_address_filter(value: str) -> str:
    parse_address_filter(value)
    return value


def _check_dns_filter(value: str) -> str:
    parse_address_filter(value, allow_protocol=False)
    return value


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def _check_method(value: str) -> str:
    if value.upper() not in _HTTP_METHODS:
        raise PydanticCustomError(
            "http_method",
            "{value} is not an HTTP method; allowed: {allowed}",
            {"value": repr(value), "allowed": ", ".join(_HTTP_METHODS)},
        )
    return value.upper()


class _OrSingle:
    """Schema marker for mirrord's `VecOrSingle`: editors should accept a lone item too."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = dict(handler(core_schema))
        items = schema.get("items")
        if not isinstance(items, dict):
            return schema
        outer: dict[str, Any] = {
            k: schema.pop(k) for k in ("title", "description", "default") if k in schema
        }
        return {"anyOf": [items, schema], **outer}


Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
PortPair = Annotated[tuple[Port, Port], Strict(False)]  # JSON has lists, not tuples
Regex = Annotated[str, AfterValidator(check_regex)]
RegexList = Annotated[list[Regex], BeforeValidator(_single_to_list), _OrSingle()]
FsPatternList = Annotated[
    list[Annotated[str, AfterValidator(check_fs_pattern)]],
    BeforeValidator(_single_to_list),
    _OrSingle(),
]
NameList = Annotated[
    list[Annotated[str, AfterValidator(_check_nonempty)]],
    BeforeValidator(_split_semicolons),
    _OrSingle(),
]
Seconds = Annotated[float, Field(ge=0)]


def _shorthand_error(expected: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError(
        "shorthand",
        "expected {expected}, got {value}",
        {"expected": expected, "value": repr(value)},
    )


def expand_shorthand(
    cls: type[_Section], value: Any, *, false: dict[str, Any], string_key: str | None = None
) -> Any:
    """A section's value with mirrord's shorthands expanded: unset or `true` is the defaults,
    `false` is `false`'s keys, a string (for sections that take one) sets `string_key`;
    anything else but an object is an error naming the shorthands (`_shorthand_doc`)."""
    if value is None or value is True:
        return {}
    if value is False:
        return false
    if string_key is not None and isinstance(value, str):
        return {string_key: value}
    if not isinstance(value, dict | cls):
        raise _shorthand_error(cls._shorthand_doc, value)
    return value


class _Section(BaseModel):
    # strict: a config file's "30" is not 30 and 1 is not true (mirrord's serde agrees);
    # forbid: unknown keys are errors (the loader adds a did-you-mean).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Subclasses with a shorthand set these: what the shorthand may be (for messages) and its
    # JSON schema alternatives (for editors).
    _shorthand_doc: ClassVar[str] = ""
    _shorthand_schema: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        if not cls._shorthand_schema:
            return schema
        resolved = dict(handler.resolve_ref_schema(schema))
        description = resolved.pop("description", None)
        out: dict[str, Any] = {"anyOf": [*cls._shorthand_schema, resolved]}
        if description:
            out["description"] = description
        return out
