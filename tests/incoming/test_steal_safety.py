"""The steal machinery cannot be turned against the pod or outlive its owners: a connection
made straight to the agent's steal listener is refused (never relayed back to itself), and the
rules go when the guard, the agent or the daemon connection goes, with each backend."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from mirrord.agent._incoming_netns import NetnsRunner
from mirrord.localpod import LocalPod
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentConn, AgentError
from tests._agent_process import AgentProc, start_agent, stop_agent
from tests.cli.conftest import processes_mentioning, temp_mirrord
from tests.incoming.conftest import serve_channel, subscribe, unsubscribe
from tests.incoming.test_end_to_end import get, start_app, stop_app
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
            seen: list[AgentConn] = []
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


# ---------------------------------------------------------------- no rule outlives its owners


def _children(pid: int) -> list[int]:
    """Living (not zombie) children of `pid`, from every thread."""
    kids: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return [k for k in kids if _state(k) not in ("Z", "")]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def _is_guard(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mirrord.agent._steal_guard" in f.read()
    except FileNotFoundError:
        return False


def _guard_and_sentinel(agent_pid: int) -> tuple[int, int]:
    (guard,) = [p for p in _children(agent_pid) if _is_guard(p)]
    (sentinel,) = [p for p in _children(guard) if _is_guard(p)]
    return guard, sentinel


def _gone(pid: int) -> bool:
    return _state(pid) in ("", "Z")


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `predicate`; the seconds it took. Fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout:g} s"
        time.sleep(0.05)
    return time.monotonic() - start


async def _steal_and_check(client: AgentClient, pod: LocalPod, port: int) -> None:
    await subscribe(client, 1, 8080, "steal")
    status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/x"))
    assert (status, body.split()[0]) == (200, b"local")
    assert ours(pod) != []


def _rules_without_counters(pod: LocalPod) -> list[str]:
    return sorted(re.sub(r"packets \d+ bytes \d+", "", line) for line in ours(pod))


def _killed(pid: int) -> None:
    """Kill a guard or sentinel left by a failed test (only if that pid is still one)."""
    if _is_guard(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class _Stealing:
    """An agent stealing port 8080 of the pod for channel 1 (relayed to the user app), its
    guard and the guard's sentinel; `watched` lists the guard processes killed at the end."""

    agent: AgentProc
    client: AgentClient
    guard: int
    sentinel: int
    watched: list[int]

    def kill_agent(self, *first: int) -> float:
        """SIGKILL the processes `first`, then the agent (at once); when it was killed, once
        it is reaped."""
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        os.kill(self.agent.pid, signal.SIGKILL)
        killed = time.monotonic()
        self.agent.proc.wait(timeout=10)
        return killed


@asynccontextmanager
async def _stealing(
    pod: LocalPod,
    local_app: Callable[[str], int],
    backend: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[_Stealing]:
    agent = start_agent(
        f"pid/{pod.pid}", env={"MIRRORD_AGENT_STEAL_BACKEND": backend, **(env or {})}
    )
    watched: list[int] = []
    try:
        app_port = local_app("local")
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            await client.open_channel(1)
            await tg.start(serve_channel, client, 1, app_port, [])
            await _steal_and_check(client, pod, app_port)
            guard, sentinel = _guard_and_sentinel(agent.pid)
            watched += [guard, sentinel]
            yield _Stealing(agent, client, guard, sentinel, watched)
            tg.cancel_scope.cancel()
    finally:
        stop_agent(agent)
        for pid in watched:
            _killed(pid)


STEAL_BACKENDS = ["iptables-nft", "nft"]


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
async def test_a_killed_guard_is_replaced_and_the_steal_goes_on(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    async with _stealing(pod, local_app, backend) as st:
        before = _rules_without_counters(pod)
        os.kill(st.guard, signal.SIGKILL)
        await in_thread(
            _wait,
            lambda: any(p != st.guard for p in _children(st.agent.pid) if _is_guard(p)),
            10,
            "a new guard",
        )
        await in_thread(
            _wait, lambda: "the steal guard was restarted" in st.agent.log(), 10, "restart"
        )
        new_guard, new_sentinel = _guard_and_sentinel(st.agent.pid)
        st.watched += [new_guard, new_sentinel]
        # The rules were taken over as they were (nothing doubled), the steal works, and
        # the first sentinel left once its guard had a successor.
        assert _rules_without_counters(pod) == before
        status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/y"))
        assert (status, body.split()[0]) == (200, b"local")
        await in_thread(_wait, lambda: _gone(st.sentinel), 10, "the old sentinel's exit")
        st.kill_agent()
        took = await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
        assert took < 2.0, took
        await in_thread(_wait, lambda: _gone(new_guard) and _gone(new_sentinel), 10, "exit")
        assert "Traceback" not in st.agent.log()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_guard_then_agent_killed_leave_no_rule(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    async with _stealing(pod, local_app, backend) as st:
        killed = st.kill_agent(st.guard)  # both at once: no time to replace the guard
        await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
        assert time.monotonic() - killed < 2.0 + 0.5
        await in_thread(_wait, lambda: _gone(st.sentinel), 10, "the sentinel's exit")


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
async def test_agent_killed_leaves_no_rule_and_no_guard(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    async with _stealing(pod, local_app, backend) as st:
        killed = st.kill_agent()
        await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
        assert time.monotonic() - killed < 2.0 + 0.5
        await in_thread(_wait, lambda: _gone(st.guard) and _gone(st.sentinel), 10, "their exit")


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
async def test_a_stopped_guard_is_replaced_when_a_change_waits_for_it(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    async with _stealing(pod, local_app, backend) as st:
        os.kill(st.guard, signal.SIGSTOP)
        # The steal ends while its guard is stopped: that change fails (ETIMEDOUT) or
        # succeeds, but within seconds the rules are gone all the same.
        with contextlib.suppress(AgentError):
            await unsubscribe(st.client, 1, 8080)
        await in_thread(_wait, lambda: ours(pod) == [], 15, "the rules' removal")
        assert _gone(st.guard)
        assert "is stopped" in st.agent.log()
        status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/z"))
        assert status == 200 and not body.startswith(b"local")
    assert "Traceback" not in st.agent.log()


_DAEMON_SCRIPT = """
import sys, anyio
from tests._agent_client import AgentClient
from tests.incoming.conftest import subscribe

async def main() -> None:
    async with AgentClient.open_unix(sys.argv[1], sys.argv[2]) as client:
        await client.open_channel(1)
        await subscribe(client, 1, 8080, "steal")
        print("stealing", flush=True)
        await anyio.sleep_forever()

anyio.run(main, backend="trio")
"""


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
def test_a_killed_daemon_leaves_no_rule(pod: LocalPod, backend: str) -> None:
    agent = start_agent(f"pid/{pod.pid}", env={"MIRRORD_AGENT_STEAL_BACKEND": backend})
    daemon = subprocess.Popen(
        [sys.executable, "-c", _DAEMON_SCRIPT, agent.socket, agent.secret],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline().strip() == "stealing"
        assert ours(pod) != []
        daemon.kill()
        daemon.wait(timeout=10)
        took = _wait(lambda: ours(pod) == [], 10, "the rules' removal")
        assert took < 2.0, took
        assert agent.proc.poll() is None  # the agent lives on for other daemons
        assert "Traceback" not in agent.log()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        if daemon.stdout is not None:
            daemon.stdout.close()
        stop_agent(agent)
    assert ours(pod) == []


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
async def test_a_guard_that_cannot_be_replaced_ends_the_steal_loudly(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    restarts = {"MIRRORD_AGENT_STEAL_GUARD_RESTARTS": "0"}
    async with _stealing(pod, local_app, backend, restarts) as st:
        await st.client.open_channel(2)  # not stealing: stays
        os.kill(st.guard, signal.SIGKILL)
        killed = time.monotonic()
        await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
        assert time.monotonic() - killed < 2.0 + 0.5
        with anyio.fail_after(10):
            while not st.client.fatals:
                await anyio.sleep(0.05)
        ((channel, fatal),) = st.client.fatals
        assert (channel, fatal.code) == (1, "steal_lost")
        assert "steal guard died" in fatal.message
        assert "steal guard" in st.agent.log()
        # The pod's app answers again; the other channel and the agent go on.
        status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/z"))
        assert status == 200 and not body.startswith(b"local")
        reply = await st.client.request(2, lambda r: m.HostnameRequest(request_id=r))
        assert isinstance(reply, m.HostnameReply)
    assert "Traceback" not in st.agent.log()
    assert ours(pod) == []


# ---------------------------------------------------------------- the whole stack


@pytest.mark.slow
@pytest.mark.parametrize("victims", ["app", "run", "daemon", "agent", "guard", "guard+agent"])
def test_mirrord_run_steal_leaves_no_rule_whatever_is_killed(pod: LocalPod, victims: str) -> None:
    with temp_mirrord("mrds") as mirrord:
        app = start_app(mirrord, pod, "--steal")
        assert isinstance(app, subprocess.Popen)
        assert get(pod, "GET", "/before")[0] == b"local GET /before x-user=\n"
        (user_app,) = processes_mentioning(b"_local_app.py", parent=app.pid)
        daemon = mirrord.daemon_pid()
        (agent,) = processes_mentioning(b"mirrord.agent\0--target\0pid/%d\0" % pod.pid)
        (guard,) = processes_mentioning(b"mirrord.agent._steal_guard", parent=agent)
        (sentinel,) = processes_mentioning(b"mirrord.agent._steal_guard", parent=guard)
        choices: dict[str, list[int | None]] = {
            "app": [user_app],
            "run": [app.pid],
            "daemon": [daemon],
            "agent": [agent],
            "guard": [guard],
            "guard+agent": [guard, agent],
        }
        pids = choices[victims]
        try:
            for pid in pids:
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            if victims == "guard":
                # Replaced: the steal goes on, then ends with the session as always.
                _wait(lambda: _gone(sentinel), 10, "the first sentinel's exit")
                assert get(pod, "GET", "/after")[0] == b"local GET /after x-user=\n"
                assert ours(pod) != []
                stop_app(app)
                killed = time.monotonic()
            took = _wait(lambda: ours(pod) == [], 10, "the rules' removal")
            assert took < 2.0, (victims, time.monotonic() - killed)
            # The pod's app answers again.
            _wait(lambda: get(pod, "GET", "/later")[0] == b"pod GET /later\n", 10, "the pod")
        finally:
            for pid in (user_app, guard, sentinel):
                _killed(pid)
