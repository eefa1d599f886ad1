"""IPv6 steal and mirror against a dual-stack local pod (`PodSpec(ipv6=True)`): the rules of
both families with each backend, the IPv6 original destination, the pod talking to itself on
::1, a namespace without IPv6, and `mirrord run` end to end (steal, filtered steal, mirror,
nothing left behind, also when the agent is killed)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.agent._incoming_netns import (
    NetnsRunner,
    make_listeners,
    make_marked_socket,
    original_dst,
)
from mirrord.agent._steal import AGENT_MARK, StealRules, chain_names
from mirrord.agent._steal_guard import _jumps, _removal_script
from mirrord.localpod import LocalPod
from tests._agent_client import AgentClient
from tests._agent_process import start_agent, stop_agent
from tests.cli.conftest import Mirrord, processes_mentioning, temp_mirrord
from tests.incoming.conftest import subscribe, unsubscribe
from tests.incoming.test_end_to_end import ENDING, start_app, stop_app, wait_for
from tests.incoming.test_steal_rules import ours, recv_exact

pytestmark = pytest.mark.netns

BACKENDS = ["iptables-nft", "iptables-legacy", "nft"]


@pytest.fixture
def netns6(pod6: LocalPod) -> Iterator[NetnsRunner]:
    runner = NetnsRunner(f"/proc/{pod6.pid}/ns/net")
    yield runner
    runner.close()


def ipv6_rules(pod: LocalPod, backend: str) -> str:
    """What the IPv6 side of `backend` holds in the pod's namespace."""
    script = (
        "nft list ruleset ip6"
        if backend == "nft"
        else backend.replace("iptables", "ip6tables") + "-save"
    )
    return subprocess.run(
        ["ip", "netns", "exec", pod.netns, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dual_stack_pod_gets_rules_of_both_families_and_ipv6_original_destination(
    pod6: LocalPod, netns6: NetnsRunner, backend: str
) -> None:
    rules = StealRules(target_pid=pod6.pid, backend=backend)
    listeners = netns6.run_sync(make_listeners)
    assert [s.family for s in listeners] == [socket.AF_INET, socket.AF_INET6]
    port = listeners[0].getsockname()[1]
    assert listeners[1].getsockname()[1] == port  # one redirect target for both families
    try:
        rules.set_redirects({8080: port})
        assert rules.families == ["ip", "ip6"]
        names = chain_names(rules.tag)
        v6 = ipv6_rules(pod6, backend)
        if backend == "nft":
            assert f"table ip6 {names['nft_table']}" in v6
        else:
            for chain in ("pre", "out", "in", "pin"):
                assert f":{names[chain]} - [0:0]" in v6
        # The listener is reachable only through the rules, over IPv6 too (the IN chain).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((pod6.ip6, port), timeout=10).close()
        for listener in listeners:
            listener.settimeout(10)
        for family, address, expected_peer in (
            (socket.AF_INET6, pod6.ip6, pod6.host_ip6),
            (socket.AF_INET, pod6.ip, pod6.host_ip),
        ):
            listener = listeners[family == socket.AF_INET6]
            with socket.create_connection((address, 8080), timeout=10) as client:
                conn, peer = listener.accept()
                with conn:
                    assert peer[0] == expected_peer
                    assert original_dst(conn) == (address, 8080)
                    client.sendall(b"ping")
                    assert recv_exact(conn, 4) == b"ping"
        rules.clear()
        assert ours(pod6) == []
        assert "MRD_" not in ipv6_rules(pod6, backend)
        assert "mirrord_" not in ipv6_rules(pod6, backend)
        # The pod's own server answers IPv6 clients again.
        with socket.create_connection((pod6.ip6, 7777), timeout=10) as again:
            again.sendall(b"pod")
            assert recv_exact(again, 3) == b"pod"
    finally:
        rules.close()
        for listener in listeners:
            listener.close()
    assert ours(pod6) == []


def test_the_pod_talking_to_itself_on_ipv6_loopback_is_stolen_but_marked_sockets_are_not(
    pod6: LocalPod, netns6: NetnsRunner
) -> None:
    rules = StealRules(target_pid=pod6.pid)
    listeners = netns6.run_sync(make_listeners)
    listeners[1].settimeout(10)
    try:
        rules.set_redirects({7777: listeners[0].getsockname()[1]})
        connect = "import socket; socket.create_connection(('::1', 7777), timeout=10)"
        assert pod6.run_in_pod(["python3", "-c", connect], timeout=20).returncode == 0
        conn, _ = listeners[1].accept()
        assert original_dst(conn) == ("::1", 7777)
        conn.close()
        marked = netns6.run_sync(lambda: make_marked_socket(AGENT_MARK, socket.AF_INET6))
        with marked:
            marked.settimeout(10)
            marked.connect(("::1", 7777))
            marked.sendall(b"echo")
            assert recv_exact(marked, 4) == b"echo"  # the pod's echo server, not the agent
    finally:
        rules.close()
        for listener in listeners:
            listener.close()
    assert ours(pod6) == []


def test_a_namespace_without_ipv6_gets_ipv4_rules_only(pod: LocalPod) -> None:
    sysctl = ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]
    subprocess.run(["ip", "netns", "exec", pod.netns, *sysctl], check=True, timeout=20)
    rules = StealRules(target_pid=pod.pid, backend="iptables-nft")
    try:
        rules.set_redirects({8080: 1})
        assert rules.families == ["ip"]
        assert "MRD_" not in ipv6_rules(pod, "iptables-nft")
        assert ours(pod) != []
    finally:
        rules.close()
    assert ours(pod) == []


SAVED = """# Generated by iptables-save
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MRD_0123456789_PIN - [0:0]
-A PREROUTING -j MRD_0123456789_PIN
-A OUTPUT -j MRD_0123456789_PIN
-A MRD_0123456789_PIN -m conntrack --ctstate INVALID -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MRD_0123456789_PRE - [0:0]
:MRD_aaaaaaaaaa_PRE - [0:0]
-A PREROUTING -j MRD_0123456789_PRE
-A PREROUTING -j MRD_aaaaaaaaaa_PRE
-A PREROUTING -j MRD_0123456789_PRE
-A PREROUTING -p tcp -j MRD_0123456789_PRE
-A MRD_0123456789_PRE -p tcp -m tcp --dport 80 --syn -j REDIRECT --to-ports 9
COMMIT
"""


def test_the_removal_script_removes_exactly_our_jumps_and_chains() -> None:
    # A jump inserted twice (a crash mid-way) goes twice; another agent's chain and a rule
    # that is not a plain jump of ours stay; the OUT and IN chains are not there at all.
    script = _removal_script(SAVED, _jumps("0123456789"))
    assert script.splitlines() == [
        "*nat",
        "-D PREROUTING -j MRD_0123456789_PRE",
        "-D PREROUTING -j MRD_0123456789_PRE",
        "-F MRD_0123456789_PRE",
        "-X MRD_0123456789_PRE",
        "COMMIT",
        "*raw",
        "-D PREROUTING -j MRD_0123456789_PIN",
        "-D OUTPUT -j MRD_0123456789_PIN",
        "-F MRD_0123456789_PIN",
        "-X MRD_0123456789_PIN",
        "COMMIT",
    ]
    keep_pin = [j for j in _jumps("0123456789") if j[0] != "raw"]
    assert "*raw" not in _removal_script(SAVED, keep_pin)
    assert _removal_script(SAVED, _jumps("bbbbbbbbbb")) == ""


def test_ipv6_on_without_the_backends_ipv6_tool_steals_ipv4_and_says_so(
    pod6: LocalPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The guard finds its tools on PATH: one that has the IPv4 tools of iptables-nft only.
    for tool in ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"):
        real = shutil.which(tool)
        assert real is not None
        (tmp_path / tool).symlink_to(real)
    rules = StealRules(target_pid=pod6.pid, backend="iptables-nft")
    try:
        with monkeypatch.context() as patched:
            patched.setenv("PATH", str(tmp_path))
            rules.start()  # the guard keeps that PATH
        rules.set_redirects({8080: 1})
        assert rules.families == ["ip"]
        (warning,) = rules.warnings
        assert "ip6tables-nft-restore is not installed" in warning
        assert "IPv6 connections are not stolen" in warning
        assert ours(pod6) != []
    finally:
        rules.close()
    assert ours(pod6) == []


@pytest.mark.anyio
async def test_the_steal_subscribe_warns_when_ipv6_cannot_be_stolen(
    pod6: LocalPod, tmp_path: Path
) -> None:
    for tool in ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"):
        real = shutil.which(tool)
        assert real is not None
        (tmp_path / tool).symlink_to(real)
    env = {"PATH": str(tmp_path), "MIRRORD_AGENT_STEAL_BACKEND": "iptables-nft"}
    agent = start_agent(f"pid/{pod6.pid}", env=env)
    try:
        async with AgentClient.open(agent) as client:
            await client.open_channel(1)
            reply = await subscribe(client, 1, 8080, "steal")
            assert any("IPv6 connections are not stolen" in w for w in reply.warnings)
            await unsubscribe(client, 1, 8080)
    finally:
        stop_agent(agent)
    assert ours(pod6) == []


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from mirrord.agent._steal import StealRules
    rules = StealRules(target_pid=int(sys.argv[1]), backend=sys.argv[2])
    rules.set_redirects({8080: 1, 7777: 2})
    print(rules.guard_pid, ",".join(rules.families), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_guard_removes_the_ipv6_rules_too_when_the_agent_is_sigkilled(
    pod6: LocalPod, backend: str
) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(pod6.pid), backend],
        stdout=subprocess.PIPE,
        text=True,
    )
    guard_pid = 0
    try:
        assert agent.stdout is not None
        pid, families = agent.stdout.readline().split()
        guard_pid = int(pid)
        assert families == "ip,ip6"
        assert "MRD_" in ipv6_rules(pod6, backend) or "mirrord_" in ipv6_rules(pod6, backend)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while ours(pod6) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ours(pod6) == []
        assert "MRD_" not in ipv6_rules(pod6, backend)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()
        for _ in range(100):
            try:
                os.kill(guard_pid, 0)
            except (ProcessLookupError, OverflowError):
                break
            time.sleep(0.1)


# ---------------------------------------------------------------- mirrord run, end to end


@pytest.fixture
def mirrord() -> Iterator[Mirrord]:
    with temp_mirrord("mrd6") as cli:
        yield cli


def get6(
    pod: LocalPod, path: str, *, user: str = "", address: str | None = None
) -> tuple[bytes, str]:
    """GET `path` from the pod's port 8080 over IPv6 (or at `address`): (body, X-Peer)."""
    conn = http.client.HTTPConnection(address or pod.ip6, 8080, timeout=15)
    try:
        conn.request("GET", path, headers={"x-user": user} if user else {})
        resp = conn.getresponse()
        return resp.read(), resp.getheader("X-Peer") or ""
    finally:
        conn.close()


def start_app6(mirrord: Mirrord, pod: LocalPod, *args: str, log: bool = False) -> object:
    return start_app(mirrord, pod, *args, log=log, host="::")


def no_rule_of_either_family(pod: LocalPod) -> bool:
    """`ours` reads iptables-save, ip6tables-save (both backends) and the nft ruleset."""
    return ours(pod) == []


@pytest.mark.slow
def test_mirrord_run_steals_ipv6_and_ipv4_clients_of_a_dual_stack_pod(
    mirrord: Mirrord, pod6: LocalPod
) -> None:
    app = start_app6(mirrord, pod6, "--steal")
    body, peer = get6(pod6, "/v6")
    assert body == b"local GET /v6 x-user=\n"
    assert peer == pod6.host_ip6  # accept()/getpeername() name the real IPv6 client
    body, peer = get6(pod6, "/v4", address=pod6.ip)
    assert body == b"local GET /v4 x-user=\n"
    assert peer == f"::ffff:{pod6.host_ip}"  # an IPv4 client of the app's dual-stack socket
    stop_app(app)
    assert get6(pod6, "/after")[0] == b"pod GET /after\n"  # the steal ended with the run
    wait_for(lambda: no_rule_of_either_family(pod6))


@pytest.mark.slow
def test_mirrord_run_filtered_steal_over_ipv6(
    mirrord: Mirrord, pod6: LocalPod, tmp_path: Path
) -> None:
    config = tmp_path / "mirrord.json"
    incoming = {"mode": "steal", "http_filter": {"header_filter": "^x-user: alice$"}}
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    app = start_app6(mirrord, pod6, "-f", str(config))
    assert get6(pod6, "/a", user="alice")[0] == b"local GET /a x-user=alice\n"
    # Unmatched: the agent relays it to the pod's app at its IPv6 original destination.
    assert get6(pod6, "/b", user="bob")[0] == b"pod GET /b\n"
    assert get6(pod6, "/c")[0] == b"pod GET /c\n"
    stop_app(app)
    wait_for(lambda: no_rule_of_either_family(pod6))


@pytest.mark.slow
def test_mirrord_run_mirrors_ipv6_traffic_while_the_pod_answers(
    mirrord: Mirrord, pod6: LocalPod
) -> None:
    app = start_app6(mirrord, pod6, log=True)
    time.sleep(0.5)  # the subscription follows listen() asynchronously
    for i in range(3):
        assert get6(pod6, f"/m{i}")[0] == f"pod GET /m{i}\n".encode()
    time.sleep(1.0)
    out = stop_app(app)
    assert sorted(line for line in out.splitlines() if line.startswith("seen")) == [
        f"seen GET /m{i}" for i in range(3)
    ]


@pytest.mark.slow
def test_mirrord_run_ipv6_steal_leaves_no_rule_when_the_agent_is_killed(
    mirrord: Mirrord, pod6: LocalPod
) -> None:
    app = start_app6(mirrord, pod6, "--steal")
    assert get6(pod6, "/before")[0] == b"local GET /before x-user=\n"
    (agent,) = processes_mentioning(b"mirrord.agent\0--target\0pid/%d\0" % pod6.pid)
    assert ours(pod6) != []
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: no_rule_of_either_family(pod6))
    wait_for(lambda: get6(pod6, "/later")[0] == b"pod GET /later\n", transient=ENDING)
    stop_app(app)
