"""Agent start failures are reported at once, with their reason: missing permissions, an image
that cannot be pulled, an unschedulable pod, admission denials."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mirrord.config import MirrordConfig
from mirrord.kube import (
    AgentPodFailed,
    KubeBackend,
    KubeError,
    PermissionMissing,
    load_context,
    open_port_forward,
)
from tests.kube._cluster import add_deployment, backend_config, wait_running
from tests.kube.apiserver import ApiError, FakeApiServer

pytestmark = pytest.mark.asyncio

BAD_IMAGE = "registry.invalid/mirrord-agent:missing"


def _config(kubeconfig: Path, *, target: str | None = None, **agent: Any) -> MirrordConfig:
    return backend_config(kubeconfig, target=target, **{"startup_timeout": 20, **agent})


async def _web(apiserver: FakeApiServer) -> None:
    names = add_deployment(apiserver, "web")
    await wait_running(apiserver, "default", names)


async def test_missing_portforward_permission_is_named_with_chart_value(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    await _web(apiserver)
    apiserver.rbac.deny("create", "pods/portforward")
    with pytest.raises(PermissionMissing) as info:
        await KubeBackend().start_agent("deployment/web", _config(kubeconfig), print)
    msg = str(info.value)
    assert "create pods/portforward in namespace default" in msg
    assert "rbac.portForward" in msg
    assert not apiserver.list("Job", "default")  # nothing was created


async def test_portforward_needs_get_as_well_as_create(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    """The websocket upgrade is authorised as `get` (and, since 1.35, `create`): a user with
    only `create` is told before anything is created."""
    await _web(apiserver)
    apiserver.rbac.deny("get", "pods/portforward")
    with pytest.raises(PermissionMissing) as info:
        await KubeBackend().start_agent("deployment/web", _config(kubeconfig), print)
    assert "get pods/portforward in namespace default" in str(info.value)
    assert "create pods/portforward" not in str(info.value)
    assert not apiserver.list("Job", "default")


@pytest.mark.parametrize(("refused", "allowed"), [("get", "create"), ("create", "get")])
async def test_a_refused_upgrade_names_the_verb_refused(
    apiserver: FakeApiServer, kubeconfig: Path, refused: str, allowed: str
) -> None:
    kube = await load_context(kubeconfig=str(kubeconfig))
    apiserver.rbac.deny(refused, "pods/portforward")
    with pytest.raises(PermissionMissing) as info:
        await open_port_forward(kube.configuration, "default", "any-pod", 80)
    message = str(info.value)
    assert f"{refused} pods/portforward in namespace default" in message
    assert f"{allowed} pods/portforward" not in message
    assert "refused the port-forward upgrade" in message


async def test_missing_job_permission_for_job_placement(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    await _web(apiserver)
    apiserver.rbac.deny("create", "jobs", "batch")
    with pytest.raises(
        PermissionMissing, match=r"create jobs\.batch in namespace default.*rbac\.jobAgent"
    ):
        await KubeBackend().start_agent("deployment/web", _config(kubeconfig), print)


async def test_image_pull_error_reported_within_two_seconds(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    await _web(apiserver)
    apiserver.kubelet.pull_errors[BAD_IMAGE] = (
        f'rpc error: code = NotFound desc = failed to pull and unpack image "{BAD_IMAGE}": not found'
    )
    progress: list[str] = []
    start = time.monotonic()
    with pytest.raises(AgentPodFailed) as info:
        await KubeBackend().start_agent(
            "deployment/web", _config(kubeconfig, image=BAD_IMAGE), progress.append
        )
    assert time.monotonic() - start < 2.0
    msg = str(info.value)
    assert "ErrImagePull" in msg and BAD_IMAGE in msg and "not found" in msg
    assert any("creating agent job" in p for p in progress)
    # The failed agent's Job is deleted (with its pod), not left behind.
    for _ in range(50):
        if not apiserver.list("Job", "default") and len(apiserver.list("Pod", "default")) == 1:
            break
        await asyncio.sleep(0.05)
    assert not apiserver.list("Job", "default")


async def test_image_pull_error_for_ephemeral_container(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    await _web(apiserver)
    apiserver.kubelet.pull_errors[BAD_IMAGE] = "pull access denied"
    start = time.monotonic()
    with pytest.raises(AgentPodFailed, match=r"ErrImagePull.*pull access denied"):
        await KubeBackend().start_agent(
            "deployment/web",
            _config(kubeconfig, target="deployment/web", image=BAD_IMAGE, ephemeral=True),
            print,
        )
    assert time.monotonic() - start < 2.0


async def test_unschedulable_agent_pod_reported_with_reason(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    # A targetless agent is not pinned to a node: the scheduler places it.
    apiserver.kubelet.unschedulable = (
        "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: "
        "1 No preemption victims found for incoming pod."
    )
    start = time.monotonic()
    with pytest.raises(
        AgentPodFailed, match="cannot be scheduled: 0/1 nodes are available: 1 Insufficient cpu"
    ):
        await KubeBackend().start_agent("targetless", _config(kubeconfig), print)
    assert time.monotonic() - start < 2.0


def _pod_security(res: Any, ns: str | None, obj: dict[str, Any]) -> ApiError | None:
    spec = obj.get("spec") or {}
    if res.plural == "pods" and (spec.get("hostPID") or spec.get("ephemeralContainers")):
        name = (obj.get("metadata") or {}).get("name", "")
        return ApiError(
            403,
            "Forbidden",
            f'pods "{name}" is forbidden: violates PodSecurity "baseline:latest": host '
            'namespaces (hostPID=true), non-default capabilities (container "mirrord-agent" '
            'must not include "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE" in '
            "securityContext.capabilities.add)",
        )
    return None


async def test_admission_denial_of_job_pod_reported_from_event(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    await _web(apiserver)
    apiserver.admission.append(_pod_security)
    start = time.monotonic()
    with pytest.raises(
        AgentPodFailed,
        match=r'cannot create its pod: Error creating: pods .* violates PodSecurity "baseline:latest"',
    ):
        await KubeBackend().start_agent("deployment/web", _config(kubeconfig), print)
    assert time.monotonic() - start < 2.0


async def test_admission_denial_of_ephemeral_container_reported(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    await _web(apiserver)
    apiserver.admission.append(_pod_security)
    with pytest.raises(
        AgentPodFailed,
        match=r"refused the agent's ephemeral container .*403 Forbidden.*PodSecurity",
    ):
        await KubeBackend().start_agent(
            "deployment/web", _config(kubeconfig, target="deployment/web", ephemeral=True), print
        )


async def test_unreachable_api_server_and_refused_reads_are_clear(
    apiserver: FakeApiServer, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    kc = apiserver.write_kubeconfig(tmp_path / "kc-dead")
    kc.write_text(kc.read_text().replace(f":{apiserver.port}", f":{closed_port}"))
    with pytest.raises(KubeError, match="cannot reach the Kubernetes API server"):
        await KubeBackend().start_agent("deployment/web", _config(kc), print)
    live = apiserver.write_kubeconfig(tmp_path / "kc-live")
    await _web(apiserver)
    apiserver.rbac.deny("list", "pods")  # the SSAR says no: named before anything is read
    with pytest.raises(PermissionMissing, match="list pods in namespace default"):
        await KubeBackend().start_agent("deployment/web", _config(live), print)


async def test_an_agent_that_never_becomes_ready_is_described_before_its_job_goes(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    """Its container runs but never says it is ready: the error names the pod and quotes its
    last events and log lines, read before the Job is deleted."""
    await _web(apiserver)
    apiserver.kubelet.agent_argv = [
        sys.executable,
        "-c",
        "import time; print('agent: waiting for the container runtime socket', flush=True);"
        " time.sleep(300)",
    ]
    with pytest.raises(AgentPodFailed) as info:
        await KubeBackend().start_agent(
            "deployment/web", _config(kubeconfig, startup_timeout=8), print
        )
    message = str(info.value)
    assert "did not become ready within 8 s" in message
    assert re.search(r"the agent pod default/mirrord-agent-\S+ \(job mirrord-agent-", message)
    assert "Started: Started container mirrord-agent" in message, message
    assert "waiting for the container runtime socket" in message
    for _ in range(100):  # the failed start deletes its Job
        if not apiserver.list("Job", "default"):
            break
        await asyncio.sleep(0.05)
    assert not apiserver.list("Job", "default")
