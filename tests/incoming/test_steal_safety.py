"""The steal machinery cannot be turned against the pod or outlive its owners: a connection
made straight to the agent's steal listener is refused (never relayed back to itself), and the
rules go when the guard, the agent or the daemon connection goes, with each backend."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from mirrord.agent._incoming_netns import NetnsRunner
from mirrord.localpod import LocalPod
from tests.incoming._daemon import AgentClient, Conn, start_agent, stop_agent
from tests.incoming.conftest import serve_channel, subscribe
from tests.incoming.test_incoming_agent import http_request
from tests.incoming.test_steal_rules import ours, ruleset

pytestmark = [pytest.mark.netns, pytest.mark.anyio]

BACKENDS = ["iptables-nft", "iptables-legacy", "nft"]
_TO_PORT = re.compile(r"(?:--to-ports |redirect to :)(\d+)")
_TAG = re.compile(r"(?:MRD_|mirrord_)([0-9a-f]{10})")


def _listener_port(pod: LocalPod) -> int:
    ports = {int(p) for p in _TO_PORT.findall(ruleset(pod))}
    assert len(ports) == 1, ours(pod)
    return ports.pop()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _straight_to(address: tuple[str, int], runner: NetnsRunner | None = None) -> str:
    """Connect to `address` (from the host, or inside the pod through `runner`), send a
    request and say how it ended: "refused", "reset", "closed" or "answered"."""

    def attempt() -> str:
        with socket.socket() as s:
            s.settimeout(10)
            try:
                s.connect(address)
            except ConnectionRefusedError:
                return "refused"
            except ConnectionResetError:  # accepted and reset before connect() returned
                return "reset"
            try:
                s.sendall(b"GET / HTTP/1.1\r\nhost: pod\r\n\r\n")
                data = s.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                return "reset"
            return "answered" if data else "closed"

    return runner.run_sync(attempt) if runner is not None else attempt()


def _without_the_kernel_guard(pod: LocalPod, backend: str) -> None:
    """Empty our listener chain, so that only the agent's own check is left."""
    (tag,) = {t for line in ours(pod) for t in _TAG.findall(line)}
    if backend == "nft":
        argv = ["nft", "flush", "chain", "ip", f"mirrord_{tag}", "listener"]
    else:
        argv = [backend, "-t", "filter", "-F", f"MRD_{tag}_IN"]
    subprocess.run(["ip", "netns", "exec", pod.netns, *argv], check=True, timeout=20)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_connection_straight_to_the_steal_listener_is_refused_not_looped(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    agent = start_agent(f"pid/{pod.pid}", env={"MIRRORD_AGENT_STEAL_BACKEND": backend})
    runner = NetnsRunner(f"/proc/{pod.pid}/ns/net")
    try:
        app_port = local_app("local")
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            await client.open_channel(1)
            seen: list[Conn] = []
            await tg.start(serve_channel, client, 1, app_port, seen)
            # Filtered: an unmatched connection is relayed to its original destination, the
            # path that looped.
            await subscribe(client, 1, 8080, "steal", {"header_filter": "x-user: me"})
            port = await in_thread(_listener_port, pod)
            fds = _fds(agent.pid)
            # The kernel refuses it, from outside the pod and from inside.
            assert await in_thread(_straight_to, (pod.ip, port)) == "refused"
            assert await in_thread(_straight_to, ("127.0.0.1", port), runner) == "refused"
            assert await in_thread(_straight_to, (pod.ip, port), runner) == "refused"
            # Without that rule the agent refuses it itself, at once.
            await in_thread(_without_the_kernel_guard, pod, backend)
            for address, inside in (((pod.ip, port), None), (("127.0.0.1", port), runner)):
                with anyio.fail_after(15):
                    end = await in_thread(_straight_to, address, inside)
                assert end in ("reset", "closed"), (address, end)
            await anyio.sleep(1.0)  # a loop would have grown by thousands of fds by now
            assert _fds(agent.pid) < fds + 16
            assert "made straight to the steal listener" in agent.log()
            # Stolen traffic still works, both ways of the filter.
            status, body = await in_thread(
                lambda: http_request(pod.ip, "GET", "/mine", headers={"x-user": "me"})
            )
            assert (status, body.split()[0]) == (200, b"local")
            status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/other"))
            assert status == 200 and not body.startswith(b"local")
            assert len(seen) == 1
            tg.cancel_scope.cancel()
        assert "Traceback" not in agent.log()
    finally:
        runner.close()
        stop_agent(agent)
    assert ours(pod) == []
