"""The backend's pure parts: target strings, selectors, permissions per placement, specs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from mirrord.config import MirrordConfig
from mirrord.kube import (
    AgentOptions,
    KubeError,
    job_spec,
    needed_permissions,
    parse_target,
    placement_of,
)
from mirrord.kube._targets import label_selector_string


def test_parse_target() -> None:
    assert parse_target("deployment/web") == ("deployment", "web", None)
    assert parse_target("pod/web-1/container/app") == ("pod", "web-1", "app")
    assert parse_target("targetless") == ("targetless", None, None)
    for bad in ("deployment", "deployment/", "pod/a/b/c", "pod/a/sidecar/b", "node/x"):
        with pytest.raises(KubeError):
            parse_target(bad)


def test_label_selector_string() -> None:
    sel = {
        "matchLabels": {"app": "web", "tier": "front"},
        "matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod", "stage"]},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "zone", "operator": "NotIn", "values": ["a"]},
            {"key": "team", "operator": "Exists"},
        ],
    }
    assert label_selector_string(sel) == (
        "app=web,tier=front,env in (prod,stage),!canary,zone notin (a),team"
    )
    assert label_selector_string(None) == ""


def test_permissions_per_placement() -> None:
    def names(placement: str, kind: str = "deployment") -> set[str]:
        perms = needed_permissions(
            placement=placement, target_kind=kind, target_ns="app", agent_ns="mirrord"
        )
        return {str(p) for p in perms}

    job = names("job")
    assert "create jobs.batch in namespace mirrord" in job
    assert "create pods/portforward in namespace mirrord" in job
    assert "get pods/portforward in namespace mirrord" in job  # the upgrade is a GET
    assert "get deployments.apps in namespace app" in job
    eph = names("ephemeral")
    assert "patch pods/ephemeralcontainers in namespace app" in eph
    assert "create pods/portforward in namespace app" in eph
    assert not any("jobs" in p for p in eph)
    ds = names("daemonset", "rollout")
    assert "get rollouts.argoproj.io in namespace app" in ds
    assert "list pods in namespace mirrord" in ds
    assert not any("jobs" in p or "ephemeral" in p for p in ds)


def test_placement_and_options_from_config() -> None:
    def config(**agent: Any) -> MirrordConfig:
        return MirrordConfig.model_validate({"target": "deployment/web", "agent": agent})

    assert placement_of(config()) == "job"
    assert placement_of(config(ephemeral=True)) == "ephemeral"
    assert placement_of(config(placement="daemonset")) == "daemonset"
    with pytest.raises(ValidationError, match="sidecar"):
        config(placement="sidecar")
    opts = AgentOptions.from_config(
        config(
            disabled_capabilities=["NET_RAW"],
            communication_timeout=7,
            log_level="trace",
            nftables=False,
            clean_iptables_on_start=True,
        )
    )
    job = job_spec(
        name="mirrord-agent-x",
        namespace="ns",
        target="container/abc",
        node=None,
        port=45000,
        secret="s",
        opts=opts,
        host_pid=False,
    )
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["capabilities"]["add"] == [
        "NET_ADMIN",
        "SYS_ADMIN",
        "SYS_PTRACE",
    ]
    assert container["args"][-4:] == ["--idle-timeout", "7", "--log-level", "debug"]
    assert "s" not in container["args"]  # the secret is in the env, never argv
    assert pod["hostPID"] is False and "nodeName" not in pod
    assert pod["tolerations"] == [{"operator": "Exists"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MIRRORD_AGENT_NFTABLES"] == "false"
    assert env["MIRRORD_AGENT_CLEAN_IPTABLES_ON_START"] == "true"
