"""The agent, end to end: a real `mirrord-agent` next to a real local pod, driven through the
agent protocol by a daemon stand-in (no layer). Assertions are what a daemon would see."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import (
    AGENT_PROTOCOL_VERSION,
    AgentConnection,
    AgentRole,
    Message,
    RemoteProtocolError,
    encode_frame,
)
from mirrord.protocol import messages as m
from tests import _agent_process as agent_process
from tests._agent_client import AgentClient, AgentError
from tests._agent_process import AgentProc, start_agent, stop_agent

pytestmark = [pytest.mark.netns, pytest.mark.anyio]

O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL = 0, 1, 2, 0o100, 0o200


def _addrs(reply: m.DnsReply) -> list[tuple[object, ...]]:
    return [tuple(a) for a in reply.addresses]


async def _errno_of(coro: object) -> int:
    try:
        await coro  # type: ignore[misc]
    except AgentError as exc:
        return exc.errno
    raise AssertionError("the request succeeded")


# -- command line --------------------------------------------------------------------------------


def test_ready_line_names_version_protocol_and_address(agent: AgentProc) -> None:
    assert agent.ready_line == (
        f"mirrord-agent ready version=0.1.0 protocol={AGENT_PROTOCOL_VERSION} "
        f"listen=unix:{agent.socket}\n"
    )


def test_bad_arguments_and_missing_targets_exit_with_a_clear_error(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("x")
    base = [sys.executable, "-m", "mirrord.agent", "--listen", f"unix:{tmp_path}/a.sock"]
    cases = [
        (["--target", "pid/999999999", "--secret-file", str(secret)], 3, "does not exist"),
        (
            ["--target", "container/0123456789abcdef0", "--secret-file", str(secret)],
            3,
            "no process",
        ),
        (["--target", "deployment/x", "--secret-file", str(secret)], 2, "pid/N or container/ID"),
        (["--target", "pid/1"], 2, "no agent secret"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MIRRORD_AGENT_SECRET"}
    for args, code, text in cases:
        proc = subprocess.run(
            [*base, *args], check=False, capture_output=True, text=True, timeout=30, env=env
        )
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.startswith("mirrord-agent: error: "), proc.stderr
        assert text in proc.stderr
        assert proc.stdout == ""


def _agent_with_ready_fd(
    target: str, tmp_path: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    """A real agent given the write end of a pipe as --ready-fd (and `extra` arguments), its
    stdin a pipe; returns it and the pipe's read end."""
    secret = tmp_path / "s"
    secret.write_text("x")
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mirrord.agent", "--target", target, *extra, "--secret-file",
             str(secret), "--listen", f"unix:{tmp_path}/a.sock", "--ready-fd", str(w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(w,),
        )  # fmt: skip
    finally:
        os.close(w)
    return proc, r


def _read_to_end(fd: int, timeout: float = 30) -> bytes:
    """What the pipe gives until its end (all writers closed); bounded by `timeout`."""
    got = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return got
            got += chunk
    raise AssertionError(f"the ready pipe did not close within {timeout} s (got {got!r})")


def test_ready_fd_gets_the_ready_line_then_its_end(pod: LocalPod, tmp_path: Path) -> None:
    proc, r = _agent_with_ready_fd(f"pid/{pod.pid}", tmp_path)
    try:
        got = _read_to_end(r)
        assert proc.poll() is None  # closed by the agent once ready, not by its exit
        assert proc.stdout is not None
        stdout_line = proc.stdout.readline()
        assert got == stdout_line
        assert got.startswith(b"mirrord-agent ready version=") and got.endswith(b"\n")
        # the fd was not passed on to what the agent started (its pod helpers): none holds it
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            fds = Path(f"/proc/{child}/fd")
            targets = {os.readlink(fds / fd) for fd in os.listdir(fds)}
            assert f"pipe:[{os.fstat(r).st_ino}]" not in targets
    finally:
        os.close(r)
        proc.terminate()
        proc.communicate(timeout=15)


def test_ready_fd_of_an_agent_that_fails_closes_without_the_line(tmp_path: Path) -> None:
    proc, r = _agent_with_ready_fd("pid/999999999", tmp_path)
    try:
        assert _read_to_end(r) == b""
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 3 and b"does not exist" in err
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=15)


def _standby(target: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A real agent started with --standby (its settings to come on stdin) and --ready-fd."""
    return _agent_with_ready_fd(target, tmp_path, "--standby")


async def test_a_standby_agent_serves_once_it_is_given_its_settings_on_stdin(
    pod: LocalPod, tmp_path: Path
) -> None:
    proc, r = _standby(f"pid/{pod.pid}", tmp_path)
    try:
        assert proc.stdin is not None
        time.sleep(0.5)  # it waits: loaded, but neither ready nor listening
        assert proc.poll() is None and not (tmp_path / "a.sock").exists()
        given = {"idle_timeout": 30}
        proc.stdin.write(json.dumps(given).encode() + b"\n")
        proc.stdin.close()
        proc.stdin = None  # closed: nothing more for communicate() to flush
        assert _read_to_end(r).startswith(b"mirrord-agent ready ")
        async with AgentClient.open_unix(f"{tmp_path}/a.sock", "x") as client:
            await client.open_channel(1)
            assert await client.read_file(1, b"/app/test.txt") == b"hello from the pod\n"
    finally:
        os.close(r)
        proc.terminate()
        proc.communicate(timeout=15)


def test_a_standby_agent_whose_stdin_ends_exits_quietly(pod: LocalPod, tmp_path: Path) -> None:
    proc, r = _standby(f"pid/{pod.pid}", tmp_path)
    try:
        out, err = proc.communicate(b"", timeout=30)  # stdin's end, and no target
        assert proc.returncode == 0 and out == b"" and err == b""
        assert _read_to_end(r) == b""
        assert not (tmp_path / "a.sock").exists()
    finally:
        os.close(r)


def test_a_standby_agent_given_no_settings_says_so(pod: LocalPod, tmp_path: Path) -> None:
    proc, r = _standby(f"pid/{pod.pid}", tmp_path)
    try:
        _, err = proc.communicate(b'{"env": {}}\n', timeout=30)
        assert proc.returncode == 2
        assert err.startswith(b"mirrord-agent: error: --standby: no settings on stdin"), err
        assert _read_to_end(r) == b""
    finally:
        os.close(r)


async def test_a_subscribe_right_after_the_ready_line_waits_for_the_incoming_service(
    pod: LocalPod,
) -> None:
    """The incoming service loads after the ready line: a Subscribe sent at once is answered
    once it has started, not refused."""
    port = pod.spec.http_port
    assert port is not None
    agent = start_agent(f"pid/{pod.pid}", settled=False)
    try:
        async with AgentClient.open(agent) as client:
            await client.open_channel(1)
            reply = await client.request(
                1, lambda r: m.Subscribe(request_id=r, port=port, mode="mirror")
            )
            assert isinstance(reply, m.Subscribed) and reply.port == port
        assert "incoming traffic is unavailable" not in agent.log()
    finally:
        stop_agent(agent)


def test_an_agent_that_never_settles_fails_its_start_and_is_stopped(
    pod: LocalPod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test helper's wait for the incoming service fails loudly (with the log) instead of
    returning as if settled, and leaves no agent behind: at warning level the agent never logs
    that its incoming service started."""
    monkeypatch.setattr(agent_process, "_SETTLE_TIMEOUT", 1.0)
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(AssertionError, match="neither started nor failed"):
        start_agent(f"pid/{pod.pid}", "--log-level", "warning")
    assert len(started) == 1 and started[0].poll() is not None


def test_idle_timeout_ends_the_agent(pod: LocalPod) -> None:
    agent = start_agent(f"pid/{pod.pid}", "--idle-timeout", "0.5")
    try:
        assert agent.wait(timeout=10) == 0
        assert "idle timeout" in agent.log()
    finally:
        stop_agent(agent)


async def test_listens_on_tcp_too(pod: LocalPod) -> None:
    agent = start_agent(f"pid/{pod.pid}", secret="tcp-secret", listen="tcp:127.0.0.1:0")
    try:
        line = agent.ready_line
        assert line.startswith("mirrord-agent ready ") and " listen=tcp:127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1])
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with AgentClient.over(stream, "tcp-secret") as client:
            await client.open_channel(1)
            assert await client.read_file(1, b"/app/test.txt") == b"hello from the pod\n"
    finally:
        stop_agent(agent)


async def test_secret_from_environment(pod: LocalPod) -> None:
    agent = start_agent(f"pid/{pod.pid}", secret="from-env", secret_in_env=True)
    try:
        argv = agent.proc.args
        assert isinstance(argv, list) and "--secret-file" not in argv
        async with AgentClient.open(agent) as client:
            assert client.welcome.target == f"pid/{pod.pid}"
    finally:
        stop_agent(agent)


def test_container_target_is_found_through_its_cgroup(
    pod: LocalPod, make_agent: Callable[..., AgentProc]
) -> None:
    groups = Path("/sys/fs/cgroup/pids")
    for stale in groups.glob("mrd*-*"):  # left by a killed earlier run whose creator is dead
        creator = stale.name[3:].split("-", 1)[0]
        if creator.isdigit() and not Path(f"/proc/{creator}").exists():
            with contextlib.suppress(OSError):
                stale.rmdir()
    container_id = f"{os.getpid():x}deadbeef{pod.pid:x}".ljust(32, "0")
    group = groups / f"mrd{os.getpid()}-{container_id}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pod.pid))
        agent = make_agent(f"container/{container_id}")
        assert agent.proc.poll() is None

        async def check() -> None:
            async with AgentClient.open(agent) as client:
                assert client.welcome.target == f"container/{container_id}"
                await client.open_channel(1)
                assert await client.read_file(1, b"/app/test.txt") == b"hello from the pod\n"

        anyio.run(check, backend="trio")
    finally:
        Path("/sys/fs/cgroup/pids/cgroup.procs").write_text(str(pod.pid))
        group.rmdir()


# -- handshake and isolation ---------------------------------------------------------------------


async def test_wrong_secret_gets_an_error_frame_and_only_that_connection_closes(
    agent: AgentProc,
) -> None:
    async with AgentClient.open(agent) as good:
        await good.open_channel(1)
        bad = await anyio.connect_unix(agent.socket)
        async with bad:
            conn = AgentConnection(AgentRole.DAEMON, secret="wrong")
            await _hello_refused(bad, conn, "unauthenticated")
        assert await good.read_file(1, b"/app/test.txt") == b"hello from the pod\n"


async def _receive_or_empty(stream: anyio.abc.ByteStream) -> bytes:
    try:
        return await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return b""


async def _hello_refused(stream: anyio.abc.ByteStream, conn: AgentConnection, why: str) -> None:
    """Send `conn`'s Hello; the agent answers with an error frame naming `why`, and closes."""
    await stream.send(conn.hello())
    data = b""
    with anyio.fail_after(10):
        while chunk := await _receive_or_empty(stream):
            data += chunk
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=why):
        conn.next_event()


async def test_version_mismatch_gets_an_error_frame(agent: AgentProc) -> None:
    stream = await anyio.connect_unix(agent.socket)
    async with stream:
        conn = AgentConnection(AgentRole.DAEMON, secret=agent.secret, version=99, min_version=90)
        await _hello_refused(stream, conn, "version_mismatch")


async def test_malformed_frame_and_unknown_kinds(agent: AgentProc) -> None:
    async with AgentClient.open(agent) as good, AgentClient.open(agent) as broken:
        await good.open_channel(1)
        await broken.open_channel(1)
        # An unknown kind that looks like a request gets ENOSYS; the connection stays.
        await broken.stream.send(encode_frame([1, 99, 4242]))
        with anyio.fail_after(10):
            while not any(isinstance(msg, m.ErrorReply) for _, msg in broken.other):
                await anyio.sleep(0.02)
        reply = next(msg for _, msg in broken.other if isinstance(msg, m.ErrorReply))
        assert (reply.request_id, reply.errno) == (4242, errno.ENOSYS)
        assert await broken.read_file(1, b"/app/test.txt") == b"hello from the pod\n"
        # A malformed frame closes that connection only, after a Fatal frame.
        await broken.stream.send(b"\x00\x00\x00\x02\xff\xff")
        with anyio.fail_after(10):
            await broken.ended.wait()
        assert broken.fatal is not None and broken.fatal.code == "malformed_frame"
        assert await good.read_file(1, b"/app/test.txt") == b"hello from the pod\n"


async def test_requests_on_a_channel_never_opened_fail_alone(agent: AgentProc) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        code = await _errno_of(client.request(7, lambda r: m.HostnameRequest(request_id=r)))
        assert code == errno.EBADF
        pong_seen = len(client.other)
        await client.send(m.Ping(nonce=5), 1)
        with anyio.fail_after(5):
            while len(client.other) == pong_seen:
                await anyio.sleep(0.02)
        assert client.other[-1] == (1, m.Pong(nonce=5))


# -- files ---------------------------------------------------------------------------------------

_SPEC_FILES = PodSpec(
    files={
        "/app/test.txt": b"pod bytes\n",
        "/etc/shadow": b"the pod's shadow\n",
        "/etc/only-in-pod.conf": b"pod conf\n",
    },
    symlinks={
        "/app/shadow-link": "/etc/shadow",
        "/app/deep/up-link": "../../../../../../../../etc/shadow",
        "/app/proc-link": "/proc/self/root/etc/shadow",
    },
)


async def test_files_come_from_the_pod_and_never_escape_its_root(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(_SPEC_FILES)
    agent = make_agent(f"pid/{pod.pid}")
    host_shadow = Path("/etc/shadow").read_bytes()
    assert host_shadow != b"the pod's shadow\n"
    assert not Path("/etc/only-in-pod.conf").exists()
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        read = client.read_file
        assert await read(1, b"/app/test.txt") == b"pod bytes\n"
        assert await read(1, b"/etc/only-in-pod.conf") == b"pod conf\n"
        assert await read(1, b"/app/shadow-link") == b"the pod's shadow\n"
        assert await read(1, b"/app/deep/up-link") == b"the pod's shadow\n"
        assert await read(1, b"/../../../../etc/shadow") == b"the pod's shadow\n"
        assert await read(1, b"app/../../../etc/shadow") == b"the pod's shadow\n"
        # Magic links could name anything on the node: refused.
        code = await _errno_of(read(1, b"/app/proc-link"))
        assert code in (errno.ELOOP, errno.EXDEV)
        # `..` above the root lists the pod's root, not the host's.
        opened = await client.request(1, lambda r: m.DirOpen(request_id=r, path=b"/../../.."))
        batch = await client.request(
            1, lambda r: m.DirRead(request_id=r, handle=opened.handle, max_entries=100)
        )
        names = {e[0] for e in batch.entries}
        assert b"app" in names and b"etc" in names
        assert (
            not Path("/app/test.txt").exists()
            or Path("/app/test.txt").read_bytes() != b"pod bytes\n"
        )
        code = await _errno_of(read(1, b"/no/such/file"))
        assert code == errno.ENOENT


def _open_req(request_id: int, *, path: bytes, flags: int) -> Message:
    return m.FileOpen(request_id=request_id, path=path, flags=flags)


def _unlink_req(request_id: int, *, path: bytes) -> Message:
    return m.Unlink(request_id=request_id, path=path)


_Req = Callable[[Callable[[int], Message]], Awaitable[Message]]


async def _directory_stream_and_removal(req: _Req, pod: LocalPod) -> None:
    """/app/work (holding g and link) gets 40 files, is read in batches, then emptied and
    removed (rmdir refused while it is not empty)."""
    for i in range(40):
        path = f"/app/work/n{i}".encode()
        await req(functools.partial(_open_req, path=path, flags=O_WRONLY | O_CREAT | O_EXCL))
    d = await req(lambda r: m.DirOpen(request_id=r, path=b"/app/work"))
    assert isinstance(d, m.DirOpened)
    dh = d.handle
    seen: list[tuple[bytes, int, int]] = []
    for _ in range(10):
        batch = await req(lambda r: m.DirRead(request_id=r, handle=dh, max_entries=16))
        assert isinstance(batch, m.DirEntries) and len(batch.entries) <= 16
        if not batch.entries:
            break
        seen += batch.entries
    names = {e[0]: e[2] for e in seen}
    assert len(seen) == 44 and names[b"."] == 4 and names[b"link"] == 10 and names[b"n7"] == 8
    await req(lambda r: m.DirClose(request_id=r, handle=dh))

    code = await _errno_of(req(lambda r: m.Rmdir(request_id=r, path=b"/app/work")))
    assert code == errno.ENOTEMPTY
    code = await _errno_of(req(lambda r: m.DirOpen(request_id=r, path=b"/app/test.txt")))
    assert code == errno.ENOTDIR
    for name in [b"g", b"link", *(f"n{i}".encode() for i in range(40))]:
        await req(functools.partial(_unlink_req, path=b"/app/work/" + name))
    await req(lambda r: m.Rmdir(request_id=r, path=b"/app/work"))
    assert pod.run_in_pod(["ls", "/app"]).stdout.split() == [b"test.txt"]


async def test_every_file_operation(agent: AgentProc, pod: LocalPod) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)

        async def req(make: Callable[[int], Message]) -> Message:
            reply: Message = await client.request(1, make)
            return reply

        await req(lambda r: m.Mkdir(request_id=r, path=b"/app/work", mode=0o755))
        assert (
            await _errno_of(req(lambda r: m.Mkdir(request_id=r, path=b"/app/work"))) == errno.EEXIST
        )
        opened = await req(
            lambda r: m.FileOpen(
                request_id=r, path=b"/app/work/f", flags=O_RDWR | O_CREAT, mode=0o640
            )
        )
        assert isinstance(opened, m.FileOpened)
        h = opened.handle
        w = await req(lambda r: m.FileWrite(request_id=r, handle=h, data=b"hello world"))
        assert isinstance(w, m.FileWritten) and w.count == 11
        await req(lambda r: m.FileWrite(request_id=r, handle=h, data=b"W", offset=6))
        pos = await req(lambda r: m.FileSeek(request_id=r, handle=h, offset=0, whence=os.SEEK_SET))
        assert isinstance(pos, m.FilePosition) and pos.position == 0
        data = await req(lambda r: m.FileRead(request_id=r, handle=h, size=5))
        assert isinstance(data, m.FileData) and data.data == b"hello"
        data = await req(lambda r: m.FileRead(request_id=r, handle=h, size=100, offset=6))
        assert isinstance(data, m.FileData) and data.data == b"World"
        st = await req(lambda r: m.FileStat(request_id=r, handle=h))
        assert isinstance(st, m.StatReply)
        assert st.stat[7] == 11 and st.stat[2] & 0o777 == 0o640
        await req(lambda r: m.Ftruncate(request_id=r, handle=h, length=5))
        await req(lambda r: m.Fchmod(request_id=r, handle=h, mode=0o600))
        await req(lambda r: m.Fsync(request_id=r, handle=h))
        st = await req(lambda r: m.FileStat(request_id=r, path=b"/app/work/f"))
        assert isinstance(st, m.StatReply) and st.stat[7] == 5 and st.stat[2] & 0o777 == 0o600
        fs = await req(lambda r: m.StatFs(request_id=r, handle=h))
        assert isinstance(fs, m.StatFsReply) and fs.statfs[0] == 0x01021994  # the pod's tmpfs
        fs = await req(lambda r: m.StatFs(request_id=r, path=b"/app"))
        assert isinstance(fs, m.StatFsReply) and fs.statfs[0] == 0x01021994
        await req(lambda r: m.FileClose(request_id=r, handle=h))
        assert (
            await _errno_of(req(lambda r: m.FileRead(request_id=r, handle=h, size=1)))
            == errno.EBADF
        )

        await req(lambda r: m.Rename(request_id=r, old=b"/app/work/f", new=b"/app/work/g"))
        assert pod.run_in_pod(["cat", "/app/work/g"]).stdout == b"hello"
        assert not Path("/app/work/g").exists()
        await req(lambda r: m.FileAccess(request_id=r, path=b"/app/work/g", mode=os.R_OK))
        code = await _errno_of(req(lambda r: m.FileAccess(request_id=r, path=b"/app/nope", mode=0)))
        assert code == errno.ENOENT

        pod.run_in_pod(["ln", "-s", "/app/work/g", "/app/work/link"])
        link = await req(lambda r: m.ReadLink(request_id=r, path=b"/app/work/link"))
        assert isinstance(link, m.ReadLinkReply) and link.target == b"/app/work/g"
        lst = await req(lambda r: m.FileStat(request_id=r, path=b"/app/work/link", follow=False))
        st = await req(lambda r: m.FileStat(request_id=r, path=b"/app/work/link", follow=True))
        assert isinstance(lst, m.StatReply) and isinstance(st, m.StatReply)
        assert lst.stat[2] & 0o170000 == 0o120000 and st.stat[2] & 0o170000 == 0o100000
        code = await _errno_of(req(lambda r: m.ReadLink(request_id=r, path=b"/app/work/g")))
        assert code == errno.EINVAL

        await _directory_stream_and_removal(req, pod)

        # fdopendir: a directory opened as a file becomes a directory stream.
        f = await req(lambda r: m.FileOpen(request_id=r, path=b"/app", flags=O_RDONLY | 0o200000))
        assert isinstance(f, m.FileOpened)
        d = await req(lambda r: m.DirOpen(request_id=r, handle=f.handle))
        assert isinstance(d, m.DirOpened)
        batch = await req(lambda r: m.DirRead(request_id=r, handle=d.handle))
        assert isinstance(batch, m.DirEntries) and b"test.txt" in {e[0] for e in batch.entries}


async def test_channels_have_their_own_handles_and_fork_copies_them(agent: AgentProc) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        await client.open_channel(2)
        f = await client.request(
            1, lambda r: m.FileOpen(request_id=r, path=b"/app/test.txt", flags=0)
        )
        # Handle numbers are per channel: channel 2 has no such handle.
        code = await _errno_of(
            client.request(2, lambda r: m.FileRead(request_id=r, handle=f.handle, size=4))
        )
        assert code == errno.EBADF
        first = await client.request(1, lambda r: m.FileRead(request_id=r, handle=f.handle, size=6))
        assert first.data == b"hello "
        # A forked child (ChannelOpen with parent) shares the open file, offset included.
        await client.open_channel(3, parent=1)
        rest = await client.request(
            3, lambda r: m.FileRead(request_id=r, handle=f.handle, size=100)
        )
        assert rest.data == b"from the pod\n"
        await client.close_channel(1)
        again = await client.request(
            3, lambda r: m.FileRead(request_id=r, handle=f.handle, size=100, offset=0)
        )
        assert again.data == b"hello from the pod\n"
        # The closed channel's handles are gone; the others work.
        code = await _errno_of(
            client.request(1, lambda r: m.FileRead(request_id=r, handle=f.handle, size=4))
        )
        assert code == errno.EBADF
        assert await client.read_file(2, b"/app/test.txt") == b"hello from the pod\n"


# -- env -----------------------------------------------------------------------------------------


async def test_env_include_and_exclude(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(PodSpec(env={"DB_URL": "postgres://db", "DB_USER": "app", "API_KEY": "k3y"}))
    agent = make_agent(f"pid/{pod.pid}")
    async with AgentClient.open(agent) as client:

        async def env(include: list[str], exclude: list[str]) -> dict[str, str]:
            reply = await client.request(
                0, lambda r: m.EnvRequest(request_id=r, include=include, exclude=exclude)
            )
            return reply.env  # type: ignore[no-any-return]

        everything = await env([], [])
        assert everything == {
            "PATH": pod.env["PATH"],
            "DB_URL": "postgres://db",
            "DB_USER": "app",
            "API_KEY": "k3y",
        }
        assert await env(["DB_URL"], []) == {"DB_URL": "postgres://db"}
        assert await env(["DB_*"], []) == {"DB_URL": "postgres://db", "DB_USER": "app"}
        assert "API_KEY" not in await env([], ["API_KEY"])
        assert await env(["DB_*"], ["*_USER"]) == {"DB_URL": "postgres://db"}
    assert "k3y" not in agent.log() and "postgres" not in agent.log()


# -- DNS and hostname ----------------------------------------------------------------------------


async def test_dns_uses_the_pods_files_and_network(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(
        PodSpec(
            hosts={"only-in-pod-hosts.test": "10.213.77.1"},
            dns_records={"db.cluster.test": "10.213.88.8", "v6only.cluster.test": "fd00:213::8"},
            resolv_conf="search cluster.test\nnameserver 127.0.0.1\noptions ndots:1 timeout:1 attempts:1\n",
        )
    )
    agent = make_agent(f"pid/{pod.pid}")
    stream, dgram, raw = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW
    async with AgentClient.open(agent) as client:

        async def lookup(host: str, **kw: int) -> m.DnsReply:
            return await client.request(0, lambda r: m.DnsLookup(request_id=r, host=host, **kw))  # type: ignore[no-any-return]

        reply = await lookup("only-in-pod-hosts.test", port=80, socktype=stream)
        assert _addrs(reply) == [(socket.AF_INET, stream, socket.IPPROTO_TCP, "10.213.77.1", 80)]
        # "vm" is in the host's /etc/hosts only (and the pod's DNS knows nothing of it).
        assert "vm" in Path("/etc/hosts").read_text().split()
        code = await _errno_of(lookup("vm"))
        assert code == socket.EAI_NONAME
        # Through the pod's resolv.conf (search domain) and its DNS server on the pod's loopback.
        reply = await lookup("db", socktype=stream)
        assert _addrs(reply) == [(socket.AF_INET, stream, 6, "10.213.88.8", 0)]
        reply = await lookup("db.cluster.test", flags=0x2)
        assert reply.canonname == "db.cluster.test"
        assert [tuple(a[:3]) for a in reply.addresses] == [
            (socket.AF_INET, stream, 6),
            (socket.AF_INET, dgram, 17),
            (socket.AF_INET, raw, 0),
        ]
        reply = await lookup("v6only.cluster.test", family=socket.AF_INET6, socktype=dgram, port=53)
        assert _addrs(reply) == [(socket.AF_INET6, dgram, 17, "fd00:213::8", 53)]
        code = await _errno_of(lookup("v6only.cluster.test", family=socket.AF_INET))
        assert code == socket.EAI_NODATA
        code = await _errno_of(lookup("nothing-here.test"))
        assert code == socket.EAI_NONAME
        # Numeric hosts, localhost, AI_NUMERICHOST, bad family.
        reply = await lookup("10.1.2.3", socktype=stream, port=5)
        assert _addrs(reply) == [(socket.AF_INET, stream, 6, "10.1.2.3", 5)]
        reply = await lookup("::1", socktype=stream)
        assert _addrs(reply) == [(socket.AF_INET6, stream, 6, "::1", 0)]
        reply = await lookup("localhost", socktype=stream, family=socket.AF_INET)
        assert _addrs(reply) == [(socket.AF_INET, stream, 6, "127.0.0.1", 0)]
        code = await _errno_of(lookup("db", flags=0x4))
        assert code == socket.EAI_NONAME
        code = await _errno_of(lookup("db", family=socket.AF_UNIX))
        assert code == socket.EAI_FAMILY
        reply = await lookup("", socktype=stream, flags=0x1, family=socket.AF_INET, port=8080)
        assert _addrs(reply) == [(socket.AF_INET, stream, 6, "0.0.0.0", 8080)]
        hostname = await client.request(0, lambda r: m.HostnameRequest(request_id=r))
        assert hostname.hostname == pod.hostname != socket.gethostname()


async def test_dns_to_a_nameserver_nobody_listens_on_fails_as_fast_as_glibc(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    """Nothing answers on the pod's nameserver port: the kernel answers "port unreachable",
    which glibc's connected UDP socket sees at once (ECONNREFUSED): the lookup fails in
    milliseconds, not after `timeout:10 attempts:3` (30 s) as with an unconnected socket."""
    pod = make_pod(PodSpec(resolv_conf="nameserver 127.0.0.1\noptions timeout:10 attempts:3\n"))
    glibc = pod.run_in_pod(
        [
            sys.executable,
            "-c",
            "import socket, time; t = time.monotonic()\n"
            "try: socket.getaddrinfo('db.cluster.test', 80)\n"
            "except socket.gaierror as e: print(e.errno, time.monotonic() - t)",
        ],
        timeout=60,
    )
    glibc_code, glibc_took = glibc.stdout.decode().split()
    assert float(glibc_took) < 10  # what the pod's own programs get
    agent = make_agent(f"pid/{pod.pid}")
    async with AgentClient.open(agent) as client:
        started = time.monotonic()
        code = await _errno_of(
            client.request(0, lambda r: m.DnsLookup(request_id=r, host="db.cluster.test"))
        )
        took = time.monotonic() - started
    assert code == int(glibc_code) == socket.EAI_AGAIN
    assert took < 10, took  # generous: the resolver's timeout is 30 s


# -- outgoing ------------------------------------------------------------------------------------

_BANNER_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"pod-loopback-" + sys.argv[1].encode()); c.close()
"""


async def test_connect_to_the_pods_loopback_works_only_through_the_agent(
    agent: AgentProc, pod: LocalPod
) -> None:
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    server = pod.popen_in_pod([sys.executable, "-c", _BANNER_SERVER, token])
    assert server.stdout is not None
    port = int(server.stdout.readline())
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        conn = await client.connect(1, "127.0.0.1", port)
        with anyio.fail_after(10):
            assert await conn.receive_all() == f"pod-loopback-{token}".encode()
            await conn.shutdown()  # our half: the relay ends when both halves are closed
            await conn.closed.wait()
        assert conn.closed_errno == 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as host_conn:
            assert token.encode() not in host_conn.recv(100)
    except OSError:
        pass  # refused on the host: what we expect


_V6_ECHO = """
import socket
s = socket.socket(socket.AF_INET6); s.bind(("::1", 0)); s.listen(4)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
while data := c.recv(65536):
    c.sendall(data)
c.close()
"""


async def test_outgoing_ipv6(agent: AgentProc, pod: LocalPod) -> None:
    server = pod.popen_in_pod([sys.executable, "-c", _V6_ECHO])
    assert server.stdout is not None
    port = int(server.stdout.readline())
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        conn = await client.connect(1, "::1", port)
        await conn.send(b"over v6")
        await conn.shutdown()
        with anyio.fail_after(10):
            assert await conn.receive_all() == b"over v6"
            await conn.closed.wait()
        assert conn.closed_errno == 0


async def test_outgoing_errors_are_errnos(
    pod: LocalPod, make_agent: Callable[..., AgentProc]
) -> None:
    pod.run_in_pod(["ip", "route", "add", "unreachable", "10.213.252.0/24"])
    pod.run_in_pod(["ip", "route", "add", "10.213.253.7/32", "dev", "eth0"])
    agent = make_agent(f"pid/{pod.pid}", "--connect-timeout", "0.5")
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        assert await _errno_of(client.connect(1, "127.0.0.1", 1)) == errno.ECONNREFUSED
        assert await _errno_of(client.connect(1, "10.213.252.1", 80)) == errno.EHOSTUNREACH
        assert await _errno_of(client.connect(1, "10.213.253.7", 80)) == errno.ETIMEDOUT
        assert await _errno_of(client.connect(1, "not-an-ip", 80)) == errno.EINVAL
        # A plain TCP echo still works on the same channel after the failures.
        conn = await client.connect(1, pod.ip, 7777)
        await conn.send(b"x")
        await conn.shutdown()
        assert await conn.receive_all() == b"x"


async def test_connected_udp(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(PodSpec(dns_records={"u.test": "10.213.99.9"}))
    agent = make_agent(f"pid/{pod.pid}")
    query = bytes.fromhex("abcd01000001000000000000") + b"\x01u\x04test\x00" + b"\x00\x01\x00\x01"
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        conn = await client.connect(1, "127.0.0.1", 53, protocol="udp")
        await conn.send(query)
        with anyio.fail_after(5):
            answer = await conn.receive()
        assert answer[:2] == b"\xab\xcd" and answer.endswith(socket.inet_aton("10.213.99.9"))
        await conn.close()


async def test_200_concurrent_connections_each_echo_1_mib(agent: AgentProc, pod: LocalPod) -> None:
    payloads = [os.urandom(1024 * 1024) for _ in range(4)]
    failures: list[str] = []
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)

        async def one(i: int) -> None:
            payload = payloads[i % 4]
            conn = await client.connect(1, pod.ip if i % 2 else "127.0.0.1", 7777)
            async with anyio.create_task_group() as tg:

                async def sender() -> None:
                    await conn.send(payload)
                    await conn.shutdown()

                tg.start_soon(sender)
                got = await conn.receive_all()
            if got != payload:
                failures.append(f"conn {i}: {len(got)} bytes")

        with anyio.fail_after(80):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
    assert failures == []


async def test_two_daemon_connections_50_channels_each_interleaved(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    files = {
        f"/app/ch/{c}-{n}.txt": f"file {c} {n} ".encode() * 300 for c in range(2) for n in range(50)
    }
    pod = make_pod(PodSpec(files=files))
    agent = make_agent(f"pid/{pod.pid}")
    wrong: list[str] = []

    async def channel_work(client: AgentClient, c: int, n: int) -> None:
        number = n + 1
        await client.open_channel(number)
        conn = await client.connect(number, "127.0.0.1", 7777)
        mark = f"<conn {c} chan {number}>".encode() * 2000
        for _ in range(3):
            if (
                await client.read_file(number, f"/app/ch/{c}-{n}.txt".encode())
                != files[f"/app/ch/{c}-{n}.txt"]
            ):
                wrong.append(f"file {c}/{number}")
            await conn.send(mark)
            if await conn.receive_exactly(len(mark)) != mark:
                wrong.append(f"data {c}/{number}")
        await conn.shutdown()
        if await conn.receive_all() != b"":
            wrong.append(f"extra {c}/{number}")

    async def daemon(c: int) -> None:
        async with AgentClient.open(agent) as client, anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(channel_work, client, c, n)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon, 0)
            tg.start_soon(daemon, 1)
    assert wrong == []


# -- lifetime and cleanup ------------------------------------------------------------------------


async def test_killing_the_target_ends_the_agent_with_the_reason(
    pod: LocalPod, agent: AgentProc
) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        os.kill(pod.pid, signal.SIGKILL)
        with anyio.fail_after(10):
            await client.ended.wait()
        assert client.fatal is not None and client.fatal.code == "target_gone"
    assert agent.wait(timeout=10) == 3
    log = agent.log()
    assert f"mirrord-agent: error: target pid/{pod.pid} exited" in log


async def test_killing_a_daemon_connection_frees_its_fds_and_sockets(
    agent: AgentProc, pod: LocalPod
) -> None:
    async with AgentClient.open(agent) as warm:  # lets the agent create its lazy threads/fds first
        await warm.open_channel(1)
        await warm.read_file(1, b"/app/test.txt")
        await warm.request(1, lambda r: m.HostnameRequest(request_id=r))
    await anyio.sleep(0.2)
    before = agent.open_fds()
    async with AgentClient.open(agent) as client:
        for channel in (1, 2):
            await client.open_channel(channel)
            for _ in range(10):
                await client.request(
                    channel, lambda r: m.FileOpen(request_id=r, path=b"/app/test.txt", flags=0)
                )
                await client.request(channel, lambda r: m.DirOpen(request_id=r, path=b"/app"))
                conn = await client.connect(channel, pod.ip, 7777)
                await conn.send(b"ping")
                assert await conn.receive_exactly(4) == b"ping"
        during = agent.open_fds()
        assert during >= before + 60
        await client.stream.aclose()  # the daemon goes away without closing anything
    with anyio.fail_after(10):
        while agent.open_fds() > before:
            await anyio.sleep(0.05)
    assert agent.open_fds() == before
    assert agent.proc.poll() is None
