"""The Kubernetes objects the backend creates for an agent: a Job or an ephemeral container.

Owns: the agent image default (tied to the package version), the agent's command line (docs/agent.md),
capabilities (NET_ADMIN, SYS_ADMIN, SYS_PTRACE, NET_RAW minus `agent.disabled_capabilities`),
and the Job / ephemeral container specs built from the `agent` config section. Pure functions:
the specs are validated against the Kubernetes schemas in the tests. Does not own any API call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mirrord._version import __version__

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = [
    "AGENT_CAPABILITIES",
    "AGENT_CONTAINER",
    "AGENT_LABEL",
    "DEFAULT_AGENT_IMAGE",
    "PLACEMENTS",
    "AgentOptions",
    "agent_args",
    "agent_fingerprint",
    "ephemeral_container_spec",
    "job_spec",
    "placement_of",
    "unique_agent_name",
]

DEFAULT_AGENT_IMAGE_REPOSITORY = "ghcr.io/mirrord-python/mirrord-agent"
DEFAULT_AGENT_IMAGE = f"{DEFAULT_AGENT_IMAGE_REPOSITORY}:{__version__}"
AGENT_CAPABILITIES = ("NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "NET_RAW")
AGENT_CONTAINER = "mirrord-agent"
AGENT_LABEL = "app.kubernetes.io/name"  # = "mirrord-agent" on every agent Job and pod
SECRET_ENV = "MIRRORD_AGENT_SECRET"
DEFAULT_IDLE_TIMEOUT = 60
PLACEMENTS = ("job", "ephemeral", "daemonset")

Json = dict[str, Any]


@dataclass
class AgentOptions:
    """What the `agent` config section says about the agent's pod."""

    image: str = DEFAULT_AGENT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[dict[str, str]] = field(default_factory=list)
    ttl: int = 1
    privileged: bool = False
    disabled_capabilities: list[str] = field(default_factory=list)
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT
    log_level: str = "info"
    tolerations: list[Json] | None = None
    resources: Json | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    service_account: str | None = None
    priority_class: str | None = None
    namespace: str | None = None
    nftables: bool | None = None
    clean_iptables_on_start: bool = False

    @classmethod
    def from_config(cls, config: MirrordConfig) -> AgentOptions:
        agent = config.agent
        resources: Json | None = None
        if agent.resources is not None:
            dumped = agent.resources.model_dump(mode="json", exclude_none=True)
            resources = {k: v for k, v in dumped.items() if v} or None
        return cls(
            image=agent.image or DEFAULT_AGENT_IMAGE,
            image_pull_policy=agent.image_pull_policy,
            image_pull_secrets=list(agent.image_pull_secrets),
            ttl=agent.ttl,
            privileged=agent.privileged,
            disabled_capabilities=list(agent.disabled_capabilities),
            idle_timeout=agent.communication_timeout or DEFAULT_IDLE_TIMEOUT,
            log_level=agent.log_level,
            tolerations=agent.tolerations,
            resources=resources,
            labels=dict(agent.labels),
            annotations=dict(agent.annotations),
            node_selector=dict(agent.node_selector),
            service_account=agent.service_account,
            priority_class=agent.priority_class,
            namespace=agent.namespace,
            nftables=agent.nftables,
            clean_iptables_on_start=agent.clean_iptables_on_start,
        )

    @property
    def capabilities(self) -> list[str]:
        return [c for c in AGENT_CAPABILITIES if c not in set(self.disabled_capabilities)]


def unique_agent_name() -> str:
    # DNS-1123 label, short enough for a Job name (the pod adds "-xxxxx"): 63 - 6.
    return f"mirrord-agent-{secrets.token_hex(5)}"


_LOG_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
}


def agent_args(target: str, port: int, idle_timeout: int, log_level: str = "info") -> list[str]:
    """The agent's arguments (docs/agent.md); the secret comes from the environment, never argv."""
    return [
        "--target",
        target,
        "--listen",
        # The port-forward dials localhost in the pod's network namespace: nothing else
        # (other pods, the node) needs to reach the agent, so it listens on loopback only.
        f"tcp:127.0.0.1:{port}",
        "--idle-timeout",
        str(idle_timeout),
        "--log-level",
        _LOG_LEVELS.get(log_level.lower(), "info"),
    ]


def _env(secret: str, opts: AgentOptions) -> list[Json]:
    """The agent's environment: its secret and the `agent` settings it reads from there."""
    env: list[Json] = [{"name": SECRET_ENV, "value": secret}]
    if opts.nftables is not None:
        env.append({"name": "MIRRORD_AGENT_NFTABLES", "value": str(opts.nftables).lower()})
    if opts.clean_iptables_on_start:
        env.append({"name": "MIRRORD_AGENT_CLEAN_IPTABLES_ON_START", "value": "true"})
    return env


def _security_context(opts: AgentOptions) -> Json:
    if opts.privileged:
        return {"privileged": True, "runAsUser": 0}
    return {
        "runAsUser": 0,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "capabilities": {"add": opts.capabilities, "drop": ["ALL"]},
    }


def _container(name: str, target: str, port: int, secret: str, opts: AgentOptions) -> Json:
    c: Json = {
        "name": name,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["mirrord-agent"],
        "args": agent_args(target, port, opts.idle_timeout, opts.log_level),
        "env": _env(secret, opts),
        "securityContext": _security_context(opts),
    }
    if opts.resources:
        c["resources"] = opts.resources
    return c


def _labels(opts: AgentOptions, name: str) -> dict[str, str]:
    return {
        **opts.labels,
        AGENT_LABEL: "mirrord-agent",
        "app.kubernetes.io/instance": name,
        # Mesh sidecars would intercept the agent's own port-forwarded connection.
        "sidecar.istio.io/inject": "false",
        "linkerd.io/inject": "disabled",
    }


def job_spec(
    *,
    name: str,
    namespace: str,
    target: str,
    node: str | None,
    port: int,
    secret: str,
    opts: AgentOptions,
    host_pid: bool = True,
) -> Json:
    """A Job running one agent pod on `node` (the target's node), with `hostPID` so the agent
    finds the target's process by cgroup scan and enters its namespaces through /proc."""
    labels = _labels(opts, name)
    annotations = {**opts.annotations, "sidecar.istio.io/inject": "false"}
    pod_spec: Json = {
        "restartPolicy": "Never",
        "hostPID": host_pid,
        "terminationGracePeriodSeconds": 5,
        "containers": [_container(AGENT_CONTAINER, target, port, secret, opts)],
        "tolerations": opts.tolerations
        if opts.tolerations is not None
        else [{"operator": "Exists"}],
    }
    if node:
        pod_spec["nodeName"] = node
    elif opts.node_selector:
        pod_spec["nodeSelector"] = opts.node_selector
    if opts.image_pull_secrets:
        pod_spec["imagePullSecrets"] = opts.image_pull_secrets
    if opts.service_account:
        pod_spec["serviceAccountName"] = opts.service_account
    if opts.priority_class:
        pod_spec["priorityClassName"] = opts.priority_class
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "ttlSecondsAfterFinished": opts.ttl,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def ephemeral_container_spec(
    *, name: str, target: str, target_container: str, port: int, secret: str, opts: AgentOptions
) -> Json:
    """An ephemeral container for the target pod; it shares the pod's network namespace and,
    with `targetContainerName`, the target container's PID namespace."""
    c = _container(name, target, port, secret, opts)
    c["targetContainerName"] = target_container
    c.pop("resources", None)  # ephemeral containers may not set resources
    return c


def placement_of(config: MirrordConfig) -> str:
    """`agent.placement` when the config has it, else `ephemeral` if `agent.ephemeral`, else
    `job` (the config's model allows only the `PLACEMENTS`)."""
    if config.agent.placement is not None:
        return config.agent.placement
    return "ephemeral" if config.agent.ephemeral else "job"


def agent_fingerprint(config: MirrordConfig) -> str:
    """What a lingering agent must have been started with to serve a session with `config`:
    cluster (kubeconfig, context), target namespace, placement, and every agent setting
    (image, agent namespace, capabilities, resources, labels, log level, ...). Equal
    fingerprints may share an agent; any difference starts a new one."""
    parts = {
        "kubeconfig": config.kubeconfig,
        "context": config.kube_context,
        "namespace": config.target.namespace,
        "placement": placement_of(config),
        "agent": dataclasses.asdict(AgentOptions.from_config(config)),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
