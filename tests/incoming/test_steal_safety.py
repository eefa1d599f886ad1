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
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from mirrord.agent._incoming_netns import NetnsRunner
from mirrord.localpod import LocalPod
from mirrord.protocol import messages as m
from tests.cli.conftest import temp_mirrord
from tests.incoming._daemon import AgentClient, AgentError, Conn, start_agent, stop_agent
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
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


STEAL_BACKENDS = ["iptables-nft", "nft"]


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
async def test_a_killed_guard_is_replaced_and_the_steal_goes_on(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    agent = start_agent(f"pid/{pod.pid}", env={"MIRRORD_AGENT_STEAL_BACKEND": backend})
    sentinels: list[int] = []
    try:
        app_port = local_app("local")
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            await client.open_channel(1)
            await tg.start(serve_channel, client, 1, app_port, [])
            await _steal_and_check(client, pod, app_port)
            guard, sentinel = _guard_and_sentinel(agent.pid)
            sentinels.append(sentinel)
            before = _rules_without_counters(pod)
            os.kill(guard, signal.SIGKILL)
            await in_thread(
                _wait,
                lambda: any(p != guard for p in _children(agent.pid) if _is_guard(p)),
                10,
                "a new guard",
            )
            await in_thread(
                _wait, lambda: "the steal guard was restarted" in agent.log(), 10, "restart"
            )
            new_guard, new_sentinel = _guard_and_sentinel(agent.pid)
            sentinels.append(new_sentinel)
            # The rules were taken over as they were (nothing doubled), the steal works, and
            # the first sentinel left once its guard had a successor.
            assert _rules_without_counters(pod) == before
            status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/y"))
            assert (status, body.split()[0]) == (200, b"local")
            await in_thread(_wait, lambda: _gone(sentinel), 10, "the old sentinel's exit")
            tg.cancel_scope.cancel()
        os.kill(agent.pid, signal.SIGKILL)
        agent.proc.wait(timeout=10)
        took = await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
        assert took < 2.0, took
        await in_thread(_wait, lambda: _gone(new_guard) and _gone(new_sentinel), 10, "exit")
        assert "Traceback" not in agent.log()
    finally:
        stop_agent(agent)
        for pid in sentinels:
            _killed(pid)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_guard_then_agent_killed_leave_no_rule(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    agent = start_agent(f"pid/{pod.pid}", env={"MIRRORD_AGENT_STEAL_BACKEND": backend})
    sentinel = 0
    try:
        app_port = local_app("local")
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            await client.open_channel(1)
            await tg.start(serve_channel, client, 1, app_port, [])
            await _steal_and_check(client, pod, app_port)
            guard, sentinel = _guard_and_sentinel(agent.pid)
            # Both at once: the agent has no time to replace its guard.
            os.kill(guard, signal.SIGKILL)
            os.kill(agent.pid, signal.SIGKILL)
            killed = time.monotonic()
            agent.proc.wait(timeout=10)
            tg.cancel_scope.cancel()
        await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
        assert time.monotonic() - killed < 2.0 + 0.5  # + the client's teardown above
        await in_thread(_wait, lambda: _gone(sentinel), 10, "the sentinel's exit")
    finally:
        stop_agent(agent)
        if sentinel:
            _killed(sentinel)


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
async def test_agent_killed_leaves_no_rule_and_no_guard(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    agent = start_agent(f"pid/{pod.pid}", env={"MIRRORD_AGENT_STEAL_BACKEND": backend})
    guard = sentinel = 0
    try:
        app_port = local_app("local")
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            await client.open_channel(1)
            await tg.start(serve_channel, client, 1, app_port, [])
            await _steal_and_check(client, pod, app_port)
            guard, sentinel = _guard_and_sentinel(agent.pid)
            os.kill(agent.pid, signal.SIGKILL)
            killed = time.monotonic()
            agent.proc.wait(timeout=10)
            tg.cancel_scope.cancel()
        await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
        assert time.monotonic() - killed < 2.0 + 0.5
        await in_thread(_wait, lambda: _gone(guard) and _gone(sentinel), 10, "their exit")
    finally:
        stop_agent(agent)
        for pid in (guard, sentinel):
            if pid:
                _killed(pid)


@pytest.mark.parametrize("backend", STEAL_BACKENDS)
async def test_a_stopped_guard_is_replaced_when_a_change_waits_for_it(
    pod: LocalPod, local_app: Callable[[str], int], backend: str
) -> None:
    agent = start_agent(f"pid/{pod.pid}", env={"MIRRORD_AGENT_STEAL_BACKEND": backend})
    guard = sentinel = 0
    try:
        app_port = local_app("local")
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            await client.open_channel(1)
            await tg.start(serve_channel, client, 1, app_port, [])
            await _steal_and_check(client, pod, app_port)
            guard, sentinel = _guard_and_sentinel(agent.pid)
            os.kill(guard, signal.SIGSTOP)
            # The steal ends while its guard is stopped: that change fails (ETIMEDOUT) or
            # succeeds, but within seconds the rules are gone all the same.
            with contextlib.suppress(AgentError):
                await unsubscribe(client, 1, 8080)
            await in_thread(_wait, lambda: ours(pod) == [], 15, "the rules' removal")
            assert _gone(guard)
            assert "is stopped" in agent.log()
            status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/z"))
            assert status == 200 and not body.startswith(b"local")
            tg.cancel_scope.cancel()
        assert "Traceback" not in agent.log()
    finally:
        stop_agent(agent)
        for pid in (guard, sentinel):
            if pid:
                _killed(pid)


_DAEMON_SCRIPT = """
import sys, anyio
from tests.incoming._daemon import Agent, AgentClient
from tests.incoming.conftest import subscribe

async def main() -> None:
    agent = Agent(None, sys.argv[1], sys.argv[2], None)
    async with AgentClient.open(agent) as client:
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
    agent = start_agent(
        f"pid/{pod.pid}",
        env={"MIRRORD_AGENT_STEAL_BACKEND": backend, "MIRRORD_AGENT_STEAL_GUARD_RESTARTS": "0"},
    )
    sentinel = 0
    try:
        app_port = local_app("local")
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            await client.open_channel(1)
            await client.open_channel(2)  # not stealing: stays
            await tg.start(serve_channel, client, 1, app_port, [])
            await _steal_and_check(client, pod, app_port)
            guard, sentinel = _guard_and_sentinel(agent.pid)
            os.kill(guard, signal.SIGKILL)
            killed = time.monotonic()
            await in_thread(_wait, lambda: ours(pod) == [], 10, "the rules' removal")
            assert time.monotonic() - killed < 2.0 + 0.5
            with anyio.fail_after(10):
                while not client.fatals:
                    await anyio.sleep(0.05)
            ((channel, fatal),) = client.fatals
            assert (channel, fatal.code) == (1, "steal_lost")
            assert "steal guard died" in fatal.message
            assert "steal guard" in agent.log()
            # The pod's app answers again; the other channel and the agent go on.
            status, body = await in_thread(lambda: http_request(pod.ip, "GET", "/z"))
            assert status == 200 and not body.startswith(b"local")
            reply = await client.request(2, lambda r: m.HostnameRequest(request_id=r))
            assert isinstance(reply, m.HostnameReply)
            tg.cancel_scope.cancel()
        assert "Traceback" not in agent.log()
    finally:
        stop_agent(agent)
        if sentinel:
            _killed(sentinel)
    assert ours(pod) == []


# ---------------------------------------------------------------- the whole stack


def _pids_with(text: bytes, parent: int | None = None) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if text in cmdline and fields[0] != "Z" and (parent is None or int(fields[1]) == parent):
            pids.append(int(entry))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("victims", ["app", "run", "daemon", "agent", "guard", "guard+agent"])
def test_mirrord_run_steal_leaves_no_rule_whatever_is_killed(pod: LocalPod, victims: str) -> None:
    with temp_mirrord("mrds") as mirrord:
        app = start_app(mirrord, pod, "--steal")
        assert isinstance(app, subprocess.Popen)
        assert get(pod, "GET", "/before")[0] == b"local GET /before x-user=\n"
        (user_app,) = _pids_with(b"_local_app.py", parent=app.pid)
        daemon = mirrord.daemon_pid()
        (agent,) = _pids_with(b"mirrord.agent\0--target\0pid/%d\0" % pod.pid)
        (guard,) = _pids_with(b"mirrord.agent._steal_guard", parent=agent)
        (sentinel,) = _pids_with(b"mirrord.agent._steal_guard", parent=guard)
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
