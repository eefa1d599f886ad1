"""Issue 8's acceptance, end to end: `mirrord run --target deployment/web` and `mirrord ls`
against the in-process API server. The CLI, daemon, agent (a Job pod run by the fake kubelet),
layer and target pod (a namespace pod) are all real; only the API server is ours.

The API server runs on this test's event loop, so every `mirrord` command runs in a worker
thread (a blocking call here would stop the server it talks to).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import time
from pathlib import Path

import pytest

from tests.cli.conftest import Mirrord, python_app
from tests.kube._cluster import agent_job_pod
from tests.kube.apiserver import FakeApiServer

pytestmark = [pytest.mark.asyncio, pytest.mark.netns]

STEAL_APP = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8080))
server.listen(8)
server.settimeout(30)
print("listening", flush=True)
conn, peer = server.accept()
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += conn.recv(65536)
print("got", data.split(b"\\r\\n", 1)[0].decode(), flush=True)
body = b"stolen by the app on the laptop"
conn.sendall(b"HTTP/1.1 200 OK\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
conn.close()
"""

APP = """
import os, socket, sys, urllib.request
print("env", os.environ.get("POD_VAR"), flush=True)
print("file", open("/app/test.txt").read().strip(), flush=True)
print("dns", socket.getaddrinfo("pod-only-service", 80, proto=socket.IPPROTO_TCP)[0][4][0], flush=True)
body = urllib.request.urlopen("http://127.0.0.1:8080/from-app", timeout=10).read().decode()
print("http", body.splitlines()[0], flush=True)
"""


async def test_run_against_deployment_two_sessions_one_agent_one_port_forward(
    cluster: FakeApiServer, mirrord_cli: Mirrord, tmp_path: Path
) -> None:
    app = python_app(tmp_path, APP)
    first, second = await asyncio.gather(
        asyncio.to_thread(mirrord_cli.run, "run", "--target", "deployment/web", "--", *app),
        asyncio.to_thread(mirrord_cli.run, "run", "--target", "deployment/web", "--", *app),
    )
    for result in (first, second):
        lines = result.stdout.splitlines()
        assert "env from-the-pod" in lines, result.stderr
        assert "file pod-only file" in lines, result.stderr
        assert "dns 10.213.250.7" in lines, result.stderr
        assert any(ln.startswith("http ") and "GET /from-app" in ln for ln in lines), result.stderr
        assert result.returncode == 0, result.stderr
    # Both sessions used one agent pod (one Job) and ONE port-forward websocket.
    key = agent_job_pod(cluster)
    assert cluster.portforwards_opened[key] == 1, cluster.portforwards_opened
    # A third session while the agent lingers reuses the same stream too.
    third = await asyncio.to_thread(
        mirrord_cli.run,
        "run",
        "--target",
        "deployment/web",
        "--",
        sys.executable,
        "-c",
        "import os; print(os.environ['POD_VAR'])",
    )
    assert third.stdout.strip() == "from-the-pod", third.stderr
    assert cluster.portforwards_opened[key] == 1
    assert len(cluster.list("Job", "default")) == 1
    # `mirrord daemon stop` deletes the Job it created (and the Job's pod goes with it).
    stop = await asyncio.to_thread(mirrord_cli.run, "daemon", "stop")
    assert stop.returncode == 0, stop.stderr
    for _ in range(100):
        if not cluster.list("Job", "default") and cluster.get("Pod", *key) is None:
            break
        await asyncio.sleep(0.05)
    assert not cluster.list("Job", "default")
    assert cluster.get("Pod", *key) is None


async def test_run_against_deployment_steals_a_request_sent_to_the_pod(
    cluster: FakeApiServer, mirrord_cli: Mirrord, tmp_path: Path
) -> None:
    pod_ip = next(
        p["status"]["podIP"]
        for p in cluster.list("Pod", "default")
        if "web" in p["metadata"]["name"]
    )
    proc = await asyncio.to_thread(
        mirrord_cli.popen,
        "run",
        "--steal",
        "--target",
        "deployment/web",
        "--",
        *python_app(tmp_path, STEAL_APP, "steal.py"),
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line.strip() == "listening", await asyncio.to_thread(proc.stderr.read)

    def get() -> tuple[int, bytes]:
        # The subscription is made when the app calls listen(); retry until the rule is in.
        for _ in range(50):
            conn = http.client.HTTPConnection(pod_ip, 8080, timeout=10)
            try:
                conn.request("GET", "/checkout")
                resp = conn.getresponse()
                body = resp.read()
                if body == b"stolen by the app on the laptop":
                    return resp.status, body
            finally:
                conn.close()
            time.sleep(0.1)
        return 0, b""

    status, body = await asyncio.to_thread(get)
    out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert (status, body) == (200, b"stolen by the app on the laptop"), (out, err)
    assert "got GET /checkout HTTP/1.1" in out


async def test_missing_portforward_permission_is_a_clear_error(
    cluster: FakeApiServer, mirrord_cli: Mirrord
) -> None:
    cluster.rbac.deny("create", "pods/portforward")
    result = await asyncio.to_thread(
        mirrord_cli.run, "run", "--target", "deployment/web", "--", "true"
    )
    assert result.returncode != 0
    assert "create pods/portforward" in result.stderr and "rbac.portForward" in result.stderr
    assert not cluster.list("Job", "default")


async def test_agent_pod_deleted_mid_session_is_reported_without_hanging(
    cluster: FakeApiServer, mirrord_cli: Mirrord, tmp_path: Path
) -> None:
    loop_app = python_app(
        tmp_path,
        """
import sys, time
print("ready", flush=True)
for _ in range(300):
    try:
        open("/app/test.txt").read()
    except OSError as exc:
        print("lost", exc.errno, flush=True)
        sys.exit(5)
    time.sleep(0.1)
sys.exit(0)
""",
        name="loop.py",
    )
    proc = await asyncio.to_thread(
        mirrord_cli.popen, "run", "--target", "deployment/web", "--", *loop_app
    )
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line.strip() == "ready", await asyncio.to_thread(proc.stderr.read)  # type: ignore[union-attr]
    ns, pod = agent_job_pod(cluster)
    await cluster.delete("Pod", ns, pod)
    out, err = await asyncio.to_thread(proc.communicate, timeout=20)
    assert "lost" in out, (out, err)
    assert proc.returncode == 5
    assert f"the agent pod {ns}/{pod}" in err, err


async def test_ls_lists_targets_in_mirrords_shapes(
    cluster: FakeApiServer, mirrord_cli: Mirrord
) -> None:
    result = await asyncio.to_thread(mirrord_cli.run, "ls", "--json")
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    assert "deployment/web" in paths
    assert any(p.startswith("pod/web-") and p.endswith("/container/app") for p in paths)
    assert paths.index("deployment/web") < paths.index(
        next(p for p in paths if p.startswith("pod/"))
    )
    result = await asyncio.to_thread(mirrord_cli.run, "ls", "--rich", "-n", "default")
    rich = json.loads(result.stdout)
    assert rich["current_namespace"] == "default"
    assert {"default", "kube-system", "mirrord"} <= set(rich["namespaces"])
    assert {"path": "deployment/web", "available": True} in rich["targets"]
    result = await asyncio.to_thread(mirrord_cli.run, "ls", "-n", "kube-system", "--json")
    assert json.loads(result.stdout) == []


async def test_a_lingering_agent_is_reused_only_with_the_same_agent_settings(
    cluster: FakeApiServer, mirrord_cli: Mirrord
) -> None:
    show = ["--", sys.executable, "-c", "import os; print(os.environ['POD_VAR'])"]

    async def run(*options: str) -> None:
        result = await asyncio.to_thread(
            mirrord_cli.run, "run", "-t", "deployment/web", *options, *show
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "from-the-pod"

    def jobs(namespace: str = "default") -> list[str]:
        return sorted(j["metadata"]["name"] for j in cluster.list("Job", namespace))

    await run()
    [first] = jobs()
    await run("-l", "debug")  # another agent log level: not the lingering agent
    assert len(jobs()) == 2 and first in jobs()
    await run("-a", "mirrord")  # another agent namespace
    assert len(jobs("mirrord")) == 1
    await run()  # the first one's settings again: it is reused
    assert len(jobs()) == 2 and len(jobs("mirrord")) == 1
