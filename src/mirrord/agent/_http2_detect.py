"""Recognising HTTP/2 on a stolen connection, and HTTP/2 request heads as filters see them.

Owns: the client's connection preface (`could_be_h2_preface`, `is_h2_preface`), the start of
a server's preface (`could_be_h2_server_preface`), an HTTP/1.1 `Upgrade: h2c` request
(`h2c_upgrade_from`, `H2C_SWITCH`), and `head_from_headers`, the `RequestHead` of an HTTP/2
request. Sans-IO: bytes and headers in, answers out.
Does not own: routing streams (`_http2_filter.py`), sockets (`_incoming_h2.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mirrord.agent._http_filter import RequestHead

__all__ = [
    "H2C_SWITCH",
    "H2_PREFACE",
    "H2cUpgrade",
    "Headers",
    "could_be_h2_preface",
    "could_be_h2_server_preface",
    "h2c_upgrade_from",
    "head_from_headers",
    "is_h2_preface",
]

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Headers = list[tuple[bytes, bytes]]


def could_be_h2_preface(data: bytes | bytearray) -> bool:
    """Could `data` be the start of the HTTP/2 client preface (prior knowledge)? True for a
    prefix of it too: more bytes decide."""
    n = min(len(data), len(H2_PREFACE))
    return n > 0 and bytes(data[:n]) == H2_PREFACE[:n]


def is_h2_preface(data: bytes | bytearray) -> bool:
    return bytes(data[: len(H2_PREFACE)]) == H2_PREFACE


def could_be_h2_server_preface(data: bytes | bytearray) -> bool:
    """Could `data` (at least its first 4 bytes) start an HTTP/2 server's preface, a SETTINGS
    frame: type 4, flags 0, stream 0, a length that is a multiple of 6?"""
    if len(data) < 4 or data[3] != 0x04:
        return False
    length = int.from_bytes(data[:3], "big")
    if length % 6:
        return False
    return len(data) < 9 or (data[4] == 0 and bytes(data[5:9]) == b"\0\0\0\0")


# HTTP/1.1 headers that mean nothing (or are forbidden) in HTTP/2 (RFC 9113 8.2.2).
_HOP_BY_HOP: Final = frozenset(
    {"connection", "upgrade", "http2-settings", "keep-alive", "proxy-connection", "host"}
    | {"transfer-encoding"}
)
H2C_SWITCH: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n"
)


@dataclass(frozen=True, slots=True)
class H2cUpgrade:
    """An HTTP/1.1 request asking to switch to HTTP/2 (`Upgrade: h2c`, RFC 7540 3.2): its
    `HTTP2-Settings` and the request itself as HTTP/2 headers; it becomes stream 1."""

    settings: bytes
    headers: Headers


def h2c_upgrade_from(head: RequestHead) -> H2cUpgrade | None:
    """The upgrade `head` asks for, or None: not `Upgrade: h2c` with `HTTP2-Settings`, or a
    request with a body (the switch happens after the whole request; only body-less ones,
    what clients send, are taken)."""
    upgrade = (head.header("upgrade") or "").lower()
    settings = head.header("http2-settings")
    if "h2c" not in [u.strip() for u in upgrade.split(",")] or settings is None:
        return None
    if head.header("transfer-encoding") or (head.header("content-length") or "0") != "0":
        return None
    if head.http_version != "1.1" or head.method == "CONNECT":
        return None
    headers: Headers = [
        (b":method", head.method.encode("latin-1")),
        (b":scheme", b"http"),
        (b":authority", (head.header("host") or "").encode("latin-1")),
        (b":path", head.target.encode("latin-1")),
    ]
    for name, value in head.headers:
        if name in _HOP_BY_HOP or (name == "te" and value.lower() != "trailers"):
            continue
        headers.append((name.encode("latin-1"), value.encode("latin-1")))
    raw = settings.strip().encode("latin-1")
    return H2cUpgrade(settings=raw + b"=" * (-len(raw) % 4), headers=headers)


def head_from_headers(headers: Headers) -> RequestHead:
    """The `RequestHead` filters see for an HTTP/2 request: method and path from the pseudo
    headers, the other headers as they came (h2 lower-cases names), plus `host` from
    `:authority` when there is no `host` header, so that a filter written for HTTP/1's Host
    matches both."""
    pseudo: dict[bytes, bytes] = {}
    plain: list[tuple[str, str]] = []
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        else:
            plain.append((name.decode("latin-1"), value.decode("latin-1")))
    authority = pseudo.get(b":authority")
    if authority is not None and not any(k == "host" for k, _ in plain):
        plain.insert(0, ("host", authority.decode("latin-1")))
    method = pseudo.get(b":method", b"").decode("latin-1")
    return RequestHead(
        method=method,
        target=pseudo.get(b":path", b"").decode("latin-1"),
        http_version="2",
        headers=tuple(plain),
        upgrade=method == "CONNECT",
    )
