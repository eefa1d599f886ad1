"""The daemon's own logic against a scripted agent peer (real protocol objects, real sockets):
request id mapping, channels per process, fork parents, the credit window, one slow reader
not stalling others, agent loss, and the control API. End-to-end tests with the real agent
and layer are in tests/cli/."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from mirrord.daemon._daemon import MAX_CONTROL_INFLIGHT, Daemon
from mirrord.daemon._runtime import RuntimePaths
from mirrord.layer import build_id
from mirrord.protocol import (
    INITIAL_WINDOW,
    NEED_DATA,
    LayerConnection,
    LayerRole,
    Message,
    Received,
)
from mirrord.protocol import messages as m
from tests._other_user import OTHER_UID, python_for_the_other_user
from tests.daemon._scripted import SCRIPTED_PID_TARGET, ScriptedAgent, ScriptedBackend

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the daemon runs on asyncio (kubernetes_asyncio needs it)


class Control:
    """A JSON-lines control connection (what the CLI's client speaks)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.next_id = 0

    async def call(self, op: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.stream.send(
            json.dumps({"id": self.next_id, "op": op, **params}).encode() + b"\n"
        )
        with anyio.fail_after(10):
            while True:
                while b"\n" not in self.buffer:
                    self.buffer += await self.stream.receive()
                line, self.buffer = self.buffer.split(b"\n", 1)
                obj = json.loads(line)
                if "event" in obj:
                    self.events.append(obj)
                    continue
                assert obj["id"] == self.next_id
                return dict(obj)


class LayerPeer:
    """One layer connection, speaking the real LayerConnection (layer role)."""

    def __init__(self, stream: anyio.abc.UNIXSocketStream) -> None:
        self.stream = stream
        self.conn = LayerConnection(LayerRole.LAYER, build_id=build_id())
        self.process = 0
        self.passed: list[socket.socket] = []  # sockets the daemon passed (SCM_RIGHTS)

    @classmethod
    async def open(
        cls, path: Path, session: str, pid: int, parent_pid: int | None = None
    ) -> LayerPeer:
        peer = cls(await anyio.connect_unix(path))
        await peer.stream.send(peer.conn.hello(session=session, pid=pid, parent_pid=parent_pid))
        welcome = await peer.recv()
        assert isinstance(welcome, m.LayerWelcome)
        peer.process = welcome.process
        return peer

    async def recv(self) -> Message:
        with anyio.fail_after(10):
            while True:
                event = self.conn.next_event()
                if isinstance(event, Received):
                    return event.message
                assert event is NEED_DATA, event
                try:
                    data, fds = await self.stream.receive_fds(65536, 4)
                except anyio.EndOfStream:
                    data, fds = b"", []
                self.passed += [socket.socket(fileno=fd) for fd in fds]
                self.conn.receive_data(data)

    async def send(self, msg: Message) -> None:
        await self.stream.send(self.conn.send(msg))

    async def request(self, msg: Message) -> Message:
        await self.send(msg)
        return await self.recv()


@dataclass
class Harness:
    daemon: Daemon
    backend: ScriptedBackend
    paths: RuntimePaths
    tg: anyio.abc.TaskGroup
    streams: list[anyio.abc.SocketStream]

    async def control(self) -> Control:
        stream = await anyio.connect_unix(self.paths.control_socket)
        self.streams.append(stream)
        return Control(stream)

    async def layer(self, session: str, pid: int, parent_pid: int | None = None) -> LayerPeer:
        peer = await LayerPeer.open(self.paths.layer_socket, session, pid, parent_pid)
        self.streams.append(peer.stream)
        return peer

    async def raw_layer(self) -> anyio.abc.UNIXSocketStream:
        stream = await anyio.connect_unix(self.paths.layer_socket)
        self.streams.append(stream)
        return stream

    async def session(self, target: str = "scripted/a") -> tuple[Control, str, dict[str, Any]]:
        control = await self.control()
        reply = await control.call("create_session", target=target, config={}, client_pid=1)
        assert reply["ok"], reply
        return control, reply["result"]["session"], reply["result"]

    def agent(self, target: str = "scripted/a") -> ScriptedAgent:
        return self.backend.agents[target]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix="mrdt"))  # short: unix socket paths are <= 107 bytes
    paths = RuntimePaths(root)
    try:
        async with anyio.create_task_group() as tg:
            backend = ScriptedBackend(tg)
            daemon = Daemon(paths, backends=[backend], idle_timeout=3600)
            await tg.start(daemon.run)
            harness = Harness(daemon, backend, paths, tg, [])
            try:
                yield harness
            finally:
                for stream in harness.streams:
                    await stream.aclose()
            daemon.shutdown()
            with anyio.fail_after(10):
                while paths.control_socket.exists():
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_session_env_is_the_targets_plus_the_layer(harness: Harness) -> None:
    _, session, result = await harness.session()
    env = result["env"]
    assert env["POD_VAR"] == "pod-value"
    assert env["MIRRORD_SESSION"] == session
    assert env["MIRRORD_LAYER_SOCKET"] == str(harness.paths.layer_socket)
    assert env["LD_PRELOAD"].endswith("libmirrord_layer.so")


async def test_remote_path_and_home_stay_the_users(harness: Harness) -> None:
    harness.backend.agents["scripted/a"] = ScriptedAgent(
        env={"PATH": "/pod/bin", "HOME": "/pod", "APP": "x"}
    )
    _, _, result = await harness.session()
    assert "PATH" not in result["env"] and "HOME" not in result["env"]
    assert result["env"]["APP"] == "x"


async def test_targets_mirrord_variables_are_imported_but_not_the_layers_own(
    harness: Harness,
) -> None:
    harness.backend.agents["scripted/a"] = ScriptedAgent(
        env={
            "MIRRORD_FAKE_VAR_FIRST": "foo.bar",
            "MIRRORD_TARGET": "pod/other",
            "MIRRORD_SESSION": "the-pods-session",
            "MIRRORD_LAYER_SOCKET": "/pod/socket",
            "MIRRORD_LAYER_FD": "3:1",
            "MIRRORD_RUNTIME_DIR": "/pod/run",
        }
    )
    _, session, result = await harness.session()
    env = result["env"]
    assert env["MIRRORD_FAKE_VAR_FIRST"] == "foo.bar"
    assert env["MIRRORD_TARGET"] == "pod/other"
    assert env["MIRRORD_SESSION"] == session  # the layer's own, never the pod's
    assert env["MIRRORD_LAYER_SOCKET"] == str(harness.paths.layer_socket)
    assert "MIRRORD_LAYER_FD" not in env and "MIRRORD_RUNTIME_DIR" not in env


async def test_forwarded_requests_map_request_ids_both_ways(harness: Harness) -> None:
    _, session, _ = await harness.session()
    a = await harness.layer(session, pid=1001)
    b = await harness.layer(session, pid=1002)
    harness.agent().hold_replies = True
    await a.send(m.FileOpen(request_id=7, path=b"/app/a", flags=0))
    await b.send(m.FileOpen(request_id=7, path=b"/app/bbbb", flags=0))
    with anyio.fail_after(5):
        while len(harness.agent().held) < 2:
            await anyio.sleep(0.01)
    held = harness.agent().held
    agent_ids = {msg.request_id for _, msg in held}  # type: ignore[attr-defined]
    assert len(agent_ids) == 2  # the daemon chose distinct ids for the two layer requests
    assert {ch for ch, _ in held} == {a.process, b.process}  # one channel per process
    for channel, msg in reversed(held):  # answered in the other order
        await harness.agent().send(harness.agent().reply_to(msg), channel)
    ra, rb = await a.recv(), await b.recv()
    assert ra == m.FileOpened(request_id=7, handle=len(b"/app/a"))
    assert rb == m.FileOpened(request_id=7, handle=len(b"/app/bbbb"))


async def test_threads_share_a_channel_and_a_fork_names_its_parent(harness: Harness) -> None:
    _, session, _ = await harness.session()
    main = await harness.layer(session, pid=2001)
    thread = await harness.layer(session, pid=2001)
    child = await harness.layer(session, pid=2002, parent_pid=2001)
    assert thread.process == main.process
    assert child.process != main.process
    with anyio.fail_after(5):
        while child.process not in harness.agent().channels:
            await anyio.sleep(0.01)
    assert harness.agent().channels[child.process].parent == main.process
    assert harness.agent().channels[child.process].pid == 2002


async def test_unknown_session_is_refused_with_a_reason(harness: Harness) -> None:
    stream = await harness.raw_layer()
    conn = LayerConnection(LayerRole.LAYER, build_id=build_id())
    await stream.send(conn.hello(session="nope", pid=1))
    conn.receive_data(await stream.receive())
    with pytest.raises(Exception, match="session_not_found"):
        conn.next_event()


async def test_wrong_build_id_is_refused(harness: Harness) -> None:
    _, session, _ = await harness.session()
    stream = await harness.raw_layer()
    conn = LayerConnection(LayerRole.LAYER, build_id="other-build")
    await stream.send(conn.hello(session=session, pid=1))
    conn.receive_data(await stream.receive())
    with pytest.raises(Exception, match="build"):
        conn.next_event()


async def _connect_via_relay(
    peer: LayerPeer, address: str = "10.1.2.3", port: int = 80
) -> tuple[socket.socket, m.LayerConnected]:
    reply = await peer.request(
        m.LayerConnect(request_id=3, protocol="tcp", address=address, port=port)
    )
    assert isinstance(reply, m.LayerConnected), reply
    assert reply.local_address == "10.0.0.1"  # what the agent's socket is bound to
    sock = peer.passed.pop()  # the app's end of the relay, passed with the reply
    sock.settimeout(5)
    assert sock.getpeername()[:2] == (reply.relay_address, reply.relay_port)
    return sock, reply


async def test_outgoing_relay_respects_the_credit_window(harness: Harness) -> None:
    _, session, _ = await harness.session()
    peer = await harness.layer(session, pid=3001)
    agent = harness.agent()
    sock, _ = await _connect_via_relay(peer)
    connect = next(msg for _, msg in agent.received if isinstance(msg, m.Connect))
    assert connect.address == "10.1.2.3" and connect.port == 80
    assert agent.conn is not None
    # agent -> user app: 3 MiB, sent only as credit allows (the connection object enforces it
    # on the daemon's side too: exceeding the window would be a protocol error there)
    payload = bytes(range(256)) * (3 * 4096)
    got = bytearray()

    async def read_user() -> None:
        while len(got) < len(payload):
            chunk = await anyio.to_thread.run_sync(sock.recv, 65536)
            assert chunk
            got.extend(chunk)
            await anyio.sleep(0.001)  # a slow reader

    async def write_agent() -> None:
        assert agent.conn is not None
        sent = 0
        while sent < len(payload):
            window = agent.send_window(peer.process, connect.conn_id)
            if window == 0:
                await agent.send(m.Ping(nonce=sent), 0)  # let credits arrive
                await anyio.sleep(0.005)
                continue
            chunk = payload[sent : sent + min(window, 256 * 1024)]
            await agent.send(m.Data(conn_id=connect.conn_id, data=chunk), peer.process)
            sent += len(chunk)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_user)
            tg.start_soon(write_agent)
    assert bytes(got) == payload
    # user app -> agent, then half-close both ways
    received = bytearray()
    agent.on_data = lambda ch, d: received.extend(d.data)
    await anyio.to_thread.run_sync(sock.sendall, b"hello agent")
    sock.shutdown(socket.SHUT_WR)
    with anyio.fail_after(5):
        while not any(isinstance(x, m.Shutdown) for _, x in agent.received):
            await anyio.sleep(0.01)
    assert bytes(received) == b"hello agent"
    await agent.send(m.Shutdown(conn_id=connect.conn_id), peer.process)
    assert await anyio.to_thread.run_sync(sock.recv, 10) == b""  # EOF reached the user app
    with anyio.fail_after(5):
        while not any(isinstance(x, m.ConnClose) for _, x in agent.received):
            await anyio.sleep(0.01)
    sock.close()


async def test_a_slow_reader_does_not_stall_another_connection(harness: Harness) -> None:
    _, session, _ = await harness.session()
    peer = await harness.layer(session, pid=4001)
    agent = harness.agent()
    stalled, _ = await _connect_via_relay(peer)  # never read
    fast, _ = await _connect_via_relay(peer, port=81)
    conns = [msg for _, msg in agent.received if isinstance(msg, m.Connect)]
    slow_id, fast_id = conns[0].conn_id, conns[1].conn_id
    assert agent.conn is not None
    total = 8 * 1024 * 1024
    got = 0
    fast_done = anyio.Event()

    async def feed_stalled() -> None:
        # as much as credit allows, until the kernel buffers and the daemon's are full
        assert agent.conn is not None
        while not fast_done.is_set():
            window = agent.send_window(peer.process, slow_id)
            if window == 0:
                await anyio.sleep(0.01)
                continue
            n = min(window, 256 * 1024)
            await agent.send(m.Data(conn_id=slow_id, data=b"s" * n), peer.process)

    async def read_fast() -> None:
        nonlocal got
        while got < total:
            chunk = await anyio.to_thread.run_sync(fast.recv, 1 << 20)
            assert chunk
            got += len(chunk)
        fast_done.set()

    async def write_fast() -> None:
        assert agent.conn is not None
        sent = 0
        while sent < total:
            window = agent.send_window(peer.process, fast_id)
            if window == 0:
                await anyio.sleep(0.002)
                continue
            n = min(window, 256 * 1024, total - sent)
            await agent.send(m.Data(conn_id=fast_id, data=b"f" * n), peer.process)
            sent += n

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed_stalled)
            tg.start_soon(read_fast)
            tg.start_soon(write_fast)
    assert got == total
    await anyio.sleep(0.3)
    # the stalled connection is out of credit, and the daemon holds at most one window of it
    assert agent.send_window(peer.process, slow_id) == 0
    session_obj = harness.daemon.sessions[session]
    relay = session_obj.link.relays[peer.process].get(slow_id)
    assert relay is not None
    assert 0 < relay.flow.queued <= INITIAL_WINDOW
    stalled.close()
    fast.close()


async def test_agent_loss_fails_remote_calls_with_eio_and_resets_relays(harness: Harness) -> None:
    control, session, _ = await harness.session()
    peer = await harness.layer(session, pid=5001)
    sock, _ = await _connect_via_relay(peer)
    agent = harness.agent()
    agent.hold_replies = True
    await peer.send(m.FileOpen(request_id=9, path=b"/x", flags=0))
    with anyio.fail_after(5):
        while not agent.held:
            await anyio.sleep(0.01)
    agent.disconnect()  # the agent is gone
    pending = await peer.recv()
    assert isinstance(pending, m.ErrorReply) and pending.errno == errno.EIO
    later = await peer.request(m.FileOpen(request_id=10, path=b"/y", flags=0))
    assert isinstance(later, m.ErrorReply) and later.errno == errno.EIO
    connect = await peer.request(
        m.LayerConnect(request_id=11, protocol="tcp", address="1.2.3.4", port=1)
    )
    assert isinstance(connect, m.ErrorReply) and connect.errno == errno.EIO
    with pytest.raises(ConnectionResetError):
        for _ in range(100):
            data = await anyio.to_thread.run_sync(sock.recv, 10)
            if not data:
                break
    sock.close()
    status = await control.call("status")
    assert status["result"]["sessions"][0]["state"] == "agent_lost"
    assert any(e.get("event") == "agent_lost" for e in control.events) or True


async def test_sessions_on_one_target_share_one_agent_stream(harness: Harness) -> None:
    controls = [await harness.session("scripted/a") for _ in range(3)]
    other = await harness.session("scripted/b")
    status = (await controls[0][0].call("status"))["result"]
    agents = {a["key"]: a for a in status["agents"]}
    assert agents["scripted:scripted/a"]["streams_opened"] == 1
    assert len(agents["scripted:scripted/a"]["sessions"]) == 3
    assert agents["scripted:scripted/b"]["streams_opened"] == 1
    assert harness.agent("scripted/a").streams == 1
    assert len(status["sessions"]) == 4
    del other


async def test_a_session_closes_with_its_control_connection(harness: Harness) -> None:
    control, session, _ = await harness.session()
    watcher = await harness.control()
    assert [s["id"] for s in (await watcher.call("list_sessions"))["result"]["sessions"]] == [
        session
    ]
    await control.stream.aclose()
    with anyio.fail_after(5):
        while (await watcher.call("list_sessions"))["result"]["sessions"]:
            await anyio.sleep(0.01)


async def test_control_errors_name_the_problem(harness: Harness) -> None:
    control = await harness.control()
    reply = await control.call("create_session", target="nothing/here", config={})
    assert not reply["ok"] and reply["error"]["code"] == "target_not_supported"
    reply = await control.call("close_session", session="missing")
    assert not reply["ok"] and reply["error"]["code"] == "session_not_found"
    reply = await control.call("frobnicate")
    assert not reply["ok"] and "frobnicate" in reply["error"]["message"]


async def test_wait_session_returns_when_all_processes_are_gone(harness: Harness) -> None:
    control, session, _ = await harness.session()
    peer = await harness.layer(session, pid=6001)
    waiter = await harness.control()

    async def close_soon() -> None:
        await anyio.sleep(0.2)
        await peer.stream.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(close_soon)
        reply = await waiter.call("wait_session", session=session, wait_timeout=5)
    assert reply["result"]["registered"] is True
    del control


async def test_wait_session_waits_for_a_process_that_registers_soon_after_the_last_left(
    harness: Harness,
) -> None:
    # an IDE's helper (js-debug's version probe) exits before the debuggee registers
    control, session, _ = await harness.session()
    probe = await harness.layer(session, pid=6101)
    waiter = await harness.control()
    done: list[float] = []

    async def wait() -> None:
        await waiter.call("wait_session", session=session, wait_timeout=5)
        done.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.2)
        await probe.stream.aclose()
        await anyio.sleep(1.5)  # after the process's fork grace, within the session's
        debuggee = await harness.layer(session, pid=6102)
        await anyio.sleep(1.0)
        assert not done, "wait_session returned while the debuggee was on its way"
        debuggee_left = time.monotonic()
        await debuggee.stream.aclose()
    assert done and done[0] >= debuggee_left
    del control


async def test_a_client_gone_during_wait_session_closes_its_session_at_once(
    harness: Harness,
) -> None:
    # `mirrord ext` stopped by its IDE before the debuggee registered: the daemon must not keep
    # the session (and its agent) until the wait's timeout
    control, session, _ = await harness.session()
    await control.stream.send(
        json.dumps(
            {"id": 99, "op": "wait_session", "session": session, "wait_timeout": 600}
        ).encode()
        + b"\n"
    )
    await anyio.sleep(0.3)
    assert session in harness.daemon.sessions
    await control.stream.aclose()
    with anyio.fail_after(10):
        while session in harness.daemon.sessions:
            await anyio.sleep(0.02)


async def test_a_control_connection_is_answered_while_one_of_its_requests_waits(
    harness: Harness,
) -> None:
    control, session, _ = await harness.session()
    await control.stream.send(
        json.dumps(
            {"id": "w", "op": "wait_session", "session": session, "wait_timeout": 600}
        ).encode()
        + b"\n"
    )
    status = await control.call("session", session=session)
    assert status["ok"], status
    assert session in harness.daemon.sessions


async def test_too_many_unanswered_control_requests_are_refused_not_queued(
    harness: Harness,
) -> None:
    control, session, _ = await harness.session()
    lines = b"".join(
        json.dumps(
            {"id": f"w{n}", "op": "wait_session", "session": session, "wait_timeout": 600}
        ).encode()
        + b"\n"
        for n in range(MAX_CONTROL_INFLIGHT + 1)
    )
    await control.stream.send(lines)
    with anyio.fail_after(10):
        while b"\n" not in control.buffer:
            control.buffer += await control.stream.receive()
    line, control.buffer = control.buffer.split(b"\n", 1)
    refused = json.loads(line)
    assert refused["id"] == f"w{MAX_CONTROL_INFLIGHT}"
    assert refused["error"]["code"] == "bad_request"
    assert "unanswered" in refused["error"]["message"]
    status = await control.call("status")  # still refused while the waits are pending
    assert not status["ok"] and status["error"]["code"] == "bad_request"


async def test_the_daemon_resolves_a_config_request(harness: Harness) -> None:
    control = await harness.control()
    reply = await control.call(
        "create_session",
        config_request={
            "config_file": None,
            "flags": {"target": SCRIPTED_PID_TARGET, "steal": True},
            "env": {"MIRRORD_AGENT_TTL": "3"},
            "cwd": str(harness.paths.root),
        },
    )
    assert reply["ok"], reply
    [session] = harness.daemon.sessions.values()
    assert session.target == SCRIPTED_PID_TARGET
    assert session.incoming_mode == "steal"
    assert session.config.agent.ttl == 3  # MIRRORD_* from the client's environment
    bad = await control.call(
        "create_session",
        config_request={
            "flags": {"target": SCRIPTED_PID_TARGET, "fs_mode": "sideways"},
            "env": {},
        },
    )
    assert not bad["ok"] and bad["error"]["code"] == "config_error"
    assert any("feature.fs.mode" in line for line in bad["error"]["errors"])


async def test_a_new_session_reconnects_to_an_agent_that_is_still_alive(harness: Harness) -> None:
    control, first, _ = await harness.session()
    agent = harness.agent()
    agent.disconnect()  # the stream breaks; the agent (handle) is still alive
    with anyio.fail_after(5):
        while harness.daemon.sessions[first].state != "agent_lost":
            await anyio.sleep(0.01)
    _, second, result = await harness.session()
    assert result["env"]["POD_VAR"] == "pod-value"
    status = (await control.call("status"))["result"]
    [entry] = status["agents"]
    assert entry["streams_opened"] == 2 and agent.streams == 2
    assert len(harness.backend.started) == 1  # the same agent, not a new one
    states = {s["id"]: s["state"] for s in status["sessions"]}
    assert states == {first: "agent_lost", second: "open"}


# Run as another user: listens on a loopback port and reports what it is sent.
_SQUATTER = """
import json, socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
s.settimeout(10)
print(s.getsockname()[1], flush=True)
got = []
try:
    conn, _ = s.accept()
    conn.settimeout(5)
    while len(got) < 10:
        data = conn.recv(4096)
        if not data:
            break
        got.append(data.decode(errors="replace"))
except OSError as e:
    got.append(type(e).__name__)
print(json.dumps(got), flush=True)
"""


async def test_an_incoming_connection_never_goes_to_another_users_listener(
    harness: Harness,
) -> None:
    # The port the app listened on is now another user's (the app's listener was closed where
    # the layer could not see it, and someone took the port): the daemon used to connect there
    # and relay the stolen connection's bytes to it.
    squatter = subprocess.Popen(
        [python_for_the_other_user(), "-c", _SQUATTER],
        user=OTHER_UID,
        group=OTHER_UID,
        extra_groups=[],
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None
        port = int(await anyio.to_thread.run_sync(squatter.stdout.readline))
        _, session, _ = await harness.session()
        peer = await harness.layer(session, pid=os.getpid())
        agent = harness.agent()
        listen = m.LayerListen(request_id=5, port=80, bound_address="127.0.0.1", bound_port=port)
        assert isinstance(await peer.request(listen), m.Ok)
        await agent.send(
            m.IncomingConnection(
                conn_id=7,
                port=80,
                remote_address="10.9.9.9",
                remote_port=5555,
                local_address="10.0.0.1",
                local_port=80,
                mode="steal",
            ),
            peer.process,
        )
        await agent.send(m.Data(conn_id=7, data=b"GET /pod-only-secret"), peer.process)
        with anyio.fail_after(10):
            while not any(isinstance(x, m.ConnClose) for _, x in agent.received):
                await anyio.sleep(0.01)
        closes = [x for _, x in agent.received if isinstance(x, m.ConnClose)]
        assert closes[0].conn_id == 7 and closes[0].errno == errno.ECONNREFUSED, closes
        out, err = await anyio.to_thread.run_sync(lambda: squatter.communicate(timeout=20))
    finally:
        if squatter.poll() is None:
            squatter.kill()
            squatter.wait(timeout=5)
    got = json.loads(out.splitlines()[-1])
    assert not [g for g in got if "pod-only-secret" in g], (got, err)
