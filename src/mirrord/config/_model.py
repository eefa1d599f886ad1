"""The configuration model: mirrord's key names and shorthands, as pydantic v2 models.

Owns: the shape of a resolved configuration (`MirrordConfig` and its sections), the shorthands
mirrord accepts (`"fs": "read"`, `"incoming": "steal"`, `"outgoing": false`, `"env": false`,
`"dns": false`, `"target": "pod/x"`), per-value checks (regexes compile, address filters parse,
ports are ports) and the conflicts between keys. A validated model is always normalised: every
shorthand expanded, lists are lists, the target path is a string; `model_dump(mode="json")` of
it validates back to an equal model (that is how it crosses to the daemon).
Does not own: reading files, templating, environment variables or CLI flags (`_loader.py`), and
turning pydantic's errors into messages (`_errors.py`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from mirrord.config._filters import check_fs_pattern, check_regex, parse_address_filter
from mirrord.config._incoming_tls import TlsDeliveryConfig, TlsStealConfig, tls_warnings

__all__ = [
    "AgentConfig",
    "DaemonConfig",
    "DnsConfig",
    "DnsFilterConfig",
    "EnvConfig",
    "FeatureConfig",
    "FsConfig",
    "HttpFilterConfig",
    "IncomingConfig",
    "InnerHttpFilter",
    "MirrordConfig",
    "NetworkConfig",
    "OutgoingConfig",
    "OutgoingFilterConfig",
    "TargetConfig",
]

# --------------------------------------------------------------------------- value types


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


# --------------------------------------------------------------------------- target

TARGET_KINDS = (
    "pod",
    "deployment",
    "rollout",
    "job",
    "cronjob",
    "statefulset",
    "service",
    "replicaset",
)
LOCAL_TARGET_KINDS = ("pid", "container")
_KIND_ALIASES = {"deploy": "deployment"}
_TARGET_FORMS = (
    "'targetless', 'KIND/NAME' or 'KIND/NAME/container/CONTAINER' with KIND one of "
    + ", ".join(TARGET_KINDS)
    + ", or a local 'pid/N' or 'container/ID'"
)
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _target_error(value: Any, why: str) -> PydanticCustomError:
    return PydanticCustomError(
        "target",
        "{value}: {why}; expected {forms}",
        {"value": repr(value), "why": why, "forms": _TARGET_FORMS},
    )


def normalise_target_path(value: Any) -> str:
    """`"pod/x"`, `{"pod": "x", "container": "c"}`, `"deploy/x"`… → the canonical string."""
    if isinstance(value, dict):
        kinds = [k for k in value if k in TARGET_KINDS]
        extra = [k for k in value if k not in TARGET_KINDS and k != "container"]
        if len(kinds) != 1 or extra or not all(isinstance(v, str) for v in value.values()):
            raise _target_error(
                value,
                "an object target path has exactly one KIND key "
                "(and optionally 'container'), all strings",
            )
        text = f"{kinds[0]}/{value[kinds[0]]}"
        if "container" in value:
            text += f"/container/{value['container']}"
        value = text
    if not isinstance(value, str):
        raise _target_error(value, "not a string")
    if value == "targetless":
        return value
    parts = value.split("/")
    kind = _KIND_ALIASES.get(parts[0], parts[0])
    if kind in LOCAL_TARGET_KINDS and len(parts) == 2:
        if kind == "pid" and not (parts[1].isdigit() and int(parts[1]) > 0):
            raise _target_error(value, f"pid {parts[1]!r} is not a positive number")
        if not parts[1]:
            raise _target_error(value, "the container id is empty")
        return f"{kind}/{parts[1]}"
    if kind not in TARGET_KINDS:
        if len(parts) == 1:
            guess = f"'pod/{value}'"
            if value.isdigit() and int(value) > 0:  # a process id as often as a pod name
                guess = f"'pid/{value}' or 'pod/{value}'"
            raise _target_error(value, f"no kind given (did you mean {guess}?)")
        raise _target_error(value, f"unknown kind {parts[0]!r}")
    if len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "container"):
        raise _target_error(value, "wrong number of '/'-separated parts")
    for name in parts[1::2]:
        if not _K8S_NAME.match(name):
            raise _target_error(value, f"{name!r} is not a valid Kubernetes name")
    return "/".join([kind, *parts[1:]])


class TargetConfig(_Section):
    """What to impersonate. `target: "pod/x"` is short for `target: {path: "pod/x"}`."""

    _shorthand_doc = "a target string or an object with 'path' and 'namespace'"
    _shorthand_schema = [{"type": "string"}]

    path: Annotated[
        str | None,
        BeforeValidator(lambda v: None if v is None else normalise_target_path(v)),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "properties": {k: {"type": "string"} for k in (*TARGET_KINDS, "container")},
                        "additionalProperties": False,
                        "minProperties": 1,
                    },
                    {"type": "null"},
                ]
            }
        ),
    ] = Field(
        default=None,
        description="The target: 'targetless', 'pod/NAME[/container/C]', 'deployment/NAME', "
        "'statefulset/NAME', 'rollout/NAME', 'job/NAME', 'cronjob/NAME', 'service/NAME', "
        "'replicaset/NAME', or a local 'pid/N' / 'container/ID'. Also an object like "
        '{"pod": "x", "container": "c"}. Unset means targetless.',
    )
    namespace: str | None = Field(
        default=None,
        description="Namespace of the target (targetless: where the agent runs). "
        "Defaults to the kube context's namespace.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            return {"path": value}
        if (
            isinstance(value, dict)
            and not {"path", "namespace"} & value.keys()
            and any(k in TARGET_KINDS for k in value)
        ):
            return {"path": value}
        if not isinstance(value, dict | TargetConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value

    @property
    def kind(self) -> str | None:
        """ "pod", "deployment", …, "pid", "container", "targetless", or None when unset."""
        if self.path is None:
            return None
        return self.path.split("/")[0]

    @property
    def name(self) -> str | None:
        """The resource name (or pid / container id); None for targetless and unset."""
        if self.path is None or self.path == "targetless":
            return None
        return self.path.split("/")[1]

    @property
    def container(self) -> str | None:
        """The container named with `/container/C`, if any."""
        if self.path is None:
            return None
        parts = self.path.split("/")
        return parts[3] if len(parts) == 4 else None

    @property
    def is_targetless(self) -> bool:
        return self.path is None or self.path == "targetless"

    @property
    def is_local(self) -> bool:
        """True for `pid/N` and `container/ID` targets (an agent on this machine)."""
        return self.kind in LOCAL_TARGET_KINDS


# --------------------------------------------------------------------------- agent

Capability = Literal["SYS_ADMIN", "SYS_PTRACE", "NET_RAW", "NET_ADMIN"]


def _image(value: Any) -> Any:
    # mirrord also accepts {"registry": R, "tag": T}.
    if isinstance(value, dict):
        extra = set(value) - {"registry", "tag"}
        if extra or "registry" not in value:
            raise PydanticCustomError(
                "image",
                "an image object has 'registry' and optionally 'tag', got {value}",
                {"value": repr(value)},
            )
        return f"{value['registry']}:{value.get('tag', 'latest')}"
    return value


class ResourceList(_Section):
    cpu: str | None = Field(default=None, description="CPU quantity, e.g. '100m'.")
    memory: str | None = Field(default=None, description="Memory quantity, e.g. '100Mi'.")


class ResourceRequirements(_Section):
    requests: ResourceList = Field(
        default_factory=ResourceList, description="Resource requests of the agent container."
    )
    limits: ResourceList = Field(
        default_factory=ResourceList, description="Resource limits of the agent container."
    )


class AgentConfig(_Section):
    """The agent: where and how it runs next to the target."""

    log_level: str = Field(
        default="info",
        description="Log level of the agent: 'trace', 'debug', 'info', 'warn' or 'error'.",
    )
    json_log: bool = Field(default=False, description="The agent logs JSON lines instead of text.")
    namespace: str | None = Field(
        default=None,
        description="Namespace for the agent Job/pod (default: the target's namespace).",
    )
    image: Annotated[
        str | None,
        BeforeValidator(_image),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "properties": {"registry": {"type": "string"}, "tag": {"type": "string"}},
                        "required": ["registry"],
                        "additionalProperties": False,
                    },
                    {"type": "null"},
                ]
            }
        ),
    ] = Field(
        default=None,
        description="Agent container image (a string, or {registry, tag}). Default: "
        "this package's agent image.",
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        default="IfNotPresent", description="Kubernetes image pull policy for the agent image."
    )
    image_pull_secrets: list[dict[str, str]] = Field(
        default_factory=list, description='Image pull secrets, as [{"name": SECRET}].'
    )
    ttl: int = Field(
        default=1,
        ge=0,
        le=65535,
        description="Seconds the agent Job is kept after the agent exits (for its logs).",
    )
    ephemeral: bool = Field(
        default=False,
        description="Run the agent as an ephemeral container in "
        "the target pod instead of a Job (not for targetless).",
    )
    placement: Literal["job", "ephemeral", "daemonset"] | None = Field(
        default=None,
        description="Where a Kubernetes agent runs: 'job' (a Job on the target's node), "
        "'ephemeral' (an ephemeral container in the target pod) or 'daemonset' (the node agent "
        "installed by the Helm chart). Unset: 'ephemeral' if agent.ephemeral, else 'job'.",
    )
    privileged: bool = Field(default=False, description="Run the agent container privileged.")
    disabled_capabilities: Annotated[
        list[Capability], BeforeValidator(_single_to_list), _OrSingle()
    ] = Field(
        default_factory=list,
        description="Linux capabilities not to give the agent "
        "(SYS_ADMIN, SYS_PTRACE, NET_RAW, NET_ADMIN); features needing them stop working.",
    )
    communication_timeout: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Seconds the agent waits without any client before it exits (default 60).",
    )
    startup_timeout: int = Field(
        default=60, ge=1, description="Seconds to wait for the agent to become ready."
    )
    network_interface: str | None = Field(
        default=None,
        description="Interface the agent sniffs on for mirroring (default: all of the target's).",
    )
    flush_connections: bool = Field(
        default=True,
        description="Flush conntrack entries of existing connections when stealing starts.",
    )
    clean_iptables_on_start: bool = Field(
        default=False,
        description="Remove leftover mirrord rules "
        "found in the target at start instead of failing.",
    )
    nftables: bool | None = Field(
        default=None,
        description="true: redirect with nftables; false: iptables-legacy; unset: detect.",
    )
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, description="Pod tolerations for the agent (default: tolerate everything)."
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Resource requests/limits of the agent container."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels on the agent Job and pod."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations on the agent Job and pod."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node selector for a targetless agent pod."
    )
    service_account: str | None = Field(
        default=None, description="Service account of the agent pod."
    )
    priority_class: str | None = Field(default=None, description="Priority class of the agent pod.")

    @model_validator(mode="after")
    def _placement(self) -> AgentConfig:
        if self.ephemeral and self.placement not in (None, "ephemeral"):
            raise PydanticCustomError(
                "conflict",
                "ephemeral: true and placement: {p} contradict each other; keep one of them",
                {"p": repr(self.placement)},
            )
        return self

    @property
    def is_ephemeral(self) -> bool:
        """True when the agent is an ephemeral container (`ephemeral` or `placement`)."""
        return self.ephemeral or self.placement == "ephemeral"


# --------------------------------------------------------------------------- feature.env


class EnvConfig(_Section):
    """The target's environment in the user app. `env: false` means exclude everything."""

    _shorthand_doc = "true, false or an object"
    _shorthand_schema = [{"type": "boolean"}]

    include: NameList | None = Field(
        default=None,
        description="Only these remote variables (list or 'A;B'; '*' and '?' wildcards)."
        " Mutually exclusive with exclude.",
    )
    exclude: NameList | None = Field(
        default=None,
        description="All remote variables except these (list or 'A;B'; wildcards). "
        "Mutually exclusive with include.",
    )
    override: dict[str, str] = Field(
        default_factory=dict, description="Variables set to these values whatever the target has."
    )
    unset: NameList = Field(
        default_factory=list,
        description="Variables removed from the user app's environment (case-insensitive).",
    )
    env_file: str | None = Field(
        default=None,
        description="A .env file whose variables are added "
        "(after the remote ones, before override).",
    )
    load_from_process: bool | None = Field(
        default=None,
        description="Accepted for compatibility; variables are always fetched before start.",
    )
    mapping: dict[Regex, str] = Field(
        default_factory=dict,
        description="Regex on a variable name → value replacing the remote value.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or value is True:
            return {}
        if value is False:
            return {"exclude": ["*"]}
        if not isinstance(value, dict | EnvConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value

    @model_validator(mode="after")
    def _conflicts(self) -> EnvConfig:
        if self.include is not None and self.exclude is not None:
            raise PydanticCustomError(
                "conflict",
                "include and exclude cannot both be set (got include={inc}, "
                "exclude={exc}); keep one of them",
                {"inc": repr(self.include), "exc": repr(self.exclude)},
            )
        return self

    @property
    def enabled(self) -> bool:
        """False when no remote variable is wanted (`env: false`)."""
        return not (self.include is None and self.exclude == ["*"])


# --------------------------------------------------------------------------- feature.fs

FsMode = Literal["local", "localwithoverrides", "read", "write"]


class FsConfig(_Section):
    """Remote files. `fs: "write"` is short for `fs: {mode: "write"}`; true is read, false
    is local."""

    _shorthand_doc = (
        "true, false, one of 'local', 'localwithoverrides', 'read', 'write', or an object"
    )
    _shorthand_schema = [
        {"type": "boolean"},
        {"enum": ["local", "localwithoverrides", "read", "write"], "type": "string"},
    ]

    mode: FsMode = Field(
        default="read",
        description="Default for paths no list matches: 'local', "
        "'localwithoverrides', 'read' (remote, read-only) or 'write'.",
    )
    read_write: FsPatternList = Field(
        default_factory=list, description="Paths (regexes) read and written remotely."
    )
    read_only: FsPatternList = Field(
        default_factory=list,
        description="Paths (regexes) read remotely; opened for writing they are local.",
    )
    local: FsPatternList = Field(default_factory=list, description="Paths (regexes) always local.")
    not_found: FsPatternList = Field(
        default_factory=list, description="Paths (regexes) that appear not to exist (ENOENT)."
    )
    mapping: dict[Regex, str] = Field(
        default_factory=dict,
        description="Regex → replacement applied to a path before anything else ($1, ${name}).",
    )
    readonly_file_buffer: int = Field(
        default=128000,
        ge=0,
        description="Bytes read ahead for read-only remote files (0 disables).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or value is True:
            return {}
        if value is False:
            return {"mode": "local"}
        if isinstance(value, str):
            return {"mode": value}
        if not isinstance(value, dict | FsConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value


# --------------------------------------------------------------------------- network.incoming

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
        if value is None or value is True:
            return {}
        if value is False:
            return {"mode": "off"}
        if isinstance(value, str):
            return {"mode": value}
        if not isinstance(value, dict | IncomingConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value

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

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or value is True:
            return {}
        if value is False:
            return {"tcp": False, "udp": False}
        if not isinstance(value, dict | OutgoingConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value


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
    ipv6: bool = Field(default=False, description="Also mirror/steal/connect over IPv6.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or value is True:
            return {}
        if value is False:
            return {"incoming": False, "outgoing": False, "dns": False}
        if not isinstance(value, dict | NetworkConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value


class FeatureConfig(_Section):
    """What the user app sees of the target."""

    env: EnvConfig = Field(
        default_factory=EnvConfig, description="The target's environment variables."
    )
    fs: FsConfig = Field(default_factory=FsConfig, description="The target's files.")
    network: NetworkConfig = Field(
        default_factory=NetworkConfig, description="Incoming, outgoing and DNS."
    )
    hostname: bool = Field(
        default=True, description="gethostname/uname report the target's hostname."
    )


# --------------------------------------------------------------------------- daemon, root

LogLevel = Literal["debug", "info", "warning", "error"]


class DaemonConfig(_Section):
    """mirrordd, the per-user daemon sessions share (not in mirrord)."""

    idle_timeout: Seconds = Field(
        default=300.0,
        description="Seconds the daemon stays up with no session (0: exit with the last session).",
    )
    agent_linger: Seconds = Field(
        default=60.0,
        description="Seconds an agent is kept after its last "
        "session, for a quick restart to reuse it.",
    )
    log_level: LogLevel = Field(
        default="info", description="Daemon log level: 'debug', 'info', 'warning' or 'error'."
    )


class ExperimentalConfig(_Section):
    """Switches for features still being built (mirrord's own experimental keys are ignored)."""

    syscall_supervisor: bool | None = Field(
        default=None,
        description="Run the command under the system-call supervisor (seccomp), so that "
        "programs that bypass libc (static binaries, Go) get the target's files: true "
        "(as `mirrord run --syscalls`), false (never), unset (for statically linked "
        "executables only). Not in mirrord.",
    )


class MirrordConfig(_Section):
    """A resolved mirrord configuration (defaults < file < MIRRORD_* env < CLI flags)."""

    target: TargetConfig = Field(
        default_factory=TargetConfig,
        description="What to impersonate: a string or {path, namespace}.",
    )
    agent: AgentConfig = Field(default_factory=AgentConfig, description="The agent.")
    feature: FeatureConfig = Field(
        default_factory=FeatureConfig, description="What the user app sees of the target."
    )
    kubeconfig: str | None = Field(
        default=None, description="Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)."
    )
    accept_invalid_certificates: bool | None = Field(
        default=None,
        description="Accept an API server certificate that does not verify (self-signed). "
        "Unset: as the kubeconfig says (`insecure-skip-tls-verify`).",
    )
    kube_context: str | None = Field(
        default=None, description="Context in the kubeconfig (default: its current context)."
    )
    skip_processes: NameList = Field(
        default_factory=list,
        description="Programs (names) the layer does not load into (list or 'a;b').",
    )
    skip_build_tools: bool = Field(
        default=True,
        description="Do not load into build tools (cc, ld, go, cargo, …) started by the command.",
    )
    daemon: DaemonConfig = Field(
        default_factory=DaemonConfig, description="mirrordd, the per-user daemon."
    )
    experimental: ExperimentalConfig = Field(
        default_factory=ExperimentalConfig, description="Features still being built."
    )

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> MirrordConfig:
        # Checks between sections hold for the whole configuration, not for one of its layers:
        # a file with `agent.ephemeral: true` is completed by `-t deployment/web`
        # (`resolve_config` validates each layer with `{"layer": True}`, then the result).
        if isinstance(info.context, dict) and info.context.get("layer"):
            return self
        if self.agent.is_ephemeral and self.target.is_targetless:
            raise PydanticCustomError(
                "conflict",
                "agent.ephemeral needs a target (an ephemeral container is added "
                "to the target pod); set target or agent.ephemeral: false",
                {},
            )
        if self.agent.is_ephemeral and self.target.is_local:
            raise PydanticCustomError(
                "conflict",
                "agent.ephemeral does not apply to a local target {t}",
                {"t": repr(self.target.path)},
            )
        return self


def config_warnings(cfg: MirrordConfig) -> list[str]:
    """Things that are allowed but probably not what the user meant."""
    out: list[str] = []
    net = cfg.feature.network
    if net.dns.filter is not None and not net.dns.enabled:
        out.append(
            "feature.network.dns.filter is ignored because feature.network.dns.enabled is false"
        )
    filt = net.outgoing.filter
    if filt is not None and not (net.outgoing.tcp or net.outgoing.udp):
        out.append("feature.network.outgoing.filter is ignored because tcp and udp are false")
    if net.incoming.http_filter.is_set and net.incoming.mode == "off":
        out.append("feature.network.incoming.http_filter is ignored because incoming.mode is 'off'")
    out += tls_warnings(net.incoming.mode, net.incoming.http_filter.is_set, net.incoming.tls_steal)
    if net.incoming.mode == "steal" and cfg.target.is_targetless:
        out.append(
            "feature.network.incoming.mode is 'steal' but there is no target: there is "
            "no traffic to steal in targetless mode"
        )
    fs = cfg.feature.fs
    lists: dict[str, list[str]] = {
        "read_write": fs.read_write,
        "read_only": fs.read_only,
        "local": fs.local,
        "not_found": fs.not_found,
    }
    seen: dict[str, str] = {}
    for key, patterns in lists.items():
        for pattern in patterns:
            if pattern in seen and seen[pattern] != key:
                out.append(
                    f"feature.fs: pattern {pattern!r} is in both {seen[pattern]} and "
                    f"{key}; which one applies is unspecified"
                )
            seen.setdefault(pattern, key)
    if cfg.feature.env.include is not None and cfg.feature.env.include == []:
        out.append("feature.env.include is empty: no remote variable is used")
    return out
