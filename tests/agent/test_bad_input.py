"""Bad input to the agent is its sender's error, never "a bug": NUL bytes in paths and
out-of-range ids, offsets, sizes and times are answered with EINVAL or EOVERFLOW for that
request only, the connection stays, and the agent's log has no traceback."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from mirrord.localpod import LocalPod
from mirrord.protocol import Message, encode_frame
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentError
from tests._agent_process import AgentProc

pytestmark = [pytest.mark.netns, pytest.mark.anyio]

_BAD = (errno.EINVAL, errno.EOVERFLOW)
O_RDONLY, O_RDWR, O_CREAT = 0, 2, 0o100
INT64_MAX = 2**63 - 1


async def _errno_of(client: AgentClient, make: Callable[[int], Message]) -> tuple[int, str]:
    try:
        await client.request(1, make)
    except AgentError as exc:
        return exc.errno, exc.reply.message
    raise AssertionError(f"the request succeeded: {make(0)}")


async def test_nul_bytes_in_any_path_are_einval(agent: AgentProc, pod: LocalPod) -> None:
    nul = b"/app/test.txt\0/etc/shadow"
    requests: list[Callable[[int], Message]] = [
        lambda r: m.FileOpen(request_id=r, path=nul, flags=O_RDONLY),
        lambda r: m.FileFetch(request_id=r, path=nul, flags=O_RDONLY),
        lambda r: m.FileStat(request_id=r, path=nul),
        lambda r: m.StatFs(request_id=r, path=nul),
        lambda r: m.FileAccess(request_id=r, path=nul, mode=0),
        lambda r: m.ReadLink(request_id=r, path=nul),
        lambda r: m.DirOpen(request_id=r, path=b"/app\0"),
        lambda r: m.Mkdir(request_id=r, path=b"/app/new\0dir"),
        lambda r: m.Rmdir(request_id=r, path=b"/app\0"),
        lambda r: m.Unlink(request_id=r, path=nul),
        lambda r: m.Rename(request_id=r, old=nul, new=b"/app/moved"),
        lambda r: m.Rename(request_id=r, old=b"/app/test.txt", new=b"/app/mo\0ved"),
        lambda r: m.Utimens(request_id=r, path=nul, atime_ns=0, mtime_ns=0),
        lambda r: m.Chown(request_id=r, path=nul, uid=0, gid=0),
        lambda r: m.Symlink(request_id=r, target=b"/etc\0", path=b"/app/link"),
        lambda r: m.Symlink(request_id=r, target=b"/etc", path=b"/app/li\0nk"),
        lambda r: m.Link(request_id=r, old=nul, new=b"/app/hard"),
        lambda r: m.Link(request_id=r, old=b"/app/test.txt", new=b"/app/ha\0rd"),
    ]
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        for make in requests:
            code, message = await _errno_of(client, make)
            assert code == errno.EINVAL, (make(0), message)
            assert "a bug" not in message
        # Names and addresses on the network side too.
        for make in (
            lambda r: m.DnsLookup(request_id=r, host="pod.local\0evil"),
            lambda r: m.DnsLookup(request_id=r, host="x", port=2**40, family=2**40, flags=-1),
            lambda r: m.Connect(
                request_id=r, conn_id=2, protocol="tcp", address="1.2.3.4\0", port=1
            ),
            lambda r: m.Connect(request_id=r, conn_id=4, protocol="udp", address="\0", port=53),
        ):
            code, message = await _errno_of(client, make)
            assert code != errno.EIO and "a bug" not in message, (make(0), code, message)
        # Nothing was created, truncated at the NUL or otherwise touched.
        listing = pod.run_in_pod(["ls", "-a", "/app"]).stdout.split()
        assert not {b"new", b"moved", b"mo", b"link", b"li", b"hard", b"ha"} & set(listing)
        assert await client.read_file(1, b"/app/test.txt") == b"hello from the pod\n"
    assert "Traceback" not in agent.log()


async def test_out_of_range_ids_offsets_and_times_are_einval_or_eoverflow(
    agent: AgentProc,
) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        opened = await client.request(
            1, lambda r: m.FileOpen(request_id=r, path=b"/app/scratch", flags=O_RDWR | O_CREAT)
        )
        h = opened.handle
        requests: list[Callable[[int], Message]] = [
            lambda r: m.Chown(request_id=r, handle=h, uid=2**32, gid=-1),
            lambda r: m.Chown(request_id=r, handle=h, uid=-1, gid=2**40),
            lambda r: m.Chown(request_id=r, handle=h, uid=-2, gid=-1),
            lambda r: m.Chown(request_id=r, path=b"/app/scratch", uid=-5, gid=-1),
            lambda r: m.Chown(request_id=r, path=b"/app/scratch", uid=-1, gid=2**33),
            lambda r: m.Ftruncate(request_id=r, handle=h, length=2**63),
            lambda r: m.FileRead(request_id=r, handle=h, size=1, offset=2**64 - 1),
            lambda r: m.FileSeek(request_id=r, handle=h, offset=2**63, whence=1),
            lambda r: m.FileSeek(request_id=r, handle=h, offset=-1, whence=0),
            lambda r: m.FileSeek(request_id=r, handle=h, offset=0, whence=2**40),
            lambda r: m.FileWrite(request_id=r, handle=h, data=b"x", offset=INT64_MAX),
            lambda r: m.Fchmod(request_id=r, handle=h, mode=2**40),
            lambda r: m.Mkdir(request_id=r, path=b"/app/d", mode=2**40),
            lambda r: m.FileAccess(request_id=r, path=b"/app/scratch", mode=2**40),
            lambda r: m.FileOpen(request_id=r, path=b"/app/scratch", flags=2**40),
            lambda r: m.FileOpen(request_id=r, path=b"/app/scratch", flags=-1),
            lambda r: m.FileOpen(request_id=r, path=b"/app/o", flags=O_CREAT, mode=2**40),
        ]
        for make in requests:
            code, message = await _errno_of(client, make)
            assert code in _BAD, (make(0), code, message)
            assert "a bug" not in message
        # Extreme times are the kernel's to clamp or refuse: never an agent error.
        for ns in (-(2**63), -1, 2**63 - 1, 2**64 - 1):
            for make in (
                lambda r, ns=ns: m.Utimens(request_id=r, handle=h, atime_ns=ns),
                lambda r, ns=ns: m.Utimens(request_id=r, path=b"/app/scratch", mtime_ns=ns),
            ):
                try:
                    await client.request(1, make)
                except AgentError as exc:
                    assert exc.errno in _BAD, (ns, exc.reply.message)
        # An offset past the end reads nothing; the handle and the connection still work.
        data = await client.request(
            1, lambda r: m.FileRead(request_id=r, handle=h, size=16, offset=2**40)
        )
        assert data.data == b""
        assert await client.read_file(1, b"/app/test.txt") == b"hello from the pod\n"
    assert "Traceback" not in agent.log()


async def test_integers_beyond_64_bits_fail_the_request_not_the_connection(
    agent: AgentProc,
) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        opened = await client.request(
            1, lambda r: m.FileOpen(request_id=r, path=b"/app/test.txt", flags=O_RDONLY)
        )
        before = len(client.other)
        # Chown(request_id 9001, path None, handle, uid 2**64, gid -1, follow) and a FileSeek
        # with an offset of 2**70, hand-encoded: no valid message can carry them.
        await client.stream.send(encode_frame([1, m.Chown.KIND, 9001, None, opened.handle, 2**64]))
        await client.stream.send(encode_frame([1, m.FileSeek.KIND, 9002, opened.handle, 2**70, 0]))
        assert await client.read_file(1, b"/app/test.txt") == b"hello from the pod\n"
        replies = {
            msg.request_id: msg.errno
            for _, msg in client.other[before:]
            if isinstance(msg, m.ErrorReply)
        }
        assert replies.get(9001) in _BAD and replies.get(9002) in _BAD, client.other[before:]
        assert client.fatal is None
    assert "Traceback" not in agent.log()
