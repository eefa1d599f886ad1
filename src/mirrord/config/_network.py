"""The `feature.network` section: incoming (mirror, steal, HTTP filter), outgoing and DNS.

Owns: `NetworkConfig`, `IncomingConfig` with its `HttpFilterConfig`, `OutgoingConfig` with its
address filter, `DnsConfig` with its name filter. Does not own parsing an address filter entry
(`_filters.py`) or applying any of them (layer, daemon, agent).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from mirrord.config._incoming_tls import TlsDeliveryConfig, TlsStealConfig
from mirrord.config._values import (
    Port,
    PortPair,
    Regex,
    RegexList,
    _check_address_filter,
    _check_dns_filter,
    _check_method,
    _OrSingle,
    _Section,
    _shorthand_error,
    _single_to_list,
    expand_shorthand,
)

__all__ = [
    "DnsConfig",
    "DnsFilterConfig",
    "HttpFilterConfig",
    "IncomingConfig",
    "IncomingMode",
    "InnerHttpFilter",
    "NetworkConfig",
    "OutgoingConfig",
    "OutgoingFilterConfig",
]

IncomingMode = Literal["mirror", "steal", "off"]


class InnerHttpFilter(_Section):
    """One entry of `all_of` / `any_of`: exactly one of header, path, method."""

    header: Regex | None = Field(default=None, description="Regex on 'Name: value' of each header.")
    path: Regex | None = Field(
        default=None, description="Regex on the request path (and path+query)."
    )
    method: Annotated[str, AfterValidator(_check_method)] | None = Field(
        default=None, description="HTTP method, e.g. 'GET'."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> InnerHttpFilter:
        given = [k for k in ("header", "path", "method") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "conflict",
                "each filter sets exactly one of 'header', 'path', 'method' (got {given})",
                {"given": ", ".join(given) or "none"},
            )
        return self


class HttpFilterConfig(_Section):
    """Steal only HTTP requests that match; the rest go to the target app."""

    _shorthand_doc = "an object"
    _shorthand_schema: ClassVar[list[dict[str, Any]]] = []

    header_filter: Regex | None = Field(
        default=None, description="Regex on 'Name: value' of each header (case-insensitive)."
    )
    path_filter: Regex | None = Field(
        default=None, description="Regex on the request path (case-insensitive)."
    )
    method_filter: Annotated[str, AfterValidator(_check_method)] | None = Field(
        default=None, description="Only requests with this HTTP method."
    )
    all_of: list[InnerHttpFilter] | None = Field(
        default=None, description="Requests matching every filter in the list (non-empty)."
    )
    any_of: list[InnerHttpFilter] | None = Field(
        default=None, description="Requests matching at least one filter in the list (non-empty)."
    )
    ports: Annotated[list[Port], BeforeValidator(_single_to_list), _OrSingle()] = Field(
        default_factory=lambda: [80, 8080],
        description="Ports the HTTP filter applies to (default [80, 8080]).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return {}
        return value

    @model_validator(mode="after")
    def _one_filter(self) -> HttpFilterConfig:
        given = [
            k
            for k in ("header_filter", "path_filter", "method_filter", "all_of", "any_of")
            if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise PydanticCustomError(
                "conflict",
                "only one of header_filter, path_filter, method_filter, all_of, "
                "any_of may be set (got {given}); combine them with all_of or any_of",
                {"given": ", ".join(given)},
            )
        for key in ("all_of", "any_of"):
            if getattr(self, key) == []:
                raise PydanticCustomError("empty", "{key} must not be an empty list", {"key": key})
        return self

    @property
    def is_set(self) -> bool:
        """True when some filter is configured (then only matching requests are stolen)."""
        return any(
            getattr(self, k) is not None
            for k in ("header_filter", "path_filter", "method_filter", "all_of", "any_of")
        )


class IncomingConfig(_Section):
    """Incoming traffic: `incoming: "steal"` is short for `incoming: {mode: "steal"}`."""

    _shorthand_doc = "true, false, one of 'mirror', 'steal', 'off', or an object"
    _shorthand_schema = [
        {"type": "boolean"},
        {"enum": ["mirror", "steal", "off"], "type": "string"},
    ]

    mode: IncomingMode = Field(
        default="mirror",
        description="'mirror' (copy of the traffic), 'steal' (the traffic itself) or 'off'.",
    )
    http_filter: HttpFilterConfig = Field(
        default_factory=HttpFilterConfig, description="Steal only matching HTTP requests."
    )
    port_mapping: list[PortPair] = Field(
        default_factory=list,
        description="[[LOCAL, REMOTE]] "
        "pairs: the user app's port LOCAL gets the target's "
        "port REMOTE.",
    )
    listen_ports: list[PortPair] = Field(
        default_factory=list,
        description="[[PORT, LOCAL]] "
        "pairs: the user app really listens on LOCAL when it "
        "binds PORT.",
    )
    ignore_localhost: bool = Field(default=False, description="Listening on localhost stays local.")
    ignore_ports: list[Port] = Field(
        default_factory=list,
        description="Ports never mirrored or stolen. Mutually exclusive with ports.",
    )
    ports: list[Port] | None = Field(
        default=None,
        description="Only these ports are mirrored or "
        "stolen. Mutually exclusive with ignore_ports.",
    )
    on_concurrent_steal: Literal["abort", "continue", "override"] = Field(
        default="abort",
        description="When another session steals the same port without a filter: "
        "'abort', 'continue' or 'override'.",
    )
    tls_steal: TlsStealConfig = Field(
        default_factory=TlsStealConfig, description="HTTPS: the agent's certificate and key."
    )
    tls_delivery: TlsDeliveryConfig = Field(
        default_factory=TlsDeliveryConfig, description="HTTPS: how the user app gets requests."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return expand_shorthand(cls, value, false={"mode": "off"}, string_key="mode")

    @model_validator(mode="after")
    def _conflicts(self) -> IncomingConfig:
        if self.ports is not None and self.ignore_ports:
            raise PydanticCustomError(
                "conflict",
                "ports and ignore_ports cannot both be set (got ports={p}, "
                "ignore_ports={i}); keep one of them",
                {"p": repr(self.ports), "i": repr(self.ignore_ports)},
            )
        for key in ("port_mapping", "listen_ports"):
            seen: set[int] = set()
            for first, _ in getattr(self, key):
                if first in seen:
                    raise PydanticCustomError(
                        "conflict", "{key} maps port {port} twice", {"key": key, "port": first}
                    )
                seen.add(first)
        return self

    @property
    def is_steal(self) -> bool:
        return self.mode == "steal"


# --------------------------------------------------------------------------- network.outgoing

AddressFilterList = Annotated[
    list[Annotated[str, AfterValidator(_check_address_filter)]],
    BeforeValidator(_single_to_list),
    _OrSingle(),
]
DnsFilterList = Annotated[
    list[Annotated[str, AfterValidator(_check_dns_filter)]],
    BeforeValidator(_single_to_list),
    _OrSingle(),
]


def _exactly_one_of_remote_local(remote: object, local: object) -> None:
    """The outgoing and DNS filters take a `remote` or a `local` list, never both or neither."""
    if (remote is None) == (local is None):
        raise PydanticCustomError(
            "conflict",
            "set exactly one of remote and local (got {given})",
            {"given": "both" if remote is not None else "neither"},
        )


class OutgoingFilterConfig(_Section):
    """`remote: [...]`: only matching traffic goes out from the target; `local: [...]`: matching
    traffic stays on this machine. Entries: `[tcp://|udp://][name|ip|cidr][:port]`."""

    remote: AddressFilterList | None = Field(
        default=None, description="Only these destinations go through the target."
    )
    local: AddressFilterList | None = Field(
        default=None,
        description="These destinations stay local; everything else goes through the target.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> OutgoingFilterConfig:
        _exactly_one_of_remote_local(self.remote, self.local)
        return self


class OutgoingConfig(_Section):
    """Outgoing connections from the target. `outgoing: false` keeps TCP and UDP local."""

    _shorthand_doc = "true, false or an object"
    _shorthand_schema = [{"type": "boolean"}]

    tcp: bool = Field(default=True, description="Outgoing TCP goes through the target.")
    udp: bool = Field(default=True, description="Outgoing UDP goes through the target.")
    ignore_localhost: bool = Field(
        default=False, description="Connections to localhost stay local."
    )
    filter: OutgoingFilterConfig | None = Field(
        default=None, description="Which destinations go remote (remote) or stay local (local)."
    )
    unix_streams: RegexList = Field(
        default_factory=list,
        description=(
            "Unix stream socket paths (regexes): a connect() to a matching path reaches the "
            "socket at that path in the target instead of one on this machine."
        ),
    )
    handover: bool = Field(
        default=True,
        description=(
            "For a local target (pid/N, container/ID): the agent's connected socket itself "
            "is handed to the user app (no relay); false relays every connection."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return expand_shorthand(cls, value, false={"tcp": False, "udp": False})


class DnsFilterConfig(_Section):
    """`remote`: only these names resolve in the target; `local`: these resolve locally.
    Entries: `[name|ip|cidr][:port]`."""

    remote: DnsFilterList | None = Field(
        default=None, description="Only these queries resolve in the target."
    )
    local: DnsFilterList | None = Field(default=None, description="These queries resolve locally.")

    @model_validator(mode="after")
    def _exactly_one(self) -> DnsFilterConfig:
        _exactly_one_of_remote_local(self.remote, self.local)
        return self


class DnsConfig(_Section):
    """Name resolution in the target. `dns: false` resolves locally."""

    _shorthand_doc = "true, false or an object"
    _shorthand_schema = [{"type": "boolean"}]

    enabled: bool = Field(
        default=True, description="getaddrinfo resolves with the target's resolv.conf and hosts."
    )
    filter: DnsFilterConfig | None = Field(
        default=None, description="Which names resolve remotely (remote) or locally (local)."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, bool):
            return {"enabled": value}
        if not isinstance(value, dict | DnsConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value


class NetworkConfig(_Section):
    """`network: false` turns incoming, outgoing and DNS off."""

    _shorthand_doc = "true, false or an object"
    _shorthand_schema = [{"type": "boolean"}]

    incoming: IncomingConfig = Field(
        default_factory=IncomingConfig, description="Incoming traffic: mirror or steal."
    )
    outgoing: OutgoingConfig = Field(
        default_factory=OutgoingConfig, description="Outgoing connections from the target."
    )
    dns: DnsConfig = Field(default_factory=DnsConfig, description="Name resolution in the target.")
    ipv6: bool = Field(
        default=True,
        description=(
            "IPv6 for the app: on, it may open IPv6 sockets (steal and mirror cover IPv6 "
            "whenever the target has it); off, creating an IPv6 socket fails with "
            "EAFNOSUPPORT, as on a host without IPv6, and `::` resolves to 0.0.0.0."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return expand_shorthand(
            cls, value, false={"incoming": False, "outgoing": False, "dns": False}
        )
