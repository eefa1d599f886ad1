"""The daemon's Kubernetes helper process (`mirrord.kube._helper`): the daemon never loads
kubernetes_asyncio or aiohttp; the helper starts agents, carries their port-forward streams,
says why a stream ended, releases its agents when the daemon goes, and is let go when idle.
Against the in-process API server, whose kubelet runs the agent as a real local process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import cbor2
import pytest

from mirrord.daemon import AgentStartError
from mirrord.kube._helper_client import KubeHelperBackend
from mirrord.kube._helper_wire import MAX_MESSAGE, HelperProtocolError, MessageDecoder, encode
from mirrord.localpod import LocalPod, PodSpec
from tests._agent_client import AgentClient
from tests.cli.conftest import Mirrord, has_mapped, pid_alive, processes_mentioning, python_app
from tests.kube._cluster import add_deployment, agent_job_pod, backend_config
from tests.kube.apiserver import FakeApiServer

HELPER = "mirrord.kube._helper"


async def _until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------- the wire


def test_messages_are_framed_and_split_anywhere() -> None:
    data = encode({"id": 1, "op": "start"}) + encode({"id": 2, "progress": "x" * 1000})
    for cut in (1, 3, 4, 5, len(data) // 2, len(data) - 1):
        decoder = MessageDecoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == [{"id": 1, "op": "start"}, {"id": 2, "progress": "x" * 1000}]


@pytest.mark.parametrize(
    "data",
    [
        (MAX_MESSAGE + 1).to_bytes(4, "big"),
        len(cbor2.dumps([1, 2])).to_bytes(4, "big") + cbor2.dumps([1, 2]),
        b"\x00\x00\x00\x02\xff\xff",
        len(cbor2.dumps({"id": 1}) + b"x").to_bytes(4, "big") + cbor2.dumps({"id": 1}) + b"x",
    ],
    ids=["oversized", "not-a-map", "not-cbor", "bytes-after-the-map"],
)
def test_a_malformed_message_is_an_error(data: bytes) -> None:
    with pytest.raises(HelperProtocolError):
        MessageDecoder().feed(data)


# ------------------------------------------------------- the backend, in-process


@pytest.mark.asyncio
@pytest.mark.netns
async def test_helper_starts_connects_reports_a_deleted_pod_and_is_let_go_when_idle(
    apiserver: FakeApiServer, kubeconfig: Path, make_pod: Callable[..., LocalPod]
) -> None:
    add_deployment(apiserver, "web", pods=[make_pod(PodSpec(name="web", env={"A": "from-pod"}))])
    backend = KubeHelperBackend(idle_exit=0.5)
    config = backend_config(kubeconfig, startup_timeout=30)
    progress: list[str] = []
    try:
        handle = await backend.start_agent("deployment/web", config, progress.append)
        helper = backend.helper_pid
        assert helper is not None and pid_alive(helper)
        assert "starting the Kubernetes helper" in progress
        assert any("using pod web-" in p for p in progress), progress  # the helper's own steps
        assert handle.key.startswith("kube:") and handle.alive()
        # The daemon's end of the stream is a unix socket the helper passed over.
        async with AgentClient.over(await handle.connect(), handle.secret) as client:
            await client.open_channel(1)
            assert (await client.env(1))["A"] == "from-pod"
            ns, pod = agent_job_pod(apiserver)
            assert apiserver.portforwards_open[(ns, pod)] == 1
            await apiserver.delete("Pod", ns, pod)
            with anyio.fail_after(10):
                await client.ended.wait()
        with anyio.fail_after(10):
            reason = await handle.end_reason()
        assert reason is not None and f"agent pod {ns}/{pod}" in reason, reason
        assert not handle.alive()
        with pytest.raises(AgentStartError, match=f"agent pod {ns}/{pod}") as raised:
            await handle.connect()
        assert raised.value.code == "agent_pod_failed"
        await handle.stop()
        await _until(lambda: not apiserver.list("Job", "default"), 10, "the Job deleted")
        # No agent held: the helper is let go after idle_exit, and exits.
        await _until(lambda: not pid_alive(helper), 10, "the idle helper exited")
        assert backend.helper_pid is None
        # The next cluster session starts a new one.
        again = await backend.start_agent("deployment/web", config, print)
        assert backend.helper_pid not in (None, helper)
        await again.stop()
    finally:
        await backend.aclose()
    await _until(lambda: not apiserver.list("Job", "default"), 10, "the Job deleted")


@pytest.mark.asyncio
@pytest.mark.netns
async def test_a_helper_that_dies_fails_its_handles_and_the_next_start_gets_a_new_one(
    apiserver: FakeApiServer, kubeconfig: Path, make_pod: Callable[..., LocalPod]
) -> None:
    add_deployment(apiserver, "web", pods=[make_pod(PodSpec(name="web", env={"B": "b"}))])
    backend = KubeHelperBackend()
    config = backend_config(kubeconfig, startup_timeout=30)
    try:
        handle = await backend.start_agent("deployment/web", config, print)
        helper = backend.helper_pid
        assert helper is not None
        os.kill(helper, signal.SIGKILL)
        await _until(lambda: not handle.alive(), 10, "the handle knows its helper died")
        with pytest.raises(AgentStartError, match="Kubernetes helper process") as raised:
            await handle.connect()
        assert "killed by signal 9" in str(raised.value) and "mirrord daemon logs" in str(
            raised.value
        )
        await handle.stop()  # never raises for an agent already gone
        # The agent Job of the killed helper is left to the agent's idle timeout; a new
        # session gets a new helper and reaches its agent.
        again = await backend.start_agent("deployment/web", config, print)
        assert backend.helper_pid not in (None, helper)
        async with AgentClient.over(await again.connect(), again.secret) as client:
            await client.open_channel(1)
            assert (await client.env(1))["B"] == "b"
        await again.stop()
    finally:
        await backend.aclose()


@pytest.mark.asyncio
@pytest.mark.netns
async def test_a_start_the_session_gave_up_on_is_released_by_the_helper(
    apiserver: FakeApiServer, kubeconfig: Path, make_pod: Callable[..., LocalPod]
) -> None:
    add_deployment(apiserver, "web", pods=[make_pod(PodSpec(name="web"))])
    backend = KubeHelperBackend(idle_exit=300)  # not let go during the test
    config = backend_config(kubeconfig, startup_timeout=30)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(backend.start_agent, "deployment/web", config, print)
            await _until(lambda: apiserver.list("Job", "default"), 20, "the agent Job created")
            tg.cancel_scope.cancel()  # the session gave up (its user pressed Ctrl-C)
        # The helper's answer comes to nobody: the daemon has it stop that agent.
        await _until(lambda: not apiserver.list("Job", "default"), 30, "the orphan Job deleted")
        assert backend.helper_pid is not None and pid_alive(backend.helper_pid)
    finally:
        await backend.aclose()


# ------------------------------------------------------- through the CLI and the daemon

KUBE_APP = """
import os
print("env", os.environ.get("POD_VAR"), flush=True)
"""


@pytest.mark.asyncio
@pytest.mark.netns
async def test_the_daemon_loads_no_kubernetes_client_and_its_helper_releases_agents_when_it_dies(
    cluster: FakeApiServer, mirrord_cli: Mirrord, tmp_path: Path
) -> None:
    app = python_app(tmp_path, KUBE_APP)
    result = await asyncio.to_thread(
        mirrord_cli.run, "run", "--target", "deployment/web", "--", *app
    )
    assert "env from-the-pod" in result.stdout.splitlines(), result.stderr
    daemon = mirrord_cli.daemon_pid()
    assert daemon is not None
    (helper,) = processes_mentioning(HELPER, parent=daemon)
    status = await asyncio.to_thread(mirrord_cli.status)
    assert status["helpers"] == [{"backend": "kube", "pid": helper}]
    text = await asyncio.to_thread(mirrord_cli.run, "daemon", "status")
    assert f"kube helper pid {helper}" in text.stdout, text.stdout
    # The Kubernetes client (aiohttp's C extensions) is in the helper, never in the daemon.
    assert has_mapped(helper, "aiohttp")
    assert not has_mapped(daemon, "aiohttp") and not has_mapped(daemon, "multidict")
    # Both run on uvloop (mirrord._loop), a dependency.
    assert has_mapped(helper, "uvloop") and has_mapped(daemon, "uvloop")
    assert status["daemon"]["event_loop"] == "uvloop"
    assert cluster.list("Job", "default")  # the agent lingers for the next session
    # The daemon is killed: its helper releases the agent (deletes its Job) and exits.
    os.kill(daemon, signal.SIGKILL)
    await _until(lambda: not cluster.list("Job", "default"), 30, "the Job deleted")
    await _until(lambda: not pid_alive(helper), 30, "the helper exited")


def test_the_helper_refuses_to_run_without_its_socket() -> None:
    out = subprocess.run(
        [sys.executable, "-m", HELPER], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 2 and "--fd" in out.stderr
