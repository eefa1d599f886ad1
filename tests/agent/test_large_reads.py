"""Large reads (over INLINE_READ_MAX) are read by a worker straight into their reply frame
(`read_data`, `FileData.frame`): what the daemon gets is the ordinary FileData reply."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from os import O_RDONLY

import cbor2
import pytest

from mirrord.agent._files import read_data
from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient
from tests._agent_process import AgentProc

SIZE = 3 * 1024 * 1024 + 17
DATA = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(SIZE // 32 + 1))[:SIZE]


def test_the_data_is_read_into_the_frame_the_connection_heads() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(DATA)
        f.flush()
        item = cbor2.dumps([3, 13, 4242, b""])  # channel, kind, request id, empty data
        empty = len(item).to_bytes(4, "big") + item
        for offset, size, want in (
            (0, 100_000, DATA[:100_000]),
            (SIZE - 10, 100_000, DATA[-10:]),  # short: at the end
            (SIZE, 70_000, b""),
        ):
            frame = read_data(f.fileno(), size, offset).frame(empty)
            assert int.from_bytes(frame[:4], "big") == len(frame) - 4
            assert cbor2.loads(bytes(frame[4:])) == [3, 13, 4242, want]
        os.lseek(f.fileno(), 5, os.SEEK_SET)
        frame = read_data(f.fileno(), 80_000, None).frame(empty)  # at the fd's position
        assert cbor2.loads(bytes(frame[4:]))[3] == DATA[5:80_005]
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 80_005
        with pytest.raises(ValueError):
            read_data(f.fileno(), 10, 0).frame(cbor2.dumps([1, 2]))


@pytest.mark.netns
@pytest.mark.anyio
async def test_large_reads_through_the_agent(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(PodSpec(name="large", files={"/app/big.bin": DATA}))
    agent = make_agent(f"pid/{pod.pid}")
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        opened = await client.request(
            1, lambda r: m.FileOpen(request_id=r, path=b"/app/big.bin", flags=O_RDONLY)
        )
        handle = opened.handle
        got = b""
        while True:  # at the handle's position, 1 MiB a request
            data = await client.request(
                1, lambda r: m.FileRead(request_id=r, handle=handle, size=1 << 20)
            )
            if not data.data:
                break
            got += data.data
        assert got == DATA
        tail = await client.request(
            1, lambda r: m.FileRead(request_id=r, handle=handle, size=1 << 20, offset=SIZE - 5)
        )
        assert tail.data == DATA[-5:]
        await client.request(1, lambda r: m.FileClose(request_id=r, handle=handle))
