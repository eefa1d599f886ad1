"""Why a port-forward ended reaches whoever meets the end first: the reader that sees the
websocket close, or a writer whose send fails while the owner is still asking the API server
whether the pod is gone (the Kubernetes helper's splice, an app that keeps sending)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import UNIXSocketStream

from mirrord.kube import load_context, open_port_forward
from mirrord.kube._node import _splice
from mirrord.localpod import LocalPod, PodSpec
from tests.kube._cluster import add_deployment, wait_running
from tests.kube.apiserver import FakeApiServer

pytestmark = pytest.mark.asyncio

REASON = "the agent pod default/pf was deleted"


async def test_a_write_failing_while_the_end_is_checked_still_learns_why(
    apiserver: FakeApiServer, kubeconfig: Path, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(PodSpec(name="pf"))
    names = add_deployment(apiserver, "pf", pods=[pod])
    await wait_running(apiserver, "default", names)
    kube = await load_context(kubeconfig=str(kubeconfig))
    checks: list[float] = []

    async def on_end() -> str | None:
        checks.append(time.monotonic())
        await anyio.sleep(1.0)  # an API server slow to say that the pod is gone
        return REASON

    remote = await open_port_forward(kube.configuration, "default", names[0], 7777, on_end=on_end)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    local = await UNIXSocketStream.from_socket(mine)
    result: list[str | None] = []
    try:
        async with anyio.create_task_group() as tg:

            async def splice() -> None:
                result.append(await _splice(local, remote))

            tg.start_soon(splice)
            theirs.sendall(b"ping")
            with anyio.fail_after(10):
                assert await anyio.to_thread.run_sync(theirs.recv, 4) == b"ping"
            await anyio.to_thread.run_sync(pod.close)  # the pod's end of the connection goes
            # the app keeps sending while the end is checked: its write fails at once
            theirs.setblocking(False)
            with anyio.fail_after(20):
                for _ in range(400):
                    if result:
                        break
                    try:
                        theirs.send(b"more")
                    except OSError:
                        pass
                    await anyio.sleep(0.05)
    finally:
        theirs.close()
        await local.aclose()
        await remote.aclose()
    assert result == [REASON]
    assert len(checks) == 1  # asked once, for the reader and the writer
