"""The Kubernetes backend: cluster targets, agent placement, port-forward, RBAC, `ls`.

Owns: kubeconfig/context selection, resolving targets to a pod and container, creating the
agent (Job on the target's node, ephemeral container, or the node's DaemonSet agent from
helm/mirrord), readiness, the port-forward stream, the RBAC check and target listing. Runs on
asyncio (kubernetes_asyncio). The daemon runs all of it in a helper process
(`KubeHelperBackend`, `_helper.py`): importing this package loads none of its modules, each
name below is imported on first use. Does not own the agent protocol (the daemon speaks it on
the stream an agent handle's `connect()` returns), and is never imported by the agent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mirrord.kube._lazy_client import install as _lazy_client

_lazy_client()  # before the first import of kubernetes_asyncio: its models load on use only

if TYPE_CHECKING:
    from mirrord.kube._api import ApiCallError
    from mirrord.kube._backend import KubeAgentHandle, KubeBackend
    from mirrord.kube._client import KubeContext, kubeconfig_path, load_context
    from mirrord.kube._exceptions import (
        AgentPodFailed,
        KubeConfigError,
        KubeError,
        PermissionMissing,
        PortForwardError,
        TargetNotFound,
    )
    from mirrord.kube._helper_client import KubeHelperBackend
    from mirrord.kube._list import list_targets
    from mirrord.kube._portforward import PortForwardStream, open_port_forward
    from mirrord.kube._rbac import Permission, check_permissions, needed_permissions
    from mirrord.kube._specs import (
        AGENT_CAPABILITIES,
        DEFAULT_AGENT_IMAGE,
        PLACEMENTS,
        AgentOptions,
        ephemeral_container_spec,
        job_spec,
        placement_of,
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
    "KubeHelperBackend",
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

# Where each name lives: importing the package loads none of its modules (the daemon imports
# `mirrord.kube._specs` alone, for agent fingerprints, without kubernetes_asyncio or aiohttp:
# the Kubernetes work runs in its helper process, `mirrord.kube._helper`).
_WHERE = {
    "AGENT_CAPABILITIES": "mirrord.kube._specs",
    "AgentOptions": "mirrord.kube._specs",
    "AgentPodFailed": "mirrord.kube._exceptions",
    "ApiCallError": "mirrord.kube._api",
    "DEFAULT_AGENT_IMAGE": "mirrord.kube._specs",
    "KubeAgentHandle": "mirrord.kube._backend",
    "KubeBackend": "mirrord.kube._backend",
    "KubeConfigError": "mirrord.kube._exceptions",
    "KubeContext": "mirrord.kube._client",
    "KubeError": "mirrord.kube._exceptions",
    "KubeHelperBackend": "mirrord.kube._helper_client",
    "MESH_SIDECARS": "mirrord.kube._targets",
    "PLACEMENTS": "mirrord.kube._specs",
    "Permission": "mirrord.kube._rbac",
    "PermissionMissing": "mirrord.kube._exceptions",
    "PortForwardError": "mirrord.kube._exceptions",
    "PortForwardStream": "mirrord.kube._portforward",
    "ResolvedTarget": "mirrord.kube._targets",
    "TARGET_KINDS": "mirrord.kube._targets",
    "TargetNotFound": "mirrord.kube._exceptions",
    "check_permissions": "mirrord.kube._rbac",
    "choose_container": "mirrord.kube._targets",
    "ephemeral_container_spec": "mirrord.kube._specs",
    "job_spec": "mirrord.kube._specs",
    "kubeconfig_path": "mirrord.kube._client",
    "list_targets": "mirrord.kube._list",
    "load_context": "mirrord.kube._client",
    "needed_permissions": "mirrord.kube._rbac",
    "open_port_forward": "mirrord.kube._portforward",
    "parse_target": "mirrord.kube._targets",
    "placement_of": "mirrord.kube._specs",
    "resolve_target": "mirrord.kube._targets",
}


def __getattr__(name: str) -> Any:  # PEP 562: the module is imported on first use
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
