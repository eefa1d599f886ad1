"""Steal rules in a real pod's network namespace, with each backend: exact chain names,
redirection with the original destination, connections that must not be reset, removal on
clear, by the guard when the agent is SIGKILLed, and stale chains of dead agents."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from mirrord.agent._incoming_netns import (
    NetnsRunner,
    make_listener,
    make_marked_socket,
    original_dst,
)
from mirrord.agent._steal import StealRules, chain_names
from mirrord.localpod import LocalPod

pytestmark = pytest.mark.netns

BACKENDS = ["iptables-nft", "iptables-legacy", "nft"]


def ruleset(pod: LocalPod) -> str:
    """Everything any backend holds in the pod's namespace, IPv4 and IPv6."""
    script = (
        "iptables-nft-save; iptables-legacy-save; ip6tables-nft-save; ip6tables-legacy-save; "
        "nft list ruleset"
    )
    return subprocess.run(
        ["ip", "netns", "exec", pod.netns, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


def ours(pod: LocalPod) -> list[str]:
    return [line for line in ruleset(pod).splitlines() if "MRD_" in line or "mirrord_" in line]


@pytest.fixture
def netns(pod: LocalPod) -> Iterator[NetnsRunner]:
    runner = NetnsRunner(f"/proc/{pod.pid}/ns/net")
    yield runner
    runner.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_redirect_with_exact_names_and_nothing_left_after_clear(
    pod: LocalPod, netns: NetnsRunner, backend: str
) -> None:
    rules = StealRules(target_pid=pod.pid, backend=backend)
    listener = netns.run_sync(make_listener)
    try:
        rules.start()
        assert rules.backend == backend
        rules.set_redirects({8080: listener.getsockname()[1]})
        names = chain_names(rules.tag)
        text = ruleset(pod)
        if backend == "nft":
            assert f"table ip {names['nft_table']}" in text
        else:
            for chain in ("pre", "out", "pin"):
                assert f":{names[chain]} - [0:0]" in text
        listener.settimeout(5)
        with socket.create_connection((pod.ip, 8080), timeout=5) as client:
            conn, peer = listener.accept()
            with conn:
                assert peer[0] == pod.host_ip
                assert original_dst(conn) == (pod.ip, 8080)
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        rules.clear()
        assert ours(pod) == []
    finally:
        rules.close()
        listener.close()
    assert ours(pod) == []


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_connections_survive_steal_start_and_end(
    pod: LocalPod, netns: NetnsRunner, backend: str
) -> None:
    rules = StealRules(target_pid=pod.pid, backend=backend)
    listener = netns.run_sync(make_listener)
    listener.settimeout(5)
    try:
        before = socket.create_connection((pod.ip, 7777), timeout=5)  # the pod's echo server
        before.sendall(b"one")
        assert recv_exact(before, 3) == b"one"
        rules.set_redirects({7777: listener.getsockname()[1]})
        before.sendall(b"two")  # still the pod's echo: only SYNs are redirected
        assert recv_exact(before, 3) == b"two"
        stolen_client = socket.create_connection((pod.ip, 7777), timeout=5)
        stolen, _ = listener.accept()
        stolen.settimeout(5)
        stolen_client.sendall(b"x")
        assert stolen.recv(1) == b"x"
        rules.set_redirects({})  # the steal ends; the pin stays while `stolen` lives
        stolen_client.sendall(b"y")
        assert stolen.recv(1) == b"y"
        stolen.sendall(b"z")
        assert recv_exact(stolen_client, 1) == b"z"
        before.sendall(b"three")
        assert recv_exact(before, 5) == b"three"
        stolen_client.close()
        stolen.close()
        rules.clear()
        before.sendall(b"four")
        assert recv_exact(before, 4) == b"four"
        before.close()
        with socket.create_connection((pod.ip, 7777), timeout=5) as after:
            after.sendall(b"pod")
            assert recv_exact(after, 3) == b"pod"
    finally:
        rules.close()
        listener.close()


def test_pod_talking_to_itself_is_stolen_but_the_agents_marked_socket_is_not(
    pod: LocalPod, netns: NetnsRunner
) -> None:
    rules = StealRules(target_pid=pod.pid)
    listener = netns.run_sync(make_listener)
    listener.settimeout(5)
    try:
        rules.set_redirects({7777: listener.getsockname()[1]})
        out = pod.run_in_pod(
            ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 7777))"],
            timeout=10,
        )
        assert out.returncode == 0
        conn, _ = listener.accept()
        assert original_dst(conn) == ("127.0.0.1", 7777)
        conn.close()
        from mirrord.agent._steal import AGENT_MARK

        marked = netns.run_sync(lambda: make_marked_socket(AGENT_MARK))
        marked.settimeout(5)
        marked.connect(("127.0.0.1", 7777))
        marked.sendall(b"echo")
        assert recv_exact(marked, 4) == b"echo"  # the pod's echo server, not the agent
        marked.close()
    finally:
        rules.close()
        listener.close()


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from mirrord.agent._steal import StealRules
    rules = StealRules(target_pid=int(sys.argv[1]), backend=sys.argv[2])
    rules.set_redirects({8080: 1, 7777: 2})
    print(rules.guard_pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_removes_every_rule_within_2s_of_agent_sigkill(pod: LocalPod, backend: str) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(pod.pid), backend],
        stdout=subprocess.PIPE,
        text=True,
    )
    guard_pid = 0
    try:
        assert agent.stdout is not None
        guard_pid = int(agent.stdout.readline())
        assert ours(pod) != []
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=5)
        killed = time.monotonic()
        for _ in range(40):
            if not ours(pod):
                break
            time.sleep(0.05)
        assert ours(pod) == []
        assert time.monotonic() - killed < 2.0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()
        for _ in range(50):
            try:
                os.kill(guard_pid, 0)
            except (ProcessLookupError, OverflowError):
                break
            time.sleep(0.1)


def test_stale_chains_of_a_dead_agent_are_reported_then_cleaned(pod: LocalPod) -> None:
    dead = StealRules(target_pid=pod.pid, backend="iptables-nft")
    dead.set_redirects({8080: 1})
    assert dead.guard_pid is not None
    # A guard that died without cleaning, its sentinel child with it (e.g. the node
    # OOM-killed them all): rules stay behind.
    with open(f"/proc/{dead.guard_pid}/task/{dead.guard_pid}/children") as f:
        (sentinel,) = (int(pid) for pid in f.read().split())
    os.kill(sentinel, signal.SIGKILL)
    os.kill(dead.guard_pid, signal.SIGKILL)
    dead.close()
    stale_name = chain_names(dead.tag)["pre"]
    assert any(stale_name in line for line in ours(pod))

    live = StealRules(target_pid=pod.pid)
    live.set_redirects({7777: 2})
    reporter = StealRules(target_pid=pod.pid)
    cleaner = StealRules(target_pid=pod.pid, clean_stale=True)
    try:
        reporter.start()
        assert reporter.stale == [f"iptables-nft:{stale_name}"]  # not the live agent's
        cleaner.start()
        assert cleaner.cleaned == [f"iptables-nft:{stale_name}"]
        assert not any(stale_name in line for line in ours(pod))
        assert any(chain_names(live.tag)["pre"] in line for line in ours(pod))
    finally:
        for r in (reporter, cleaner, live):
            r.close()
    assert ours(pod) == []
