"""Helpers that put workloads into the in-process API server, as a cluster admin would."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from mirrord.config import MirrordConfig
from mirrord.localpod import LocalPod
from tests.kube.apiserver import FakeApiServer

BOUND = {"test.mirrord/bound": "true"}


def backend_config(kubeconfig: Path, *, target: str | None = None, **agent: Any) -> MirrordConfig:
    """A session's config for `KubeBackend.start_agent`: this cluster, these `agent` keys (an
    ephemeral agent needs the `target` too, as in a session's config)."""
    return MirrordConfig.model_validate(
        {"kubeconfig": str(kubeconfig), "target": target, "agent": agent}
    )


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _containers(names: list[str], image: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "image": image if i == 0 else "docker.io/istio/proxyv2:1.24.0", "ports": []}
        for i, n in enumerate(names)
    ]


def add_deployment(
    server: FakeApiServer,
    name: str,
    *,
    namespace: str = "default",
    pods: list[LocalPod | None] | None = None,
    containers: list[str] | None = None,
    annotations: dict[str, str] | None = None,
    image: str = "registry.example/web:1.0",
    kind: str = "Deployment",
) -> list[str]:
    """A Deployment (or StatefulSet) with its ReplicaSet and one pod per entry of `pods`; a
    LocalPod entry makes that pod's app container the LocalPod's process, None makes a pod with
    no process. Returns the pod names."""
    pods = pods if pods is not None else [None]
    labels = {"app": name}
    template: dict[str, Any] = {
        "metadata": {"labels": labels, "annotations": annotations or {}},
        "spec": {"containers": _containers(containers or ["app"], image)},
    }
    workload = server.create(
        kind,
        namespace,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": len(pods),
                "selector": {"matchLabels": labels},
                "template": template,
            },
            "status": {"replicas": len(pods), "readyReplicas": len(pods)},
        },
    )
    owner = workload
    prefix = name
    if kind == "Deployment":
        h = hashlib.sha256(name.encode()).hexdigest()[:10]
        rs_labels = {**labels, "pod-template-hash": h}
        owner = server.create(
            "ReplicaSet",
            namespace,
            {
                "metadata": {
                    "name": f"{name}-{h}",
                    "labels": rs_labels,
                    "ownerReferences": [_owner(workload)],
                },
                "spec": {
                    "replicas": len(pods),
                    "selector": {"matchLabels": rs_labels},
                    "template": {
                        **template,
                        "metadata": {**template["metadata"], "labels": rs_labels},
                    },
                },
                "status": {"replicas": len(pods), "readyReplicas": len(pods)},
            },
        )
        labels = rs_labels
        prefix = f"{name}-{h}"
    names: list[str] = []
    for i, local in enumerate(pods):
        pod_name = f"{prefix}-{i}" if kind == "StatefulSet" else f"{prefix}-p{i}x{len(names)}"
        server.create(
            "Pod",
            namespace,
            {
                "metadata": {
                    "name": pod_name,
                    "labels": labels,
                    "annotations": {**(annotations or {}), **(BOUND if local else {})},
                    "ownerReferences": [_owner(owner)],
                },
                "spec": {"containers": _containers(containers or ["app"], image)},
            },
        )
        if local is not None:
            server.kubelet.bind_process(namespace, pod_name, local.pid, pod_ip=local.ip)
        names.append(pod_name)
    return names


async def wait_running(server: FakeApiServer, namespace: str, names: list[str]) -> None:
    for _ in range(200):
        pods = [server.get("Pod", namespace, n) for n in names]
        if all(p is not None and p["status"].get("phase") == "Running" for p in pods):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"pods {names} did not become Running")


def agent_job_pod(server: FakeApiServer, namespace: str = "default") -> tuple[str, str]:
    """(namespace, name) of the pod of the one agent Job in `namespace`."""
    (job,) = server.list("Job", namespace)
    (pod,) = [
        p
        for p in server.list("Pod", namespace)
        if p["metadata"].get("labels", {}).get("job-name") == job["metadata"]["name"]
    ]
    return namespace, pod["metadata"]["name"]
