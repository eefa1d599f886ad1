"""Target resolution: a target string to one running pod, one container, its ID and its node.

Owns: parsing `pod/NAME[/container/C]`, `deployment/NAME`, `statefulset/NAME`,
`replicaset/NAME`, `job/NAME`, `cronjob/NAME` (its newest job), `service/NAME` (pods by its
selector), `rollout/NAME` (Argo Rollouts CRD) and `targetless`, each optionally followed by
`/container/C`; choosing a running pod (and saying which) and a container (explicit, then the
`kubectl.kubernetes.io/default-container` annotation, else the first that is not a known
service-mesh sidecar). Does not own creating the agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as k8s

from mirrord.config import TARGET_KINDS  # the kinds a target path may name, defined once
from mirrord.kube._api import ApiCallError, Json, call
from mirrord.kube._exceptions import KubeError, TargetNotFound

__all__ = [
    "MESH_SIDECARS",
    "TARGET_KINDS",
    "ResolvedTarget",
    "choose_container",
    "label_selector_string",
    "parse_target",
    "resolve_target",
]


# Containers injected by service meshes and secret agents: never the app a user means.
MESH_SIDECARS = frozenset(
    {
        "istio-proxy",
        "istio-init",
        "istio-validation",
        "linkerd-proxy",
        "linkerd-init",
        "linkerd-network-validator",
        "vault-agent",
        "vault-agent-init",
        "consul-dataplane",
        "consul-connect-inject-init",
        "envoy-sidecar",
        "kuma-sidecar",
        "kuma-init",
        "daprd",
        "aws-appmesh-envoy",
        "gke-service-proxy",
        "cloud-sql-proxy",
    }
)
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"


@dataclass(frozen=True)
class ResolvedTarget:
    """Where the agent must go. For targetless, only `namespace` is set."""

    path: str
    namespace: str
    pod: str | None = None
    pod_uid: str | None = None
    container: str | None = None
    container_id: str | None = None
    node: str | None = None
    pod_ip: str | None = None
    note: str = ""  # which pod of a multi-pod target was picked, for the user

    @property
    def targetless(self) -> bool:
        return self.pod is None


def parse_target(path: str) -> tuple[str, str | None, str | None]:
    """`(kind, name, container)`; raises `KubeError` for a malformed string."""
    if path in ("", "targetless"):
        return "targetless", None, None
    parts = path.split("/")
    if parts[0] not in TARGET_KINDS or len(parts) not in (2, 4) or not parts[1]:
        raise KubeError(
            f"target {path!r} is not a Kubernetes target: use KIND/NAME[/container/C] with KIND "
            f"one of {', '.join(TARGET_KINDS)}, or targetless"
        )
    if len(parts) == 4 and (parts[2] != "container" or not parts[3]):
        raise KubeError(f"target {path!r}: the optional suffix is /container/NAME")
    return parts[0], parts[1], parts[3] if len(parts) == 4 else None


def label_selector_string(selector: Json | None) -> str:
    """A `LabelSelector` object (`matchLabels` / `matchExpressions`) as a query string."""
    if not selector:
        return ""
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def choose_container(pod: Json, explicit: str | None) -> str:
    """Explicit, then the default-container annotation, else the first non-sidecar."""
    names = [c["name"] for c in pod["spec"]["containers"]]
    pod_name = pod["metadata"]["name"]
    if explicit:
        if explicit not in names:
            raise TargetNotFound(
                f"pod {pod_name} has no container {explicit!r} (containers: {', '.join(names)})"
            )
        return explicit
    annotated = (pod["metadata"].get("annotations") or {}).get(DEFAULT_CONTAINER_ANNOTATION)
    if annotated in names:
        return str(annotated)
    for name in names:
        if name not in MESH_SIDECARS:
            return str(name)
    return str(names[0])


def _container_id(pod: Json, container: str) -> str | None:
    for st in (pod.get("status") or {}).get("containerStatuses") or []:
        if st.get("name") == container and st.get("containerID"):
            # "containerd://abc", "cri-o://abc", "docker://abc": the agent wants the bare ID
            return str(st["containerID"]).split("://", 1)[-1]
    return None


def _running(pod: Json) -> bool:
    meta = pod["metadata"]
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and not meta.get("deletionTimestamp")


def _ready(pod: Json) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _pod_target(path: str, ns: str, pod: Json, container: str | None, note: str) -> ResolvedTarget:
    name = pod["metadata"]["name"]
    if not _running(pod):
        phase = (pod.get("status") or {}).get("phase", "Unknown")
        raise TargetNotFound(
            f"pod {ns}/{name} is not running (phase {phase}): a target must be a running pod"
        )
    chosen = choose_container(pod, container)
    cid = _container_id(pod, chosen)
    if cid is None:
        raise TargetNotFound(
            f"container {chosen!r} of pod {ns}/{name} has no container ID yet (not started?)"
        )
    return ResolvedTarget(
        path=path,
        namespace=ns,
        pod=name,
        pod_uid=pod["metadata"]["uid"],
        container=chosen,
        container_id=cid,
        node=pod["spec"].get("nodeName"),
        pod_ip=(pod.get("status") or {}).get("podIP"),
        note=note,
    )


async def _get(method: Any, *args: Any, what: str, ns: str) -> Json:
    try:
        return await call(method, *args)
    except ApiCallError as exc:
        if exc.status == 404:
            raise TargetNotFound(
                f"{what} not found in namespace {ns}: check the target name and namespace "
                "(`mirrord ls -n NAMESPACE` lists targets)"
            ) from None
        raise KubeError(f"cannot read {what} in namespace {ns}: {exc.message}") from None


async def _pods_by_selector(api: Any, ns: str, selector: str, what: str) -> list[Json]:
    if not selector:
        raise TargetNotFound(f"{what} has no pod selector: it selects no pods to target")
    core = k8s.CoreV1Api(api)
    pods = await call(core.list_namespaced_pod, ns, label_selector=selector)
    return list(pods.get("items") or [])


def _pick(path: str, ns: str, pods: list[Json], container: str | None, what: str) -> ResolvedTarget:
    running = [p for p in pods if _running(p)]
    running.sort(key=lambda p: (not _ready(p), p["metadata"]["name"]))
    if not running:
        raise TargetNotFound(
            f"{what} in namespace {ns} has no running pod ({len(pods)} pod(s) found): start it "
            "or pick another target"
        )
    pod = running[0]
    note = f"{what}: using pod {pod['metadata']['name']}"
    if len(running) > 1:
        note += f" (1 of {len(running)} running)"
    return _pod_target(path, ns, pod, container, note)


async def resolve_target(api: Any, path: str, namespace: str) -> ResolvedTarget:
    """Resolve `path` in `namespace` with the `ApiClient` `api`; raises `TargetNotFound`."""
    kind, name, container = parse_target(path)
    ns = namespace
    if kind == "targetless":
        return ResolvedTarget(path="targetless", namespace=ns, note="targetless")
    assert name is not None
    what = f"{kind}/{name}"
    core = k8s.CoreV1Api(api)
    apps = k8s.AppsV1Api(api)
    batch = k8s.BatchV1Api(api)
    if kind == "pod":
        pod = await _get(core.read_namespaced_pod, name, ns, what=what, ns=ns)
        return _pod_target(path, ns, pod, container, f"pod/{name}")
    if kind in ("deployment", "statefulset", "replicaset"):
        method = {
            "deployment": apps.read_namespaced_deployment,
            "statefulset": apps.read_namespaced_stateful_set,
            "replicaset": apps.read_namespaced_replica_set,
        }[kind]
        obj = await _get(method, name, ns, what=what, ns=ns)
        selector = label_selector_string((obj.get("spec") or {}).get("selector"))
        pods = await _pods_by_selector(api, ns, selector, what)
        return _pick(path, ns, pods, container, what)
    if kind == "job":
        obj = await _get(batch.read_namespaced_job, name, ns, what=what, ns=ns)
        selector = label_selector_string((obj.get("spec") or {}).get("selector"))
        pods = await _pods_by_selector(api, ns, selector, what)
        return _pick(path, ns, pods, container, what)
    if kind == "cronjob":
        cron = await _get(batch.read_namespaced_cron_job, name, ns, what=what, ns=ns)
        uid = cron["metadata"]["uid"]
        jobs = await call(batch.list_namespaced_job, ns)
        owned = [
            j
            for j in jobs.get("items") or []
            if any(r.get("uid") == uid for r in j["metadata"].get("ownerReferences") or [])
        ]
        if not owned:
            raise TargetNotFound(
                f"{what} in namespace {ns} has no job yet: wait for its schedule (or create one "
                f"with `kubectl create job --from=cronjob/{name}`)"
            )
        newest = max(owned, key=lambda j: j["metadata"].get("creationTimestamp") or "")
        selector = label_selector_string((newest.get("spec") or {}).get("selector"))
        pods = await _pods_by_selector(api, ns, selector, f"job/{newest['metadata']['name']}")
        return _pick(path, ns, pods, container, f"{what} (job {newest['metadata']['name']})")
    if kind == "service":
        svc = await _get(core.read_namespaced_service, name, ns, what=what, ns=ns)
        sel = (svc.get("spec") or {}).get("selector") or {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(sel.items()))
        pods = await _pods_by_selector(api, ns, selector, what)
        return _pick(path, ns, pods, container, what)
    if kind == "rollout":
        custom = k8s.CustomObjectsApi(api)
        ro = await _get(
            custom.get_namespaced_custom_object,
            "argoproj.io",
            "v1alpha1",
            ns,
            "rollouts",
            name,
            what=what,
            ns=ns,
        )
        spec = ro.get("spec") or {}
        selector_obj = spec.get("selector")
        ref = spec.get("workloadRef")
        if not selector_obj and ref and ref.get("kind") == "Deployment":
            dep = await _get(
                apps.read_namespaced_deployment,
                ref["name"],
                ns,
                what=f"deployment/{ref['name']} (workloadRef of {what})",
                ns=ns,
            )
            selector_obj = (dep.get("spec") or {}).get("selector")
        pods = await _pods_by_selector(api, ns, label_selector_string(selector_obj), what)
        return _pick(path, ns, pods, container, what)
    raise KubeError(f"target kind {kind!r} is not supported")  # pragma: no cover
