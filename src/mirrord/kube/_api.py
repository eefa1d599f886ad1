"""Thin helpers over kubernetes_asyncio that work on plain JSON.

Owns: calling a generated API method with `_preload_content=False` and turning the answer into
a dict (or an `ApiCallError` built from the server's `Status`), reading a watch as JSON lines,
and reading a followed pod log line by line. Plain dicts instead of the generated models: the
models reject objects that lack fields the client believes required, and we only read a few
fields anyway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["ApiCallError", "call", "log_lines", "watch_events"]

Json = dict[str, Any]


class ApiCallError(Exception):
    """A non-2xx answer; `status` is the HTTP code, `reason`/`message` come from the Status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


async def _error(resp: Any) -> ApiCallError:
    text = (await resp.read()).decode(errors="replace")
    try:
        body = json.loads(text)
        return ApiCallError(
            resp.status, str(body.get("reason") or resp.reason), str(body.get("message") or text)
        )
    except (ValueError, AttributeError):
        return ApiCallError(resp.status, str(resp.reason), text.strip()[:500])


async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Json:
    """Call a generated API method and return the JSON body; raises `ApiCallError`."""
    resp = await method(*args, _preload_content=False, **kwargs)
    try:
        if not 200 <= resp.status <= 299:
            raise await _error(resp)
        data = await resp.read()
        return json.loads(data) if data else {}
    finally:
        resp.release()


async def watch_events(
    method: Callable[..., Any], *args: Any, timeout_seconds: int, **kwargs: Any
) -> AsyncIterator[tuple[str, Json]]:
    """Events of one watch request (`(type, object)`) until the server ends it."""
    resp = await method(
        *args, watch=True, timeout_seconds=timeout_seconds, _preload_content=False, **kwargs
    )
    try:
        if not 200 <= resp.status <= 299:
            raise await _error(resp)
        while True:
            line = await resp.content.readline()
            if not line:
                return
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("type") == "ERROR":
                obj = event.get("object") or {}
                raise ApiCallError(
                    int(obj.get("code") or 500), str(obj.get("reason")), str(obj.get("message"))
                )
            yield str(event.get("type")), event.get("object") or {}
    finally:
        resp.release()


async def log_lines(method: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncIterator[str]:
    """Lines of a followed pod log (`follow=True`) until the container's log ends."""
    resp = await method(*args, follow=True, _preload_content=False, **kwargs)
    try:
        if not 200 <= resp.status <= 299:
            raise await _error(resp)
        while True:
            line = await resp.content.readline()
            if not line:
                return
            yield line.decode(errors="replace").rstrip("\r\n")
    finally:
        resp.release()
