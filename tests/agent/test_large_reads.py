"""Large reads (over INLINE_READ_MAX) are a worker's, and their data goes to the daemon as
os.pread returned it (a part of its own in the reply's frame): what the daemon gets is the
ordinary FileData reply."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from os import O_RDONLY

import pytest

from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient
from tests._agent_process import AgentProc

SIZE = 3 * 1024 * 1024 + 17
DATA = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(SIZE // 32 + 1))[:SIZE]


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
