"""HTTPS under a filtered steal, the daemon's part: reading the session's certificate files on
the user's machine when the session starts, so that a bad one stops the session before any
agent is started, and the `Subscribe.tls` they become.

Owns: `subscribe_tls` (config -> the wire object, or `ConfigRefused` naming the key, the file
and what to fix).
Does not own: the config's shape (`mirrord.config`), TLS itself (the agent).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from mirrord._tls import MAX_PEM, TlsMaterialError, check_pem_pair, client_context
from mirrord.config import MirrordConfig
from mirrord.daemon._exceptions import ConfigRefused
from mirrord.protocol import messages as m

__all__ = ["agent_tls_warnings", "subscribe_tls"]

_KEY = "feature.network.incoming"


def _read(key: str, name: str, cwd: Path) -> tuple[Path, str]:
    path = cwd / Path(name).expanduser()
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as exc:
        raise ConfigRefused(
            f"cannot read {_KEY}.{key} {path}: {exc.strerror or exc}; fix the path in the config "
            "(relative paths start at the working directory of `mirrord run`)"
        ) from None
    if len(data) > MAX_PEM:
        raise ConfigRefused(f"{_KEY}.{key} {path} is larger than {MAX_PEM} bytes: not a PEM file")
    try:
        return path, data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigRefused(
            f"{_KEY}.{key} {path} is not a PEM file (binary content: DER? convert it with "
            "`openssl x509 -inform der` or `openssl pkey -inform der`)"
        ) from None


def subscribe_tls(config: Any, cwd: str | None) -> dict[str, Any] | None:
    """`Subscribe.tls` for the session's filtered steals: the PEM text of `tls_steal`'s files and
    the `tls_delivery` settings; None when `tls_steal` is not set or cannot apply (no filtered
    steal). Raises `ConfigRefused` for a missing, unreadable or unusable file."""
    if not isinstance(config, MirrordConfig):
        return None
    incoming = config.feature.network.incoming
    steal = incoming.tls_steal
    if not steal.is_set or incoming.mode != "steal" or not incoming.http_filter.is_set:
        return None
    assert steal.cert is not None and steal.key is not None
    base = Path(cwd or "/")
    cert_path, cert = _read("tls_steal.cert", steal.cert, base)
    key_path, key = _read("tls_steal.key", steal.key, base)
    try:
        check_pem_pair(cert, key)
    except TlsMaterialError as exc:
        raise ConfigRefused(
            f"{_KEY}.tls_steal: {exc} (cert {cert_path}, key {key_path}); give the certificate "
            "the pod's clients trust and its own unencrypted private key, both PEM"
        ) from None
    return {"cert_pem": cert, "key_pem": key, "delivery": _delivery(config, base)}


def _delivery(config: MirrordConfig, base: Path) -> dict[str, Any]:
    delivery = config.feature.network.incoming.tls_delivery
    out: dict[str, Any] = {"protocol": delivery.protocol, "server_name": delivery.server_name}
    if delivery.trust_roots:
        roots = "\n".join(
            _read("tls_delivery.trust_roots", name, base)[1] for name in delivery.trust_roots
        )
        try:
            client_context(trust_roots_pem=roots)
        except TlsMaterialError as exc:
            raise ConfigRefused(
                f"{_KEY}.tls_delivery.trust_roots: {exc}; list PEM files of CA certificates"
            ) from None
        out["trust_roots_pem"] = roots
    if delivery.server_cert is not None:
        path, pem = _read("tls_delivery.server_cert", delivery.server_cert, base)
        try:
            ssl.PEM_cert_to_DER_cert(pem.strip())
        except ValueError:
            raise ConfigRefused(
                f"{_KEY}.tls_delivery.server_cert {path} is not one PEM certificate"
            ) from None
        out["server_cert_pem"] = pem
    return out


def agent_tls_warnings(incoming_tls: dict[str, Any] | None, agent_features: list[str]) -> list[str]:
    """An agent too old for `Subscribe.tls` ignores it: TLS then passes through untouched."""
    if incoming_tls is None or m.FEATURE_INCOMING_TLS in agent_features:
        return []
    return [
        "feature.network.incoming.tls_steal: the agent is older and does not terminate TLS: "
        "HTTPS on the filtered ports goes to the target untouched"
    ]
