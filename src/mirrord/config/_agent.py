"""The `agent` section: where and how the agent runs next to the target.

Owns: `AgentConfig` (image, placement, capabilities, timeouts, pod settings) and its resource
requirements. Does not own building the agent's pod (`mirrord.kube`) or its command line.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from mirrord.config._values import _OrSingle, _Section, _single_to_list

__all__ = ["AgentConfig", "ResourceList", "ResourceRequirements"]

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
