"""A large `FileWrite` from a unix socket: its data goes from the daemon's socket into pipes
and from them into the file (`DaemonSession._piped_write`), with the same bytes, counts and
errors as a write from memory, and every pipe is released whatever happens (written, failed,
refused, cut short)."""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord._splice import PipePool
from mirrord.agent._files_inline import write_from_pipes
from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import encode_frame
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentError
from tests._agent_process import AgentProc
from tests._pipes import open_pipes, piped

pytestmark = [pytest.mark.netns, pytest.mark.anyio]

O_RDONLY, O_WRONLY, O_APPEND = 0, 1, 0o2000
MiB = 1 << 20


def _replies(log: str, kind: str) -> int:
    """The requests of `kind` the agent's debug log shows answered."""
    return len(re.findall(rf"channel \d+: {kind} \d+ -> ", log))


def _pipes(agent: AgentProc) -> int:
    return open_pipes(agent.pid)


async def _open(client: AgentClient, path: bytes, flags: int) -> int:
    opened = await client.request(1, lambda r: m.FileOpen(request_id=r, path=path, flags=flags))
    return int(opened.handle)


async def test_a_large_write_goes_from_the_socket_through_pipes_into_the_file(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    size = 3 * MiB
    pod = make_pod(PodSpec(name="pipedw", files={"/app/out.bin": bytes(size)}))
    agent = make_agent(f"pid/{pod.pid}", "--log-level", "debug")
    first, second = os.urandom(MiB), os.urandom(MiB - 4096)
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        handle = await _open(client, b"/app/out.bin", O_WRONLY)
        # at an offset that is no page's start, then at the fd's own offset, then a small one
        got = await client.request(
            1, lambda r: m.FileWrite(request_id=r, handle=handle, data=first, offset=4097)
        )
        assert got.count == MiB
        await client.request(
            1, lambda r: m.FileSeek(request_id=r, handle=handle, offset=2 * MiB, whence=0)
        )
        got = await client.request(
            1, lambda r: m.FileWrite(request_id=r, handle=handle, data=second)
        )
        assert got.count == len(second)
        got = await client.request(
            1, lambda r: m.FileWrite(request_id=r, handle=handle, data=b"end")
        )
        assert got.count == 3
        at = await client.request(
            1, lambda r: m.FileSeek(request_id=r, handle=handle, offset=0, whence=1)
        )
        assert at.position == 2 * MiB + len(second) + 3
    want = bytearray(size)
    want[4097 : 4097 + MiB] = first
    want[2 * MiB : 3 * MiB - 4093] = second + b"end"
    assert Path(f"/proc/{pod.pid}/root/app/out.bin").read_bytes() == want
    log = agent.log()
    assert _replies(log, "PipedWrite") == 2, log[-2000:]
    assert _replies(log, "FileWrite") == 1  # the small one, from memory


async def test_writes_that_cannot_come_through_pipes_come_from_memory(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    # an O_APPEND file (splice refuses it) and a handle that is not open: as before
    pod = make_pod(PodSpec(name="pipedapp", files={"/app/log.bin": b"head"}))
    agent = make_agent(f"pid/{pod.pid}", "--log-level", "debug")
    data = os.urandom(MiB)
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        handle = await _open(client, b"/app/log.bin", O_WRONLY | O_APPEND)
        got = await client.request(1, lambda r: m.FileWrite(request_id=r, handle=handle, data=data))
        assert got.count == MiB
        with pytest.raises(AgentError) as failed:
            await client.request(1, lambda r: m.FileWrite(request_id=r, handle=9999, data=data))
        assert failed.value.errno == errno.EBADF
    assert Path(f"/proc/{pod.pid}/root/app/log.bin").read_bytes() == b"head" + data
    log = agent.log()
    assert _replies(log, "PipedWrite") == 0
    assert _replies(log, "FileWrite") == 2


async def test_a_piped_write_that_fails_is_cut_short_or_is_malformed_leaves_no_pipe(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    content = os.urandom(2 * MiB)
    pod = make_pod(PodSpec(name="pipedbad", files={"/app/data.bin": content}))
    agent = make_agent(f"pid/{pod.pid}", "--log-level", "debug")
    before = _pipes(agent)
    data = os.urandom(MiB)
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        # a read-only handle takes the pipes, then the write fails: EBADF, as from memory
        readonly = await _open(client, b"/app/data.bin", O_RDONLY)
        for _ in range(3):
            with pytest.raises(AgentError) as failed:
                await client.request(
                    1, lambda r: m.FileWrite(request_id=r, handle=readonly, data=data, offset=0)
                )
            assert failed.value.errno == errno.EBADF
        # an offset that is no unsigned integer (hand-encoded: no valid message carries it),
        # then one past what a file takes: that request fails, the connection stays
        writable = await _open(client, b"/app/data.bin", O_WRONLY)
        seen = len(client.other)
        await client.stream.send(encode_frame([1, m.FileWrite.KIND, 9001, writable, data, -5]))
        await client.stream.send(
            encode_frame([1, m.FileWrite.KIND, 9002, writable, data, 2**64 - 1])
        )
        assert await client.read_file(1, b"/app/data.bin") == content
        replies = {
            msg.request_id: msg.errno
            for _, msg in client.other[seen:]
            if isinstance(msg, m.ErrorReply)
        }
        assert replies.get(9001) == errno.EINVAL, client.other[seen:]
        assert replies.get(9002) in (errno.EINVAL, errno.EOVERFLOW, errno.EFBIG), replies
        assert client.fatal is None
    # a connection that ends in the middle of a large write's data
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        writable = await _open(client, b"/app/data.bin", O_WRONLY)
        frame = client.conn.send(m.FileWrite(request_id=7, handle=writable, data=data, offset=0), 1)
        await client.send_raw(frame[: len(frame) * 3 // 4])
        # the agent takes the first part into its pipes (more than a pipe holds of the
        # socket's pieces, at times), then the connection ends
        deadline = time.monotonic() + 10
        while _pipes(agent) <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _pipes(agent) > before
    deadline = time.monotonic() + 10
    while _pipes(agent) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pipes(agent) == before  # every pipe closed with its session
    assert Path(f"/proc/{pod.pid}/root/app/data.bin").read_bytes() == content
    log = agent.log()
    # the read-only ones and the one past what a file takes; not the malformed or cut ones
    assert _replies(log, "PipedWrite") == 4
    assert "Traceback" not in log


def test_write_from_pipes_writes_the_head_then_each_pipe_at_its_offset(tmp_path: Path) -> None:
    pool = PipePool()
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(3 * MiB))
    head, one, two = os.urandom(5000), os.urandom(MiB - 5000), os.urandom(300_000)
    fd = os.open(path, os.O_WRONLY)
    try:
        parts = [piped(pool, one), piped(pool, two)]
        assert write_from_pipes(fd, head, parts, 4097) == len(head) + len(one) + len(two)
        assert all(part.left == 0 for part in parts)
        os.lseek(fd, 10, os.SEEK_SET)  # no offset: at the fd's, which moves
        assert write_from_pipes(fd, b"ab", [piped(pool, b"cd")], None) == 4
        assert os.lseek(fd, 0, os.SEEK_CUR) == 14
    finally:
        os.close(fd)
    want = bytearray(3 * MiB)
    want[4097 : 4097 + MiB + 300_000] = head + one + two
    want[10:14] = b"abcd"
    assert path.read_bytes() == want
    pool.close()


def test_write_from_pipes_writes_from_memory_where_splice_is_refused(tmp_path: Path) -> None:
    # splice refuses an O_APPEND file (EINVAL), as a file system without splice_write does:
    # the pipe's bytes are read out and written, with the same result as a write from memory
    pool = PipePool()
    path = tmp_path / "log.bin"
    path.write_bytes(b"start")
    data = os.urandom(200_000)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        part = piped(pool, data)
        assert write_from_pipes(fd, b"head", [part], None) == 4 + len(data)
        assert part.left == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == b"start" + b"head" + data
    pool.close()


def test_write_from_pipes_raises_an_error_before_any_byte(tmp_path: Path) -> None:
    pool = PipePool()
    path = tmp_path / "ro.bin"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        part = piped(pool, b"y" * 100_000)
        with pytest.raises(OSError) as failed:
            write_from_pipes(fd, b"head", [part], 0)
        assert failed.value.errno == errno.EBADF
        assert part.left == 100_000  # not written: released, the pipe is closed, not reused
        part.release()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 10
    pool.close()
