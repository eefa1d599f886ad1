"""A real agent started by the Kubernetes backend, reached through a real port-forward: the
in-process API server's kubelet runs the agent Job / ephemeral container as a local
`mirrord-agent` process, and the target is a namespace pod whose container ID the agent finds
by cgroup scan."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from mirrord.config import MirrordConfig
from mirrord.kube import AgentPodFailed, KubeBackend
from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentConn
from tests.cli.conftest import has_mapped, processes_mentioning
from tests.kube._cluster import add_deployment, backend_config
from tests.kube.apiserver import FakeApiServer

pytestmark = [pytest.mark.asyncio, pytest.mark.netns]


def _config(kubeconfig: Path, *, target: str | None = None, **agent: Any) -> MirrordConfig:
    return backend_config(kubeconfig, target=target, **{"startup_timeout": 30, **agent})


@pytest.fixture
def web_pod(make_pod: Callable[..., LocalPod]) -> LocalPod:
    return make_pod(PodSpec(name="web", env={"DATABASE_URL": "postgres://db.prod:5432/app"}))


async def test_job_agent_shared_by_two_sessions_over_port_forward(
    apiserver: FakeApiServer, kubeconfig: Path, web_pod: LocalPod
) -> None:
    add_deployment(apiserver, "web", pods=[web_pod])
    backend = KubeBackend()
    progress: list[str] = []
    h1 = await backend.start_agent("deployment/web", _config(kubeconfig), progress.append)
    try:
        jobs = apiserver.list("Job", "default")
        assert len(jobs) == 1
        job = jobs[0]
        pod_spec = job["spec"]["template"]["spec"]
        assert pod_spec["hostPID"] is True and pod_spec["nodeName"] == "node-1"
        assert job["spec"]["ttlSecondsAfterFinished"] == 1
        assert job["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        caps = pod_spec["containers"][0]["securityContext"]["capabilities"]["add"]
        assert sorted(caps) == ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]
        assert any("using pod web-" in p for p in progress)

        # A second session on the same deployment shares the agent: no second Job.
        h2 = await backend.start_agent("deployment/web", _config(kubeconfig), print)
        assert h2.key == h1.key and h2.pod == h1.pod
        assert len(apiserver.list("Job", "default")) == 1

        async with AgentClient.over(await h1.connect(), h1.secret) as client:
            assert "container/" in client.welcome.target
            await client.open_channel(1)
            env = await client.env(1)
            assert env["DATABASE_URL"] == "postgres://db.prod:5432/app"
            ns, pod = h1.pod
            assert apiserver.portforwards_opened[(ns, pod)] == 1
            assert apiserver.portforwards_open[(ns, pod)] == 1

            # The agent pod is deleted mid-session: the stream ends, reconnecting says why.
            await apiserver.delete("Pod", ns, pod)
            with anyio.fail_after(10):
                await client.ended.wait()
            # The handles know at once (the daemon drops a dead agent when its stream ends).
            assert not h1.alive() and not h2.alive()
            with pytest.raises(
                AgentPodFailed, match=f"agent pod {ns}/{pod} (was|is being) deleted"
            ):
                await h1.connect()
        await h2.stop()
        assert apiserver.list("Job", "default")  # h1 still holds it
    finally:
        await h1.stop()
    for _ in range(100):
        if not apiserver.list("Job", "default"):
            break
        await asyncio.sleep(0.05)
    assert not apiserver.list("Job", "default")


async def test_ephemeral_agent_in_target_pod(
    apiserver: FakeApiServer, kubeconfig: Path, web_pod: LocalPod
) -> None:
    names = add_deployment(apiserver, "web", pods=[web_pod])
    handle = await KubeBackend().start_agent(
        "deployment/web", _config(kubeconfig, target="deployment/web", ephemeral=True), print
    )
    try:
        assert handle.pod == ("default", names[0])
        pod = apiserver.get("Pod", "default", names[0])
        assert pod is not None
        (eph,) = pod["spec"]["ephemeralContainers"]
        assert eph["targetContainerName"] == "app"
        async with AgentClient.over(await handle.connect(), handle.secret) as client:
            await client.open_channel(1)
            assert (await client.env(1))["DATABASE_URL"] == "postgres://db.prod:5432/app"
        assert not apiserver.list("Job", "default")
        # A closed stream is re-established by calling connect() again: a new websocket.
        assert handle.alive()
        async with AgentClient.over(await handle.connect(), handle.secret) as client:
            assert client.welcome.target
        assert apiserver.portforwards_opened[handle.pod] == 2
    finally:
        await handle.stop()


async def test_targetless_agent_job(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    handle = await KubeBackend().start_agent("targetless", _config(kubeconfig), print)
    try:
        (job,) = apiserver.list("Job", "default")
        assert job["spec"]["template"]["spec"]["hostPID"] is False
        async with AgentClient.over(await handle.connect(), handle.secret) as client:
            assert client.welcome.target
    finally:
        await handle.stop()


async def test_node_agent_from_helm_chart_daemonset(
    apiserver: FakeApiServer, kubeconfig: Path, web_pod: LocalPod, tmp_path: Path
) -> None:
    helm = pytest.importorskip("helm_python")
    import yaml

    # Another `mirrord-agent` first on the node's PATH (an older install, another checkout):
    # the node agent must start the agent of its own installation, not that one.
    decoy = tmp_path / "bin" / "mirrord-agent"
    decoy.parent.mkdir()
    decoy.write_text("#!/bin/sh\necho 'mirrord-agent: error: the decoy on PATH ran' >&2\nexit 1\n")
    decoy.chmod(0o755)
    apiserver.kubelet.env_extra["PATH"] = f"{decoy.parent}:{os.environ.get('PATH', '')}"

    chart = helm.Chart.load(str(Path(__file__).resolve().parents[2] / "helm" / "mirrord"))
    rendered = chart.render(
        {"agentDaemonSet": {"enabled": True}}, name="mirrord", namespace="mirrord"
    )
    (ds,) = [
        d
        for d in yaml.safe_load_all(rendered["mirrord/templates/agent-daemonset.yaml"])
        if d and d["kind"] == "DaemonSet"
    ]
    apiserver.create("DaemonSet", "mirrord", ds)
    add_deployment(apiserver, "web", pods=[web_pod])
    # Sessions start as soon as the DaemonSet has its pod on the node, before the node agent
    # in it is Ready (the chart just installed): the first one waits for it.
    for _ in range(500):
        if apiserver.list("Pod", "mirrord"):
            break
        await asyncio.sleep(0.02)
    config = backend_config(kubeconfig, placement="daemonset")
    steps: list[str] = []
    h1 = await KubeBackend().start_agent("deployment/web", config, steps.append)
    assert any(s.startswith("using node agent mirrord/") for s in steps), steps
    h2 = await KubeBackend().start_agent("deployment/web", config, print)
    try:
        assert h1.pod[0] == "mirrord" and h1.pod == h2.pod
        assert not apiserver.list("Job", "default")  # no per-session pod
        for handle in (h1, h2):
            async with AgentClient.over(await handle.connect(), handle.secret) as client:
                await client.open_channel(1)
                assert (await client.env(1))["DATABASE_URL"] == "postgres://db.prod:5432/app"
        # The node agent splices every session's bytes: it runs on uvloop, as the daemon does.
        node_agents = processes_mentioning(b"mirrord.kube._node")
        assert node_agents and all(has_mapped(pid, "uvloop") for pid in node_agents)
    finally:
        await h1.stop()
        await h2.stop()
    assert apiserver.list("DaemonSet", "mirrord")  # the chart's DaemonSet is not ours to delete

    # A target whose container has no process on the node: the node agent's error comes back.
    names = add_deployment(apiserver, "ghost")
    for _ in range(200):
        p = apiserver.get("Pod", "default", names[0])
        if p is not None and p["status"].get("phase") == "Running":
            break
        await asyncio.sleep(0.02)
    ghost = await KubeBackend().start_agent("deployment/ghost", config, print)
    try:
        with pytest.raises(AgentPodFailed, match=r"node agent .*container/[0-9a-f]{64}"):
            await ghost.connect()
    finally:
        await ghost.stop()


async def test_stolen_request_through_the_kube_agent(
    apiserver: FakeApiServer, kubeconfig: Path, web_pod: LocalPod
) -> None:
    """Incoming traffic at the agent-protocol level over the port-forward: a client outside the
    pod sends HTTP to the pod's IP; the agent (a Job pod) steals it and hands it to us."""
    import http.client

    add_deployment(apiserver, "web", pods=[web_pod])
    handle = await KubeBackend().start_agent("deployment/web", _config(kubeconfig), print)

    def get() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(web_pod.ip, 8080, timeout=10)
        try:
            conn.request("GET", "/stolen-path")
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    try:
        stream = await handle.connect()
        tx, rx = anyio.create_memory_object_stream[AgentConn](10)
        with tx, rx:
            async with AgentClient.over(stream, handle.secret) as client:
                client.incoming[1] = tx
                await client.open_channel(1)
                reply = await client.request(
                    1, lambda r: m.Subscribe(request_id=r, port=8080, mode="steal")
                )
                assert isinstance(reply, m.Subscribed)
                async with anyio.create_task_group() as inner:
                    result: list[tuple[int, bytes]] = []

                    async def do_get() -> None:
                        result.append(await anyio.to_thread.run_sync(get))

                    inner.start_soon(do_get)
                    with anyio.fail_after(15):
                        conn = await rx.receive()
                        request = b""
                        while b"\r\n\r\n" not in request:
                            request += await conn.receive()
                        assert request.startswith(b"GET /stolen-path HTTP/1.1")
                        body = b"stolen by the session"
                        await conn.send(
                            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                            % (len(body), body)
                        )
                        await conn.shutdown()
                assert result == [(200, b"stolen by the session")]
                assert conn.announce.remote_address == web_pod.host_ip
    finally:
        await handle.stop()


@pytest.mark.parametrize(
    "labels",
    [
        {"batch.kubernetes.io/controller-uid", "batch.kubernetes.io/job-name"},
        {"controller-uid", "job-name"},  # a server before Kubernetes 1.27
    ],
    ids=["new-labels-only", "legacy-labels-only"],
)
async def test_job_pod_found_by_its_job_name_label_from_a_watch_and_listening_on_loopback(
    apiserver: FakeApiServer, kubeconfig: Path, web_pod: LocalPod, labels: set[str]
) -> None:
    add_deployment(apiserver, "web", pods=[web_pod])
    apiserver.kubelet.job_pod_labels = labels
    apiserver.kubelet.job_pod_delay = 2.0  # a slow Job controller: watched, not polled
    handle = await KubeBackend().start_agent("deployment/web", _config(kubeconfig), print)
    try:
        (job,) = apiserver.list("Job", "default")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[args.index("--listen") + 1].startswith("tcp:127.0.0.1:")
        stream = await handle.connect()  # the port-forward dials localhost in the pod
        async with AgentClient.over(stream, handle.secret) as client:
            assert client.welcome.target
        waits = [
            path
            for method, path in apiserver.requests
            if method == "GET" and "/pods?" in path and "job-name" in path
        ]
        assert waits and all("watch=" in p for p in waits), waits
        assert len(waits) <= 4, waits  # one watch per label (not a list every 100 ms)
    finally:
        await handle.stop()
