"""The RBAC check before a session starts: one SelfSubjectAccessReview per permission needed.

Owns: the list of permissions a placement needs, and the Helm chart value (helm/mirrord) that
grants each one, so the error can say what to ask for. Does not own creating anything.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as k8s

from mirrord.kube._api import ApiCallError, call
from mirrord.kube._exceptions import KubeError, PermissionMissing

__all__ = [
    "Permission",
    "check_permissions",
    "denied_permissions",
    "needed_permissions",
    "portforward_permissions",
]


@dataclass(frozen=True)
class Permission:
    verb: str
    resource: str
    namespace: str
    group: str = ""
    subresource: str = ""
    chart_value: str = "rbac.create"

    def __str__(self) -> str:
        res = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        if self.group:
            res = f"{res}.{self.group}"
        return f"{self.verb} {res} in namespace {self.namespace}"


_TARGET_READS = {
    "deployment": ("apps", "deployments"),
    "statefulset": ("apps", "statefulsets"),
    "replicaset": ("apps", "replicasets"),
    "job": ("batch", "jobs"),
    "cronjob": ("batch", "cronjobs"),
    "service": ("", "services"),
}


def needed_permissions(
    *, placement: str, target_kind: str, target_ns: str, agent_ns: str
) -> list[Permission]:
    """What a session with this placement and target kind needs."""
    perms = [Permission("get", "pods", target_ns), Permission("list", "pods", target_ns)]
    if target_kind in _TARGET_READS:
        group, resource = _TARGET_READS[target_kind]
        perms.append(Permission("get", resource, target_ns, group))
    if target_kind == "rollout":
        perms.append(
            Permission("get", "rollouts", target_ns, "argoproj.io", "", "rbac.argoRollouts")
        )
    if placement == "job":
        perms += [
            Permission("create", "jobs", agent_ns, "batch", "", "rbac.jobAgent"),
            Permission("delete", "jobs", agent_ns, "batch", "", "rbac.jobAgent"),
            Permission("watch", "pods", agent_ns),
            Permission("get", "pods", agent_ns, "", "log"),
        ]
        pf_ns = agent_ns
    elif placement == "ephemeral":
        perms += [
            Permission(
                "patch", "pods", target_ns, "", "ephemeralcontainers", "rbac.ephemeralAgent"
            ),
            Permission("watch", "pods", target_ns),
            Permission("get", "pods", target_ns, "", "log"),
        ]
        pf_ns = target_ns
    else:  # daemonset: the node agent lives in the chart's namespace
        perms += [Permission("list", "pods", agent_ns)]
        pf_ns = agent_ns
    perms += portforward_permissions(pf_ns)
    # De-duplicate, keeping order.
    return list(dict.fromkeys(perms))


def portforward_permissions(namespace: str) -> list[Permission]:
    """The websocket upgrade of a port-forward is a GET, authorised as `get` on
    pods/portforward; since Kubernetes 1.35 the API server also asks for `create`."""
    return [
        Permission(verb, "pods", namespace, "", "portforward", "rbac.portForward")
        for verb in ("get", "create")
    ]


async def denied_permissions(api: Any, perms: list[Permission]) -> list[Permission]:
    """The permissions of `perms` the user lacks (one SelfSubjectAccessReview each)."""
    results = await asyncio.gather(*(_allowed(api, p) for p in perms))
    return [p for p, ok in zip(perms, results, strict=True) if not ok]


async def _allowed(api: Any, perm: Permission) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "namespace": perm.namespace,
                "verb": perm.verb,
                "group": perm.group,
                "resource": perm.resource,
                "subresource": perm.subresource,
            }
        },
    }
    auth = k8s.AuthorizationV1Api(api)
    try:
        out = await call(auth.create_self_subject_access_review, review)
    except ApiCallError as exc:
        raise KubeError(
            f"cannot check permissions (SelfSubjectAccessReview answered {exc.status} "
            f"{exc.reason}: {exc.message}); check that the kubeconfig's credentials are valid"
        ) from None
    return bool((out.get("status") or {}).get("allowed"))


async def check_permissions(api: Any, perms: list[Permission]) -> None:
    """Raise `PermissionMissing` naming every permission the user lacks."""
    missing = await denied_permissions(api, perms)
    if missing:
        raise PermissionMissing([(str(p), p.chart_value) for p in missing])
