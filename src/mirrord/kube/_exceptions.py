"""Errors of the Kubernetes backend, each saying what to check.

All are `AgentStartError`s (the daemon's type for "the agent could not be started or
reached"), so the daemon reports them to the session unchanged.
"""

from __future__ import annotations

from mirrord.daemon import AgentStartError

__all__ = [
    "AgentPodFailed",
    "KubeConfigError",
    "KubeError",
    "PermissionMissing",
    "PortForwardError",
    "TargetNotFound",
]


class KubeError(AgentStartError):
    """Base of the Kubernetes backend's errors (the user's cluster or setup)."""

    code = "kube_error"


class KubeConfigError(KubeError):
    """No usable kubeconfig / context: check `kubeconfig`, `kube_context`, `$KUBECONFIG`."""

    code = "kubeconfig"


class TargetNotFound(KubeError):
    """The target resource, or a running pod for it, does not exist."""

    code = "target_not_found"


class PermissionMissing(KubeError):
    """The user lacks an RBAC permission a session needs; the message names it and the Helm
    chart value that grants it."""

    code = "permission_missing"

    def __init__(self, missing: list[tuple[str, str]], *, note: str = "") -> None:
        # (permission text, chart value); `note`: when it showed (not in the check before)
        self.missing = missing
        lines = "; ".join(f"{perm} (Helm chart value {value})" for perm, value in missing)
        when = f" ({note})" if note else ""
        super().__init__(
            f"missing Kubernetes permission{when}: {lines}. Ask a cluster admin to grant it, for "
            "example by installing the mirrord Helm chart (helm/mirrord) with that value set "
            "to true and your user or group in rbac.subjects; see docs/kubernetes.md"
        )


class AgentPodFailed(KubeError):
    """The agent's pod/Job/ephemeral container could not be created or did not start: an image
    pull error, an admission denial, an unschedulable pod, or the agent exited."""

    code = "agent_pod_failed"


class PortForwardError(KubeError):
    """The port-forward to the agent failed or broke."""

    code = "port_forward"
