"""Fixtures of the incoming-traffic tests: a real agent next to a real pod, a real stand-in for
the user's app (an HTTP server process on the host), and a daemon stand-in that relays each
incoming connection to that app the way mirrordd does."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import anyio
import anyio.abc
import pytest

from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentConn
from tests._agent_process import AgentProc, start_agent, stop_agent
from tests.cli.conftest import Mirrord, temp_mirrord

_APP = Path(__file__).with_name("_local_app.py")


@contextlib.contextmanager
def python_app_in_pod(
    pod: LocalPod, app: str, port: int, library_dir: str, host: str = "0.0.0.0", *args: str
) -> Iterator[LocalPod]:
    """Runs the test app `app` (`APP pod HOST PORT ARGS...`, printing PORT when it listens)
    in the pod on the real python binary (outside the virtualenv), with `library_dir` (the
    site-packages of a library it needs) on its path; killed at the end."""
    python = os.path.realpath(sys.executable)
    env = {**pod.env, "PYTHONPATH": library_dir}
    proc = pod.popen_in_pod([python, app, "pod", host, str(port), *args], env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == str(port).encode()
    try:
        yield pod
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def pod6(make_pod: Callable[..., LocalPod]) -> LocalPod:
    """A dual-stack pod: an IPv6 address (`ip6`) beside its IPv4 one."""
    return make_pod(PodSpec(ipv6=True))


@pytest.fixture
def mirrord() -> Iterator[Mirrord]:
    with temp_mirrord("mrdi") as cli:
        yield cli


def run_filtered_steal(
    mirrord: Mirrord,
    pod: LocalPod,
    config: Path,
    *,
    app: str,
    name: str,
    port: int,
    http_filter: Mapping[str, object],
    host: str = "0.0.0.0",
) -> subprocess.Popen[str]:
    """`mirrord run` of the test app `app` (`APP NAME HOST PORT`) with a config (written to
    `config`) that steals `port` of `pod` with `http_filter`; returns once the app listens."""
    incoming = {"mode": "steal", "http_filter": {**http_filter, "ports": [port]}}
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    argv = [sys.executable, app, name, host, str(port)]
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", *argv)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == str(port)
    return proc


@pytest.fixture
def anyio_backend() -> str:
    # The agent under test is a subprocess; the test client needs one backend only.
    return "trio"


@pytest.fixture
def local_app() -> Iterator[Callable[[str], int]]:
    """`local_app(name)` starts an app answering `name METHOD PATH x-user=...`; its port."""
    with port_printing_apps() as start:

        def app(name: str = "local") -> int:
            return start([sys.executable, str(_APP), name])

        yield app


@contextlib.contextmanager
def port_printing_apps() -> Iterator[Callable[[list[str]], int]]:
    """`start(argv)` runs a test app on this machine that prints its port as its first line;
    returns that port. Every app started is killed when the block ends."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> int:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        return int(proc.stdout.readline())

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


POD_APP_PORT = 8081


@pytest.fixture
def pod_app(pod: LocalPod) -> Iterator[int]:
    """A second HTTP server inside the pod (port 8081), answering `pod-app METHOD PATH ...`,
    built for load: a deep accept queue."""
    python = os.path.realpath(sys.executable)
    proc = pod.popen_in_pod([python, str(_APP), "pod-app", "0.0.0.0", str(POD_APP_PORT)])
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == str(POD_APP_PORT).encode(), line
    try:
        yield POD_APP_PORT
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def steal_agent(pod: LocalPod) -> Iterator[AgentProc]:
    agent = start_agent(f"pid/{pod.pid}")
    try:
        yield agent
    finally:
        stop_agent(agent)


async def relay_to_app(conn: AgentConn, app_port: int) -> None:
    """What the daemon does with an IncomingConnection: connect to the app, copy both ways."""
    app = await anyio.connect_tcp("127.0.0.1", app_port)

    async def to_app() -> None:
        while data := await conn.receive():
            await app.send(data)
        with anyio.CancelScope(shield=True):
            try:
                await app.send_eof()
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def from_app() -> None:
        while True:
            try:
                data = await app.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                break
            try:
                await conn.send(data)
            except anyio.BrokenResourceError:
                break
        if not conn.closed.is_set():
            await conn.shutdown()

    async with app, anyio.create_task_group() as tg:
        tg.start_soon(to_app)
        tg.start_soon(from_app)


async def serve_channel(
    client: AgentClient,
    channel: int,
    app_port: int | None,
    seen: list[AgentConn],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept the channel's incoming connections; relay them to the app (or just record
    them when `app_port` is None)."""
    tx, rx = anyio.create_memory_object_stream[AgentConn](math.inf)
    client.incoming[channel] = tx
    task_status.started()
    try:
        async with rx, anyio.create_task_group() as tg:
            async for conn in rx:
                seen.append(conn)
                if app_port is not None:
                    tg.start_soon(relay_to_app, conn, app_port)
    finally:
        client.incoming.pop(channel, None)
        tx.close()


@contextlib.asynccontextmanager
async def serving(
    agent: AgentProc, app_port: int | None
) -> AsyncIterator[tuple[AgentClient, list[AgentConn]]]:
    """A client of `agent` with channel 1 open and its incoming connections served (relayed to
    the app on `app_port`, or only recorded when None): (client, the connections seen)."""
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, app_port, seen)
            yield client, seen
            tg.cancel_scope.cancel()


async def subscribe(
    client: AgentClient,
    channel: int,
    port: int,
    mode: str,
    http_filter: dict[str, object] | None = None,
    *,
    on_concurrent_steal: str = "abort",
    tls: dict[str, object] | None = None,
) -> m.Subscribed:
    reply = await client.request(
        channel,
        lambda r: m.Subscribe(
            request_id=r,
            port=port,
            mode=mode,
            http_filter=http_filter,
            on_concurrent_steal=on_concurrent_steal,
            tls=tls,
        ),
    )
    assert isinstance(reply, m.Subscribed)
    return reply


async def unsubscribe(client: AgentClient, channel: int, port: int) -> None:
    await client.request(channel, lambda r: m.Unsubscribe(request_id=r, port=port))
