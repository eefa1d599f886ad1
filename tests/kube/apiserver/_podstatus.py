"""Pod objects as the in-process API server's controllers write them: defaults, conditions,
container statuses, node and pod addresses, and which containers are agents."""

from __future__ import annotations

import os

from tests.kube.apiserver._store import Obj, now_rfc3339


def is_agent(c: Obj) -> bool:
    """Containers this kubelet can run: the agent image's programs."""
    cmd = list(c.get("command") or [])
    if not cmd:
        return False
    if os.path.basename(cmd[0]) == "mirrord-agent":
        return True
    return (
        cmd[0] == "python3" and len(cmd) >= 3 and cmd[1] == "-m" and cmd[2].startswith("mirrord.")
    )


def condition(type_: str, status: str) -> Obj:
    return {
        "type": type_,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": now_rfc3339(),
    }


def waiting_status(c: Obj, reason: str, message: str | None) -> Obj:
    waiting: Obj = {"reason": reason}
    if message is not None:
        waiting["message"] = message
    return {
        "name": c["name"],
        "image": c.get("image", ""),
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": {"waiting": waiting},
    }


def running_status(c: Obj, container_id: str) -> Obj:
    return {
        "name": c["name"],
        "image": c.get("image", ""),
        "imageID": f"{c.get('image', '')}@sha256:{'0' * 64}",
        "containerID": f"containerd://{container_id}",
        "ready": True,
        "restartCount": 0,
        "started": True,
        "state": {"running": {"startedAt": now_rfc3339()}},
    }


def node_ip(node: str) -> str:
    digits = "".join(ch for ch in node if ch.isdigit()) or "1"
    return f"10.213.200.{int(digits) % 250 + 1}"


_pod_counter = [0]


def pod_ip(_pod: Obj) -> str:
    _pod_counter[0] += 1
    return f"10.213.250.{_pod_counter[0] % 250 + 1}"


def node_labels(node: str) -> dict[str, str]:
    return {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux"}


def split_api_version(api_version: str) -> tuple[str, str]:
    if "/" in api_version:
        g, v = api_version.split("/", 1)
        return g, v
    return "", api_version


def plural_of(obj: Obj) -> str:
    from tests.kube.apiserver._store import resource_by_kind

    return resource_by_kind(obj["kind"]).plural


def pod_defaults(pod: Obj) -> Obj:
    """The defaults the API server fills into a pod spec on create."""
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    spec.setdefault("tolerations", [])
    spec["tolerations"] = [
        *spec["tolerations"],
        {
            "key": "node.kubernetes.io/not-ready",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 300,
        },
    ]
    for c in [*spec.get("containers", []), *spec.get("initContainers", [])]:
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        image = c.get("image", "")
        c.setdefault(
            "imagePullPolicy",
            "Always"
            if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]
            else "IfNotPresent",
        )
    pod.setdefault("status", {"phase": "Pending", "qosClass": "BestEffort"})
    return pod
