"""Listing targets for `mirrord ls` (and IDEs): mirrord's `ls` shape.

Owns: which targets exist in a namespace, in mirrord's order (deployments, rollouts,
statefulsets, cronjobs, jobs, pods; pods as `pod/NAME/container/C` for every container that is
not a known mesh sidecar), with the namespace list; `kinds` limits the listing to those kinds
(mirrord's `MIRRORD_LS_TARGET_TYPES`), and kinds not asked for are not queried at all. Only
running pods and workloads with at least one ready replica are listed, so an IDE offers
targets that can be used; mirrord's own agent Jobs and pods (and the chart's node agents) are
not targets and are left out. A kind the user may not list (403) or that is not installed
(404, e.g. Argo Rollouts) is skipped, not an error; but an API server that answers 404 to
every list (a wrong server URL, a proxy without the API) is a `KubeError`, never an empty
list. Does not own printing (the CLI does).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from kubernetes_asyncio import client as k8s

from mirrord.kube._api import ApiCallError, Json, call
from mirrord.kube._client import load_context
from mirrord.kube._exceptions import KubeError
from mirrord.kube._specs import AGENT_LABEL
from mirrord.kube._targets import MESH_SIDECARS

__all__ = ["list_targets"]


class _Lists:
    """The list calls of one listing, and how many the API server answered 404."""

    def __init__(self) -> None:
        self.calls = 0
        self.not_found = 0

    async def items(self, method: Any, *args: Any) -> list[Json]:
        self.calls += 1
        try:
            out = await call(method, *args)
        except ApiCallError as exc:
            if exc.status == 404:
                self.not_found += 1
                return []
            if exc.status == 403:
                return []
            raise
        return list(out.get("items") or [])


def _ours(obj: Json) -> bool:
    """An agent Job or pod of mirrord's (ours, or the chart's node agent): never a target."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(AGENT_LABEL) == "mirrord-agent" or (
        labels.get("app.kubernetes.io/component") == "node-agent"
        and labels.get("app.kubernetes.io/name") == "mirrord"
    )


def _names(items: list[Json], kind: str, *, ready_field: str | None = "readyReplicas") -> list[str]:
    out = []
    for obj in items:
        if _ours(obj):
            continue
        if ready_field is not None and not (obj.get("status") or {}).get(ready_field):
            continue
        out.append(f"{kind}/{obj['metadata']['name']}")
    return sorted(out)


async def list_targets(
    *,
    namespace: str | None = None,
    kubeconfig: str | None = None,
    context: str | None = None,
    kinds: Collection[str] | None = None,
) -> dict[str, Any]:
    """`{"targets": [{"path", "available"}], "current_namespace", "namespaces"}`; only the
    target kinds in `kinds` (`deployment`, `rollout`, `statefulset`, `cronjob`, `job`, `pod`)
    when given."""
    kube = await load_context(kubeconfig=kubeconfig, context=context, namespace=namespace)
    ns = kube.namespace

    def wanted(kind: str) -> bool:
        return kinds is None or kind in kinds

    async with k8s.ApiClient(kube.configuration) as api:
        core = k8s.CoreV1Api(api)
        apps = k8s.AppsV1Api(api)
        batch = k8s.BatchV1Api(api)
        custom = k8s.CustomObjectsApi(api)
        lists = _Lists()
        _items = lists.items
        paths: list[str] = []
        if wanted("deployment"):
            paths += _names(await _items(apps.list_namespaced_deployment, ns), "deployment")
        if wanted("rollout"):
            paths += _names(
                await _items(
                    custom.list_namespaced_custom_object, "argoproj.io", "v1alpha1", ns, "rollouts"
                ),
                "rollout",
            )
        if wanted("statefulset"):
            paths += _names(await _items(apps.list_namespaced_stateful_set, ns), "statefulset")
        if wanted("cronjob"):
            paths += _names(
                await _items(batch.list_namespaced_cron_job, ns), "cronjob", ready_field=None
            )
        if wanted("job"):
            paths += _names(
                await _items(batch.list_namespaced_job, ns), "job", ready_field="active"
            )
        pods = []
        for pod in await _items(core.list_namespaced_pod, ns) if wanted("pod") else []:
            if (pod.get("status") or {}).get("phase") != "Running":
                continue
            if pod["metadata"].get("deletionTimestamp") or _ours(pod):
                continue
            for c in pod["spec"]["containers"]:
                if c["name"] not in MESH_SIDECARS:
                    pods.append(f"pod/{pod['metadata']['name']}/container/{c['name']}")
        paths += sorted(pods)
        namespaces = sorted(o["metadata"]["name"] for o in await _items(core.list_namespace))
    if lists.not_found == lists.calls:
        raise KubeError(
            f"the API server at {kube.configuration.host} answered 404 Not Found to every list "
            "(pods, namespaces, deployments, ...): it is not a Kubernetes API server, or a "
            "proxy in front of it lacks the API; check the kubeconfig's server URL"
        )
    return {
        "targets": [{"path": p, "available": True} for p in paths],
        "current_namespace": ns,
        "namespaces": namespaces,
    }
