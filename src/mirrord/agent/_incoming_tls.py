"""HTTPS under a filtered steal: the agent terminates the client's TLS with the certificate and
key a session gave (`Subscribe.tls`), so that the HTTP filters see the requests, re-encrypts
toward the pod's app for what it leaves to it, and encrypts toward the user app when the
session asks for it.

Owns: the TLS settings of each stolen port and channel (`StealTls`), recognising a TLS client
from its first bytes (`parse_client_hello`, sans-IO: the ClientHello's server name and ALPN
offer), the handshakes of a stolen connection (`terminate`), and `TlsConnection`, what a
terminated connection needs afterwards (connections to the pod's app, session connections).
Does not own: the filtering itself (`_incoming_filtered.py` and `_incoming_h2.py` run
unchanged over the decrypted stream), the certificate files (read by the daemon on the user's
machine).

Order of a terminated connection
--------------------------------
1. The connection to the pod's app is opened at once (as for plain connections). The client's
   first bytes are peeked: not a TLS ClientHello (plain HTTP, another protocol), or the pod's
   app speaking first, and nothing changes: the connection is filtered as before, TLS or not.
2. A ClientHello: the agent connects to the pod's app with TLS first, offering the client's
   ALPN protocols (`h2`, `http/1.1`) and its server name, so the app chooses as it would have;
   then it answers the client with the session's certificate and that same choice. So a client
   that negotiated `h2` is spoken HTTP/2 to, and so is the pod's app.
3. The decrypted stream goes through the filters. A matched request (or HTTP/2 stream) goes to
   its session: plain, or in TLS of its own toward the user app (`tls_delivery`).

The pod's app's certificate is not verified: it is reached at the original destination from
inside the pod, where the client was going. A client that does not trust the session's
certificate fails its handshake with the agent, as it would with any other server.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import select
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream

from mirrord._tls import TlsMaterialError, client_context, server_context

__all__ = [
    "ALPN_PROTOCOLS",
    "NEED_MORE",
    "NOT_TLS",
    "ClientHello",
    "StealTls",
    "TlsConnection",
    "TlsEnd",
    "parse_client_hello",
    "terminate",
]

log = logging.getLogger("mirrord.agent.incoming")

ALPN_PROTOCOLS: Final = ("h2", "http/1.1")  # what the filters understand
HELLO_WAIT = 10.0  # seconds a client may take to send its whole ClientHello
HANDSHAKE_TIMEOUT = 10.0
_CLOSE_NOTIFY_WAIT = 0.5  # a peer that does not answer our close_notify is closed anyway
_MAX_HELLO = 64 * 1024
_PEEK_POLL = 0.01  # seconds between peeks while a ClientHello is incomplete


# ---------------------------------------------------------------- ClientHello (sans-IO)


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NOT_TLS: Final = _Sentinel("NOT_TLS")
NEED_MORE: Final = _Sentinel("NEED_MORE")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    """What the agent needs of a client's ClientHello."""

    server_name: str | None
    alpn: tuple[str, ...]


def _handshake_bytes(data: bytes) -> bytes | _Sentinel:
    """The handshake-layer bytes of the leading TLS records (a ClientHello may span several)."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return bytes(out) if out and len(out) >= 4 else NEED_MORE
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5])
        if ctype != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            return NOT_TLS if pos == 0 else bytes(out)
        if len(data) - pos - 5 < length:
            out += data[pos + 5 :]
            return bytes(out) if len(out) >= 4 else NEED_MORE
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4]):
            return bytes(out)


def parse_client_hello(data: bytes) -> ClientHello | _Sentinel:
    """`data`: a client's first bytes. `NOT_TLS` when they are not a TLS ClientHello (or one
    too broken to be answered: left to the pod's app untouched), `NEED_MORE` when it is not
    all there yet, else its server name (SNI) and ALPN offer."""
    if data and data[0] != 0x16:
        return NOT_TLS
    hs = _handshake_bytes(data)
    if isinstance(hs, _Sentinel):
        return hs
    if hs[0] != 1:  # not a ClientHello
        return NOT_TLS
    body_len = int.from_bytes(hs[1:4])
    if body_len > _MAX_HELLO:
        return NOT_TLS
    if len(hs) < 4 + body_len:
        return NEED_MORE if len(data) < _MAX_HELLO else NOT_TLS
    try:
        return _parse_hello_body(hs[4 : 4 + body_len])
    except (IndexError, ValueError):
        return NOT_TLS


def _vector(buf: bytes, pos: int, width: int) -> tuple[bytes, int]:
    n = int.from_bytes(buf[pos : pos + width])
    end = pos + width + n
    if end > len(buf) or len(buf[pos : pos + width]) < width:
        raise ValueError("truncated vector")
    return buf[pos + width : end], end


def _parse_hello_body(body: bytes) -> ClientHello:
    pos = 2 + 32  # client_version, random
    _, pos = _vector(body, pos, 1)  # session id
    _, pos = _vector(body, pos, 2)  # cipher suites
    _, pos = _vector(body, pos, 1)  # compression methods
    server_name: str | None = None
    alpn: list[str] = []
    if pos == len(body):
        return ClientHello(server_name=None, alpn=())
    extensions, _ = _vector(body, pos, 2)
    at = 0
    while at < len(extensions):
        kind = int.from_bytes(extensions[at : at + 2])
        data, at = _vector(extensions, at + 2, 2)
        if kind == 0:  # server_name: list of (type, name); type 0 is a host name
            names, _ = _vector(data, 0, 2)
            i = 0
            while i < len(names):
                name_type = names[i]
                name, i = _vector(names, i + 1, 2)
                if name_type == 0 and server_name is None:
                    server_name = name.decode("ascii", "replace")
        elif kind == 16:  # application_layer_protocol_negotiation
            protocols, _ = _vector(data, 0, 2)
            i = 0
            while i < len(protocols):
                proto, i = _vector(protocols, i, 1)
                alpn.append(proto.decode("ascii", "replace"))
    return ClientHello(server_name=server_name, alpn=tuple(alpn))


# ---------------------------------------------------------------- settings


@functools.lru_cache(maxsize=8)
def _pod_context(offer: tuple[str, ...]) -> ssl.SSLContext:
    """The context toward the pod's app for an ALPN offer (a handful exist: built once). Its
    certificate is not verified: it is the client's original destination, reached from inside
    the pod."""
    return client_context(offer)


@dataclass
class _Delivery:
    """How a session's matched requests reach its user app: plain, or TLS of their own."""

    tls: bool = False
    trust_roots_pem: str | None = None
    server_name: str | None = None
    server_cert_pem: str | None = None
    _contexts: dict[str | None, ssl.SSLContext] = field(default_factory=dict)

    def context(self, alpn: str | None) -> ssl.SSLContext:
        ctx = self._contexts.get(alpn)
        if ctx is None:
            ctx = client_context((alpn,) if alpn else (), trust_roots_pem=self.trust_roots_pem)
            if self.server_cert_pem:
                # The user app's own certificate is given: it is compared as a whole below,
                # whoever signed it.
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._contexts[alpn] = ctx
        return ctx


@dataclass
class _SessionTls:
    """One channel's `Subscribe.tls` for a port (the PEM text is never logged or shown)."""

    cert_pem: str
    key_pem: str
    delivery: _Delivery
    _servers: dict[str | None, ssl.SSLContext] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<_SessionTls delivery={'tls' if self.delivery.tls else 'tcp'}>"

    @classmethod
    def from_wire(cls, obj: Any) -> _SessionTls:
        """Raises `TlsMaterialError` naming the bad key."""
        if not isinstance(obj, dict):
            raise TlsMaterialError(f"tls must be an object, got {type(obj).__name__}")
        unknown = set(obj) - {"cert_pem", "key_pem", "delivery"}
        if unknown:
            raise TlsMaterialError(f"tls has unknown key(s) {sorted(unknown)}")
        cert, key = obj.get("cert_pem"), obj.get("key_pem")
        if not isinstance(cert, str) or not isinstance(key, str):
            raise TlsMaterialError("tls needs cert_pem and key_pem (PEM text)")
        delivery = _delivery_from_wire(obj.get("delivery") or {})
        settings = cls(cert_pem=cert, key_pem=key, delivery=delivery)
        settings.server(None)  # the pair is checked now: a bad one fails the Subscribe
        return settings

    def server(self, alpn: str | None) -> ssl.SSLContext:
        ctx = self._servers.get(alpn)
        if ctx is None:
            ctx = self._servers[alpn] = server_context(
                self.cert_pem, self.key_pem, (alpn,) if alpn else ()
            )
        return ctx


def _delivery_from_wire(obj: Any) -> _Delivery:
    if not isinstance(obj, dict):
        raise TlsMaterialError(f"tls.delivery must be an object, got {type(obj).__name__}")
    protocol = obj.get("protocol", "tls")
    if protocol not in ("tls", "tcp"):
        raise TlsMaterialError(f'tls.delivery.protocol must be "tls" or "tcp", got {protocol!r}')
    texts: dict[str, str | None] = {}
    for key in ("trust_roots_pem", "server_name", "server_cert_pem"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise TlsMaterialError(f"tls.delivery.{key} must be a string")
        texts[key] = value or None
    delivery = _Delivery(
        tls=protocol == "tls",
        trust_roots_pem=texts["trust_roots_pem"],
        server_name=texts["server_name"],
        server_cert_pem=texts["server_cert_pem"],
    )
    if delivery.tls:
        delivery.context(None)  # trust roots are checked now
    return delivery


class StealTls:
    """The TLS settings of the stolen ports, per channel. A port is terminated with the
    certificate of its first subscriber that gave one; each channel's own delivery decides how
    its matched requests reach its user app."""

    def __init__(self) -> None:
        self._ports: dict[int, dict[Any, _SessionTls]] = {}

    def __repr__(self) -> str:
        return f"<StealTls ports={sorted(self._ports)}>"

    def subscribe(self, channel: Any, port: int, wire: Any) -> list[str]:
        """Record `channel`'s TLS settings for `port` (None: none). Raises `TlsMaterialError`
        for a bad one; returns warnings."""
        self.drop(channel, port)
        if wire is None:
            return []
        settings = _SessionTls.from_wire(wire)
        sessions = self._ports.setdefault(port, {})
        warnings = []
        first = next(iter(sessions.values()), None)
        if first is not None and (first.cert_pem, first.key_pem) != (
            settings.cert_pem,
            settings.key_pem,
        ):
            warnings.append(
                "another session already gave a different TLS certificate for this port: the "
                "agent answers the port's clients with that one (the first given)"
            )
        sessions[channel] = settings
        return warnings

    def drop(self, channel: Any, port: int) -> None:
        sessions = self._ports.get(port)
        if sessions is not None:
            sessions.pop(channel, None)
            if not sessions:
                del self._ports[port]

    def for_port(self, port: int) -> _SessionTls | None:
        sessions = self._ports.get(port)
        return next(iter(sessions.values()), None) if sessions else None

    def delivery(self, channel: Any, port: int) -> _Delivery:
        settings = self._ports.get(port, {}).get(channel)
        return settings.delivery if settings is not None else _Delivery()


# ---------------------------------------------------------------- streams


class TlsEnd(anyio.abc.ByteStream):
    """A TLS stream as the filters use it: EOF without close_notify is an end (HTTP finds its
    own ends), `send_eof` does nothing (TLS cannot half-close; the HTTP exchange ends by
    itself), and closing sends close_notify without waiting long for the peer's."""

    def __init__(self, tls: TLSStream) -> None:
        self.tls = tls

    def __repr__(self) -> str:
        return f"<TlsEnd alpn={self.alpn!r}>"

    @property
    def alpn(self) -> str | None:
        value: str | None = self.tls.extra(TLSAttribute.alpn_protocol, None)
        return value

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.tls.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.tls.send(item)

    async def send_eof(self) -> None:
        return None

    def closed_by_peer(self) -> bool:
        """Has the peer shut its side (an idle keep-alive connection the app closed)? A peek
        at the socket cannot tell (TLS records such as session tickets may wait unread)."""
        raw = self.tls.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if raw is None:
            return False
        poller = select.poll()
        poller.register(raw, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_CLOSE_NOTIFY_WAIT), contextlib.suppress(Exception):
                await self.tls.unwrap()
            with contextlib.suppress(Exception):
                await self.tls.transport_stream.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.tls.extra_attributes


async def _wrap(
    stream: anyio.abc.ByteStream, ctx: ssl.SSLContext, *, server: bool, hostname: str | None
) -> TlsEnd:
    with anyio.fail_after(HANDSHAKE_TIMEOUT):
        tls = await TLSStream.wrap(
            stream,
            server_side=server,
            hostname=hostname,
            ssl_context=ctx,
            standard_compatible=False,
        )
    return TlsEnd(tls)


_TLS_ERRORS = (
    OSError,  # ssl.SSLError included
    TimeoutError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


@dataclass
class TlsConnection:
    """A stolen connection whose TLS the agent terminated: the client's ClientHello, the
    protocol agreed with it (ALPN: `h2`, `http/1.1` or None) and the port's settings."""

    hello: ClientHello
    alpn: str | None
    port: int
    settings: _SessionTls
    steal_tls: StealTls

    def __repr__(self) -> str:
        return f"<TlsConnection port={self.port} alpn={self.alpn!r} sni={self.hello.server_name!r}>"

    async def to_pod(self, stream: anyio.abc.ByteStream) -> TlsEnd:
        """TLS over a new connection to the pod's app, offering the agreed protocol. Raises
        OSError (the reason) when the handshake fails."""
        offer = (self.alpn,) if self.alpn else ()
        try:
            return await _wrap(
                stream, _pod_context(offer), server=False, hostname=self.hello.server_name
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()
            if isinstance(exc, _TLS_ERRORS):
                raise OSError(
                    errno.ECONNABORTED, f"TLS with the pod's app failed: {exc!r}"
                ) from None
            raise

    async def to_session(
        self, channel: Any, end: anyio.abc.ByteStream
    ) -> anyio.abc.ByteStream | None:
        """A session connection as its user app wants it: `end` itself (plain), or TLS over it.
        None when the handshake fails (the user app stopped listening, or its certificate is
        not the one `tls_delivery` trusts): the caller gives the request to the pod's app."""
        delivery = self.steal_tls.delivery(channel, self.port)
        if not delivery.tls:
            return end
        name = delivery.server_name or self.hello.server_name or "localhost"
        try:
            tls = await _wrap(end, delivery.context(self.alpn), server=False, hostname=name)
        except _TLS_ERRORS as exc:
            log.warning(
                "port %d: TLS to the user app failed (%s); the request goes to the pod's app",
                self.port,
                exc,
            )
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await end.aclose()
            return None
        if delivery.server_cert_pem:
            der = tls.tls.extra(TLSAttribute.peer_certificate_binary, None)
            expected = ssl.PEM_cert_to_DER_cert(delivery.server_cert_pem.strip())
            if der != expected:
                log.warning(
                    "port %d: the user app's certificate is not tls_delivery.server_cert; the "
                    "request goes to the pod's app",
                    self.port,
                )
                await tls.aclose()
                return None
        return tls


# ---------------------------------------------------------------- terminating


async def _first_readable(*socks: socket.socket) -> socket.socket:
    """The first of `socks` to have bytes (or EOF) waiting."""
    first: list[socket.socket] = []
    async with anyio.create_task_group() as tg:

        async def wait(sock: socket.socket) -> None:
            await anyio.wait_readable(sock)
            first.append(sock)
            tg.cancel_scope.cancel()

        for sock in socks:
            tg.start_soon(wait, sock)
    return first[0]


async def _client_hello(
    raw: socket.socket, pod: socket.socket | None
) -> ClientHello | _Sentinel | None:
    """Peek at the client's first bytes until they are a whole ClientHello or clearly not one.
    None: the pod's app spoke first (a server-first protocol), or nothing came in time."""
    deadline = time.monotonic() + HELLO_WAIT
    while True:
        data = b""
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            if pod is None:
                await anyio.wait_readable(raw)
            elif await _first_readable(raw, pod) is pod:
                return None
            try:
                data = raw.recv(_MAX_HELLO, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = b""
            except OSError:
                return NOT_TLS
        if not data:
            # EOF, or no byte before the deadline: not ours to terminate
            return NOT_TLS if time.monotonic() < deadline else None
        hello = parse_client_hello(data)
        if hello is not NEED_MORE:
            return hello
        if time.monotonic() >= deadline:
            return NOT_TLS
        await anyio.sleep(_PEEK_POLL)  # the rest of the ClientHello is on its way


async def terminate(
    steal_tls: StealTls,
    port: int,
    client: anyio.abc.SocketStream,
    connect_pod: Callable[[], Awaitable[anyio.abc.SocketStream]],
) -> tuple[anyio.abc.ByteStream, anyio.abc.ByteStream | None, TlsConnection | None] | None:
    """The TLS step of a stolen connection on a filtered `port`, before it is filtered.

    Returns (client stream, first connection to the pod's app or None, TlsConnection or None):
    the client itself and a plain pod connection when the port has no certificate or the
    client does not speak TLS first; decrypted streams when it was terminated. None when the
    client's handshake failed (the connection is closed; logged)."""
    settings = steal_tls.for_port(port)
    if settings is None:
        return client, None, None
    pod: anyio.abc.SocketStream | None = None
    try:
        pod = await connect_pod()
    except OSError as exc:
        log.info("port %d: the pod's app is unreachable: %s", port, exc.strerror or exc)
    try:
        raw: socket.socket = client.extra(anyio.abc.SocketAttribute.raw_socket)
        pod_raw = pod.extra(anyio.abc.SocketAttribute.raw_socket) if pod is not None else None
        hello = await _client_hello(raw, pod_raw)
        if not isinstance(hello, ClientHello):
            return client, pod, None
        return await _handshakes(
            steal_tls, settings, port=port, client=client, pod=pod, hello=hello
        )
    except BaseException:
        if pod is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await pod.aclose()
        raise


async def _handshakes(
    steal_tls: StealTls,
    settings: _SessionTls,
    *,
    port: int,
    client: anyio.abc.SocketStream,
    pod: anyio.abc.SocketStream | None,
    hello: ClientHello,
) -> tuple[TlsEnd, TlsEnd | None, TlsConnection] | None:
    """TLS with the pod's app first (it chooses the protocol among the client's offer), then
    with the client. Closes what it opened when it fails."""
    offer = tuple(p for p in hello.alpn if p in ALPN_PROTOCOLS)
    pod_tls: TlsEnd | None = None
    if pod is not None:
        try:
            pod_tls = await _wrap(
                pod, _pod_context(offer), server=False, hostname=hello.server_name
            )
        except _TLS_ERRORS as exc:
            log.info("port %d: TLS with the pod's app failed: %s", port, exc)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await pod.aclose()
    agreed = _agree(offer, pod_tls.alpn if pod_tls is not None else None, pod_tls is not None)
    try:
        client_tls = await _wrap(client, settings.server(agreed), server=True, hostname=None)
    except BaseException as exc:
        if isinstance(exc, _TLS_ERRORS):
            log.info("port %d: a client's TLS handshake with the agent failed: %s", port, exc)
        with anyio.CancelScope(shield=True):
            for stream in (client, pod_tls):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        await stream.aclose()
        if isinstance(exc, _TLS_ERRORS):
            return None
        raise
    conn = TlsConnection(
        hello=hello, alpn=client_tls.alpn, port=port, settings=settings, steal_tls=steal_tls
    )
    return client_tls, pod_tls, conn


def _agree(offer: tuple[str, ...], pod_choice: str | None, pod_reached: bool) -> str | None:
    """The protocol to agree with the client: the pod's app's choice among its offer; when the
    app chose none (a server without ALPN speaks HTTP/1.1), HTTP/1.1 if offered; when the app
    was not reached (its requests get 502 anyway), the client's first."""
    if pod_choice in offer:
        return pod_choice
    if not offer:
        return None
    if pod_reached and "http/1.1" in offer:
        return "http/1.1"
    return offer[0]
