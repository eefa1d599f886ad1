"""TLS material shared by the daemon and the agent for HTTPS under a filtered steal.

Owns: turning a certificate chain and private key given as PEM text (read by the daemon from
the user's machine, carried to the agent in `Subscribe.tls`) into `ssl.SSLContext`s, and the
check of such a pair with a message that says what to fix (`check_pem_pair`); the client
contexts the agent uses toward the pod's app and the user app.
Does not own: reading the config's files (the daemon, `daemon/_incoming_tls.py`), handshakes
and routing (the agent, `agent/_incoming_tls.py`).
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Sequence

__all__ = [
    "MAX_PEM",
    "TlsMaterialError",
    "check_pem_pair",
    "client_context",
    "server_context",
]

MAX_PEM = 1024 * 1024  # a chain of a few certificates is a few KiB; this bounds a Subscribe


class TlsMaterialError(ValueError):
    """A certificate or key that cannot be used (the user's config): the message names what is
    wrong and what to do."""


def _check_text(what: str, pem: str, marker: str) -> None:
    if not isinstance(pem, str) or not pem.strip():
        raise TlsMaterialError(f"the {what} is empty")
    if len(pem) > MAX_PEM:
        raise TlsMaterialError(f"the {what} is larger than {MAX_PEM} bytes")
    if marker not in pem:
        raise TlsMaterialError(f"the {what} is not PEM (no '{marker}' line)")
    if what == "key" and "ENCRYPTED" in pem:
        raise TlsMaterialError(
            "the key is encrypted with a passphrase; give an unencrypted key "
            "(e.g. `openssl pkey -in KEY -out KEY.plain`)"
        )


def _load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """`ssl` loads a chain from files only: two memfds, gone once closed, so the key never
    touches a disk (the agent's node, or a temporary directory of the user's machine)."""
    fds: list[int] = []
    try:
        paths = []
        for name, text in (("cert", cert_pem), ("key", key_pem)):
            fd = os.memfd_create(f"mirrord-tls-{name}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, text.encode())
            paths.append(f"/proc/self/fd/{fd}")

        def no_passphrase() -> bytes:
            # Never let OpenSSL prompt on a terminal (the daemon and the agent have none).
            raise TlsMaterialError("the key needs a passphrase")

        ctx.load_cert_chain(paths[0], paths[1], password=no_passphrase)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def server_context(cert_pem: str, key_pem: str, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """The context the agent terminates a client's TLS with, offering `alpn` (the one protocol
    agreed for this connection, or none). Raises `TlsMaterialError`."""
    _check_text("certificate", cert_pem, "-----BEGIN CERTIFICATE-----")
    _check_text("key", key_pem, "PRIVATE KEY-----")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        _load_chain(ctx, cert_pem, key_pem)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "MISMATCH" in str(reason).upper():
            raise TlsMaterialError("the key does not belong to the certificate") from None
        raise TlsMaterialError(f"the certificate or key cannot be loaded ({reason})") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def check_pem_pair(cert_pem: str, key_pem: str) -> None:
    """Raise `TlsMaterialError` unless the pair can serve TLS (PEM, unencrypted, matching)."""
    server_context(cert_pem, key_pem)


def client_context(
    alpn: Sequence[str] = (), *, trust_roots_pem: str | None = None
) -> ssl.SSLContext:
    """A client context offering `alpn`. With `trust_roots_pem`, the peer's certificate must
    chain to one of them (its name is checked against the server name given at connect);
    without, it is not verified (the pod's app at its original destination, reached from
    inside the pod; the user app reached through the user's own daemon)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trust_roots_pem:
        try:
            ctx.load_verify_locations(cadata=trust_roots_pem)
        except ssl.SSLError as exc:
            raise TlsMaterialError(
                f"the trust roots cannot be loaded ({exc.reason or exc})"
            ) from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx
