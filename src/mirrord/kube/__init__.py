"""The Kubernetes backend: cluster targets, agent placement, port-forward, RBAC, `ls`.

Owns: kubeconfig/context selection, resolving targets to a pod and container, creating the
agent (Job on the target's node, ephemeral container, or the node's DaemonSet agent from
helm/mirrord), readiness, the port-forward stream, the RBAC check and target listing. Runs on
asyncio (kubernetes_asyncio). Does not own the agent protocol (the daemon speaks it on the
stream `KubeAgentHandle.connect()` returns), and is never imported by the agent.
"""

# ruff: noqa: E402 (the lazy client goes in before the modules that import kubernetes_asyncio)

from __future__ import annotations

from mirrord.kube._lazy_client import install as _lazy_client

_lazy_client()  # before the first import of kubernetes_asyncio: its models load on use only

from mirrord.kube._api import ApiCallError
from mirrord.kube._backend import PLACEMENTS, KubeAgentHandle, KubeBackend, placement_of
from mirrord.kube._client import KubeContext, kubeconfig_path, load_context
from mirrord.kube._exceptions import (
    AgentPodFailed,
    KubeConfigError,
    KubeError,
    PermissionMissing,
    PortForwardError,
    TargetNotFound,
)
from mirrord.kube._list import list_targets
from mirrord.kube._portforward import PortForwardStream, open_port_forward
from mirrord.kube._rbac import Permission, check_permissions, needed_permissions
from mirrord.kube._specs import (
    AGENT_CAPABILITIES,
    DEFAULT_AGENT_IMAGE,
    AgentOptions,
    ephemeral_container_spec,
    job_spec,
)
from mirrord.kube._targets import (
    MESH_SIDECARS,
    TARGET_KINDS,
    ResolvedTarget,
    choose_container,
    parse_target,
    resolve_target,
)

__all__ = [
    "AGENT_CAPABILITIES",
    "DEFAULT_AGENT_IMAGE",
    "MESH_SIDECARS",
    "PLACEMENTS",
    "TARGET_KINDS",
    "AgentOptions",
    "AgentPodFailed",
    "ApiCallError",
    "KubeAgentHandle",
    "KubeBackend",
    "KubeConfigError",
    "KubeContext",
    "KubeError",
    "Permission",
    "PermissionMissing",
    "PortForwardError",
    "PortForwardStream",
    "ResolvedTarget",
    "TargetNotFound",
    "check_permissions",
    "choose_container",
    "ephemeral_container_spec",
    "job_spec",
    "kubeconfig_path",
    "list_targets",
    "load_context",
    "needed_permissions",
    "open_port_forward",
    "parse_target",
    "placement_of",
    "resolve_target",
]
