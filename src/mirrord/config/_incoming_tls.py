"""The config of HTTPS under a filtered steal: `feature.network.incoming.tls_steal` (the
certificate the agent answers the target's TLS clients with) and
`feature.network.incoming.tls_delivery` (how matched requests reach the user app: plain, or
TLS; mirrord's key).

Owns: the two sections' shapes and per-value checks (both or neither of cert and key).
Does not own: reading the files (the daemon, at session start, relative to the session's
working directory like `feature.env.env_file`) or using them (the agent).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["TlsDeliveryConfig", "TlsStealConfig", "tls_warnings"]


def _single_to_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class _TlsSection(BaseModel):
    # as every config section: strict types, unknown keys are errors
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TlsStealConfig(_TlsSection):
    """HTTPS under a filtered steal: with a certificate and key, the agent terminates the TLS of
    the clients of the filtered ports (`http_filter.ports`), filters the requests, and
    re-encrypts those it leaves to the target's app. Without, TLS passes untouched."""

    cert: str | None = Field(
        default=None,
        description="PEM file on this machine: the certificate chain (leaf first) the agent "
        "presents, the pod's own or one its clients trust.",
    )
    key: str | None = Field(
        default=None, description="PEM file on this machine: the certificate's private key."
    )

    @model_validator(mode="after")
    def _both(self) -> TlsStealConfig:
        if (self.cert is None) != (self.key is None):
            raise PydanticCustomError(
                "conflict",
                "set both cert and key (got only {given})",
                {"given": "cert" if self.cert is not None else "key"},
            )
        return self

    @property
    def is_set(self) -> bool:
        return self.cert is not None


class TlsDeliveryConfig(_TlsSection):
    """How requests stolen from a terminated TLS connection reach the user app."""

    protocol: Literal["tls", "tcp"] = Field(
        default="tls",
        description="'tls': in TLS of their own, as the pod's app received them; 'tcp': plain.",
    )
    trust_roots: Annotated[list[str], BeforeValidator(_single_to_list)] = Field(
        default_factory=list,
        description="PEM files of CAs the user app's certificate must chain to "
        "(default: not verified).",
    )
    server_name: str | None = Field(
        default=None,
        description="Server name sent to the user app and checked against its certificate "
        "(default: the client's, else 'localhost').",
    )
    server_cert: str | None = Field(
        default=None,
        description="PEM file: the user app's exact certificate (it must present this one).",
    )


def tls_warnings(mode: str, filtered: bool, tls_steal: TlsStealConfig) -> list[str]:
    """`tls_steal` set where it does nothing."""
    if tls_steal.is_set and (mode != "steal" or not filtered):
        return [
            "feature.network.incoming.tls_steal is ignored: it applies to a steal with an "
            "http_filter (mode 'steal' and a filter); without a filter TLS is stolen whole"
        ]
    return []
