"""Hand-over: an agent reached on a unix socket (a local target) passes the file it opened
and the socket it connected to its daemon (SCM_RIGHTS) instead of serving them; reached over
TCP (not on the daemon's machine) it announces nothing and serves them as before."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable

import anyio
import pytest

from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient
from tests._agent_process import AgentProc, start_agent, stop_agent

pytestmark = [pytest.mark.netns, pytest.mark.anyio]

_SPEC = PodSpec(name="handover", files={"/app/f.txt": b"pod file\n"}, echo_port=7777)


async def _fds_back_to(agent: AgentProc, before: int) -> None:
    """The agent closes its copy of a passed fd right after the send that passed it: the
    test, woken by that send, may look first (under load the agent is descheduled between the
    two), so it waits (bounded) for the count to come back."""
    with anyio.fail_after(5):
        while agent.open_fds() != before:
            await anyio.sleep(0.02)


def _fetch(flags: int | None) -> Callable[[int], m.FileFetch]:
    return lambda r: m.FileFetch(request_id=r, path=b"/app/f.txt", flags=0, handover_flags=flags)


async def test_a_local_agent_hands_over_regular_files_and_connected_sockets(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(_SPEC)
    agent = make_agent(f"pid/{pod.pid}")
    async with AgentClient.open(agent) as client:
        assert m.FEATURE_HANDOVER in client.welcome.features
        await client.open_channel(1)
        fds_before = agent.open_fds()
        reply, passed = await client.request_passing(1, _fetch(os.O_RDWR | os.O_APPEND))
        assert isinstance(reply, m.FileHanded) and passed is not None
        fd = passed.detach()
        try:
            assert os.read(fd, 100) == b"pod file\n"
            os.write(fd, b"more\n")  # O_APPEND: at the pod file's end
            inside = pod.run_in_pod(["stat", "-c", "%i", "/app/f.txt"]).stdout
            assert os.fstat(fd).st_ino == int(inside) and stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        assert pod.run_in_pod(["cat", "/app/f.txt"]).stdout == b"pod file\nmore\n"
        await _fds_back_to(agent, fds_before)  # the agent kept nothing of it

        # a directory is never handed over: served through a handle as before
        reply, passed = await client.request_passing(
            1, lambda r: m.FileFetch(request_id=r, path=b"/app", flags=0, handover_flags=0)
        )
        assert isinstance(reply, m.FileFetched) and reply.handle is not None and passed is None
        handle = reply.handle
        await client.request(1, lambda r: m.FileClose(request_id=r, handle=handle))

        reply, passed = await client.request_passing(
            1,
            lambda r: m.Connect(
                request_id=r, conn_id=2, protocol="tcp", address=pod.ip, port=7777, handover=True
            ),
        )
        assert isinstance(reply, m.Connected) and reply.handed and passed is not None
        sock = socket.socket(fileno=passed.detach())
        with sock:
            assert sock.getsockname()[0] == pod.ip == reply.local_address  # the pod's netns
            sock.settimeout(10)
            sock.sendall(b"echo me")
            assert sock.recv(100) == b"echo me"
        assert (1, 2) not in client.conns
        await _fds_back_to(agent, fds_before)


async def test_an_agent_over_tcp_hands_nothing_over(make_pod: Callable[..., LocalPod]) -> None:
    pod = make_pod(_SPEC)
    agent = start_agent(f"pid/{pod.pid}", secret="tcp-secret", listen="tcp:127.0.0.1:0")
    try:
        port = int(agent.ready_line.rsplit(":", 1)[1])
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with AgentClient.over(stream, "tcp-secret") as client:
            assert m.FEATURE_HANDOVER not in client.welcome.features
            await client.open_channel(1)
            reply, passed = await client.request_passing(1, _fetch(os.O_RDONLY))
            assert isinstance(reply, m.FileFetched) and reply.data == b"pod file\n"
            assert passed is None
    finally:
        stop_agent(agent)


async def test_an_agent_hands_nothing_to_a_daemon_that_did_not_offer_to_take_it(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    # both ends of a unix stream must say so: a unix proxy in between would drop the fds
    pod = make_pod(_SPEC)
    agent = make_agent(f"pid/{pod.pid}")
    stream = await anyio.connect_unix(agent.socket)
    async with AgentClient.over(stream, agent.secret, handover=False) as client:
        assert m.FEATURE_HANDOVER in client.welcome.features  # the agent could
        await client.open_channel(1)
        reply, passed = await client.request_passing(1, _fetch(os.O_RDONLY))
        assert isinstance(reply, m.FileFetched) and reply.data == b"pod file\n"
        assert passed is None
