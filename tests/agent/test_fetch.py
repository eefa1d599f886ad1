"""`FileFetch`: open + stat (+ the whole content of a small readable file) in one round trip,
against a real agent next to a real local pod."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any

import pytest

from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentError
from tests._agent_process import AgentProc

pytestmark = [pytest.mark.netns, pytest.mark.anyio]

O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_DIRECTORY, O_PATH = 0, 1, 2, 0o100, 0o200000, 0o10000000
SMALL = bytes(range(256)) * 16  # 4 KiB
BIG = b"b" * (m.MAX_DATA_CHUNK + 1)

_SPEC = PodSpec(
    name="fetch", files={"/app/small.bin": SMALL, "/app/big.bin": BIG, "/app/empty": b""}
)


async def _fetch(client: AgentClient, path: bytes, flags: int, **kw: Any) -> m.FileFetched:
    reply = await client.request(
        1, lambda r: m.FileFetch(request_id=r, path=path, flags=flags, **kw)
    )
    assert isinstance(reply, m.FileFetched)
    return reply


def _close(request_id: int, *, handle: int) -> m.FileClose:
    return m.FileClose(request_id=request_id, handle=handle)


def _read4(request_id: int, *, handle: int) -> m.FileRead:
    return m.FileRead(request_id=request_id, handle=handle, size=4)


async def test_fetch_small_files_whole_and_keep_handles_only_where_needed(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(_SPEC)
    agent = make_agent(f"pid/{pod.pid}")
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        fds_before = agent.open_fds()

        # read-only and small: content and stat, nothing left open in the agent
        small = await _fetch(client, b"/app/small.bin", O_RDONLY)
        assert small.data == SMALL and small.handle is None
        assert small.stat[7] == len(SMALL) and small.stat[2] & 0o170000 == 0o100000
        empty = await _fetch(client, b"/app/empty", O_RDONLY)
        assert empty.data == b"" and empty.handle is None
        assert agent.open_fds() == fds_before

        # bigger than max_size: the handle, to read through
        for path, limit in ((b"/app/big.bin", m.MAX_DATA_CHUNK), (b"/app/small.bin", 100)):
            big = await _fetch(client, path, O_RDONLY, max_size=limit)
            assert big.data is None
            assert big.handle is not None
            first = await client.request(1, functools.partial(_read4, handle=big.handle))
            assert (
                isinstance(first, m.FileData) and first.data == (BIG if limit > 100 else SMALL)[:4]
            )
            await client.request(1, functools.partial(_close, handle=big.handle))

        # writable: content and handle (a write-back cache), the handle at offset 0
        rw = await _fetch(client, b"/app/small.bin", O_RDWR)
        assert rw.data == SMALL
        assert rw.handle is not None
        rw_handle = rw.handle
        await client.request(1, lambda r: m.FileWrite(request_id=r, handle=rw_handle, data=b"XY"))
        await client.request(1, functools.partial(_close, handle=rw_handle))
        assert pod.run_in_pod(["head", "-c", "2", "/app/small.bin"]).stdout == b"XY"

        # write-only (a new file), a directory, O_PATH: stat and handle, no content
        for path, flags in (
            (b"/app/new.txt", O_WRONLY | O_CREAT),
            (b"/app", O_RDONLY | O_DIRECTORY),
            (b"/app/small.bin", O_PATH),
        ):
            other = await _fetch(client, path, flags, mode=0o644)
            assert other.data is None and other.handle is not None
            assert other.handle is not None
            await client.request(1, functools.partial(_close, handle=other.handle))
        assert agent.open_fds() == fds_before

        # errors are open's errnos; the root still confines
        for path, code in ((b"/app/nope", errno.ENOENT), (b"/app/small.bin/x", errno.ENOTDIR)):
            with pytest.raises(AgentError) as info:
                await _fetch(client, path, O_RDONLY)
            assert info.value.errno == code
        shadow = await _fetch(client, b"/../../etc/hostname", O_RDONLY)
        assert shadow.data is not None and shadow.handle is None


def test_fetch_max_size_is_bounded_by_one_frame() -> None:
    with pytest.raises(Exception, match="max_size"):
        m.FileFetch(request_id=1, path=b"/x", flags=0, max_size=m.MAX_DATA_CHUNK + 1)
