"""Label and field selectors as the API server parses them (`a=b,c!=d,e,!f,g in (x,y)`).

Owns: parsing a selector string and matching an object against it. Does not own listing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from tests.kube.apiserver._errors import ApiError

Matcher = Callable[[Mapping[str, str]], bool]

_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    depth = 0
    cur = ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _label_requirement(term: str) -> tuple[str, str, frozenset[str]]:
    """(operator, key, values) of one requirement; operators: in, notin, exists, !exists."""
    m = _SET_RE.match(term)
    if m:
        values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
        return m.group(2), m.group(1), values
    if "!=" in term:
        key, value = (part.strip() for part in term.split("!=", 1))
        return "notin", key, frozenset({value})
    if "=" in term:
        key, value = (part.strip() for part in re.split("==|=", term, maxsplit=1))
        return "in", key, frozenset({value})
    if term.startswith("!") and re.fullmatch(r"[\w./-]+", term[1:].strip()):
        return "!exists", term[1:].strip(), frozenset()
    if re.fullmatch(r"[\w./-]+", term):
        return "exists", term, frozenset()
    raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")


def _label_matches(reqs: list[tuple[str, str, frozenset[str]]], labels: Mapping[str, str]) -> bool:
    for op, key, values in reqs:
        if op == "in" and labels.get(key) not in values:
            return False
        if op == "notin" and labels.get(key) in values:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
    return True


def parse_label_selector(text: str | None) -> Matcher:
    """A matcher for a label selector; raises ApiError(400) on a bad one."""
    reqs = [_label_requirement(term) for term in _split_top(text or "")]
    return functools.partial(_label_matches, reqs)


def _field(path: str, obj: dict[str, Any]) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


_FIELDS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "status.phase",
        "spec.nodeName",
        "spec.serviceAccountName",
        "involvedObject.kind",
        "involvedObject.name",
        "status.podIP",
    }
)


def _field_matches(reqs: list[tuple[str, bool, str]], obj: dict[str, Any]) -> bool:
    return all((_field(path, obj) == value) != negated for path, negated, value in reqs)


def parse_field_selector(text: str | None) -> Callable[[dict[str, Any]], bool]:
    """A matcher for a field selector; unsupported fields are a 400 like the real server's."""
    reqs: list[tuple[str, bool, str]] = []
    for term in _split_top(text or ""):
        negated = "!=" in term
        key, value = (part.strip() for part in re.split("!=|==|=", term, maxsplit=1))
        if key not in _FIELDS:
            raise ApiError(400, "BadRequest", f"field label not supported: {key}")
        reqs.append((key, negated, value))
    return functools.partial(_field_matches, reqs)
