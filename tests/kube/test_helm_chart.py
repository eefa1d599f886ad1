"""The Helm chart (helm/mirrord) and the agent objects the backend builds, validated strictly:
helm-python-sdk (Helm's Go SDK) lints and renders the chart offline, kubernetes-validate checks
every rendered manifest against the Kubernetes schemas with unknown fields rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrord.kube import AgentOptions, ephemeral_container_spec, job_spec

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extra")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[2] / "helm" / "mirrord"
KUBE_VERSION = "1.35.0"

VALUES_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-with-subjects": {
        "rbac": {
            "clusterWide": False,
            "namespaces": ["team-a", "team-b"],
            "subjects": [
                {"kind": "Group", "name": "developers", "apiGroup": "rbac.authorization.k8s.io"},
                {"kind": "ServiceAccount", "name": "ci", "namespace": "ci"},
            ],
            "ephemeralAgent": True,
            "argoRollouts": True,
        },
        "agentDaemonSet": {"enabled": True},
    },
    "daemonset-tuned": {
        "rbac": {
            "jobAgent": False,
            "subjects": [
                {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}
            ],
        },
        "agentDaemonSet": {
            "enabled": True,
            "privileged": True,
            "image": {
                "repository": "registry.example/mirrord-agent",
                "tag": "dev",
                "pullPolicy": "Always",
            },
            "imagePullSecrets": [{"name": "regcred"}],
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
            ],
            "nodeSelector": {"kubernetes.io/os": "linux", "pool": "apps"},
            "resources": {
                "requests": {"cpu": "50m", "memory": "128Mi"},
                "limits": {"cpu": "1", "memory": "1Gi"},
            },
            "priorityClassName": "system-node-critical",
            "podAnnotations": {"example.com/owner": "platform"},
            "podLabels": {"team": "platform"},
            "capabilities": ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"],
        },
    },
}


def _docs(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_chart_lints_strictly() -> None:
    for values in VALUES_SETS.values():
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


@pytest.mark.parametrize("name", sorted(VALUES_SETS))
def test_every_rendered_manifest_validates_strictly(name: str) -> None:
    chart = helm.Chart.load(str(CHART))
    docs = _docs(chart.render(VALUES_SETS[name], name="mirrord", namespace="mirrord"))
    kinds = sorted(d["kind"] for d in docs)
    assert docs
    for doc in docs:
        _validate(doc)
    if name == "defaults":
        assert kinds == ["ClusterRole"]  # no subjects, no DaemonSet
    if name == "namespaced-with-subjects":
        assert kinds.count("Role") == 3 and kinds.count("RoleBinding") == 3
        assert "DaemonSet" in kinds
    if name == "daemonset-tuned":
        (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
        spec = ds["spec"]["template"]["spec"]
        assert spec["hostPID"] is True
        assert spec["containers"][0]["securityContext"]["privileged"] is True
        assert spec["containers"][0]["image"] == "registry.example/mirrord-agent:dev"
        (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
        job_rules = [r for r in role["rules"] if "jobs" in r["resources"]]
        assert all("create" not in r["verbs"] for r in job_rules)


def test_values_schema_rejects_bad_values() -> None:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema({"agentDaemonSet": {"port": 61337}})
    for bad in (
        {"agentDaemonSet": {"port": 70000}},
        {"agentDaemonSet": {"capabilities": ["SYS_MODULE"]}},
        {"rbac": {"clusterWide": "yes"}},
        {"rbac": {"unknownKey": True}},
    ):
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def test_every_value_is_commented() -> None:
    """Every key the chart defines (not the user data under maps such as nodeSelector) has a
    comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    chart_maps = {(), ("rbac",), ("agentDaemonSet",), ("agentDaemonSet", "image")}
    path: list[tuple[int, str]] = []
    checked = 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0]
        while path and path[-1][0] >= indent:
            path.pop()
        parent = tuple(k for _, k in path)
        if parent in chart_maps:
            checked += 1
            assert lines[i - 1].strip().startswith("#"), (
                f"values.yaml line {i + 1}: {'.'.join((*parent, key))} has no comment above it"
            )
        path.append((indent, key))
    assert checked >= 25


def _opts(**kw: Any) -> AgentOptions:
    return AgentOptions(**kw)


@pytest.mark.parametrize(
    "opts",
    [
        _opts(),
        _opts(privileged=True, disabled_capabilities=["SYS_PTRACE"], ttl=30),
        _opts(
            tolerations=[{"key": "x", "operator": "Exists", "effect": "NoSchedule"}],
            resources={"requests": {"cpu": "10m"}, "limits": {"memory": "256Mi"}},
            labels={"team": "a"},
            annotations={"example.com/a": "b"},
            image_pull_secrets=[{"name": "regcred"}],
            service_account="mirrord",
            priority_class="high",
        ),
    ],
)
def test_backend_job_and_ephemeral_container_validate_strictly(opts: AgentOptions) -> None:
    job = job_spec(
        name="mirrord-agent-0123456789",
        namespace="default",
        target="container/" + "a" * 64,
        node="node-1",
        port=45000,
        secret="s3cr3t",
        opts=opts,
    )
    _validate(job)
    caps = job["spec"]["template"]["spec"]["containers"][0]["securityContext"].get("capabilities")
    if caps is not None:
        assert set(caps["add"]).isdisjoint(opts.disabled_capabilities)
    eph = ephemeral_container_spec(
        name="mirrord-agent-0123456789",
        target="container/" + "a" * 64,
        target_container="app",
        port=45000,
        secret="s3cr3t",
        opts=opts,
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default"},
        "spec": {"containers": [{"name": "app", "image": "web:1"}], "ephemeralContainers": [eph]},
    }
    _validate(pod)


def test_versions_tie_image_chart_and_package() -> None:
    from mirrord import __version__
    from mirrord.kube import DEFAULT_AGENT_IMAGE

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert DEFAULT_AGENT_IMAGE.endswith(f":{__version__}")
    assert chart["appVersion"] == __version__ == chart["version"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert DEFAULT_AGENT_IMAGE.startswith(values["agentDaemonSet"]["image"]["repository"] + ":")


def test_agent_dockerfile_copies_what_exists() -> None:
    root = CHART.parents[1]
    text = (root / "docker" / "agent.Dockerfile").read_text()
    sources = []
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not parts[1].startswith("--from"):
            sources += parts[1:-1]
    assert sources
    for src in sources:
        assert (root / src).exists(), f"agent.Dockerfile copies {src}, which does not exist"
    assert 'CMD ["mirrord-agent"' in text
