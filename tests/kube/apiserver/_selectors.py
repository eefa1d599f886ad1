"""Label and field selectors as the API server parses them (`a=b,c!=d,e,!f,g in (x,y)`).

Owns: parsing a selector string and matching an object against it. Does not own listing.
"""

from __future__ import annotations

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


def parse_label_selector(text: str | None) -> Matcher:
    """A matcher for a label selector; raises ApiError(400) on a bad one."""
    if not text:
        return lambda _labels: True
    tests: list[Matcher] = []
    for term in _split_top(text):
        m = _SET_RE.match(term)
        if m:
            key, op, values_text = m.group(1), m.group(2), m.group(3)
            values = {v.strip() for v in values_text.split(",") if v.strip()}
            if op == "in":
                tests.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                tests.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "==" in term or "=" in term:
            key, value = (s.strip() for s in re.split("==|=", term, maxsplit=1))
            tests.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif term.startswith("!"):
            key = term[1:].strip()
            tests.append(lambda lb, k=key: k not in lb)
        elif re.fullmatch(r"[\w./-]+", term):
            tests.append(lambda lb, k=term: k in lb)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(t(labels) for t in tests)


_FIELDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "metadata.name": lambda o: str(o.get("metadata", {}).get("name", "")),
    "metadata.namespace": lambda o: str(o.get("metadata", {}).get("namespace", "")),
    "status.phase": lambda o: str(o.get("status", {}).get("phase", "")),
    "spec.nodeName": lambda o: str(o.get("spec", {}).get("nodeName", "") or ""),
    "spec.serviceAccountName": lambda o: str(o.get("spec", {}).get("serviceAccountName", "")),
    "involvedObject.kind": lambda o: str(o.get("involvedObject", {}).get("kind", "")),
    "involvedObject.name": lambda o: str(o.get("involvedObject", {}).get("name", "")),
    "status.podIP": lambda o: str(o.get("status", {}).get("podIP", "") or ""),
}


def parse_field_selector(text: str | None) -> Callable[[dict[str, Any]], bool]:
    """A matcher for a field selector; unsupported fields are a 400 like the real server's."""
    if not text:
        return lambda _obj: True
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for term in _split_top(text):
        neg = "!=" in term
        key, value = (s.strip() for s in re.split("!=|==|=", term, maxsplit=1))
        getter = _FIELDS.get(key)
        if getter is None:
            raise ApiError(400, "BadRequest", f"field label not supported: {key}")
        if neg:
            tests.append(lambda o, g=getter, v=value: g(o) != v)
        else:
            tests.append(lambda o, g=getter, v=value: g(o) == v)
    return lambda obj: all(t(obj) for t in tests)
