"""fds passed with frames (hand-over): a `FrameWriter` sends an open file or a socket with a
frame's first byte, a `FrameReader(receive_fds=True)` takes them in order, whether it is
awaited or runs its callback, under asyncio and trio."""

from __future__ import annotations

import os
import socket
import tempfile

import anyio
import anyio.abc
import cbor2
import pytest

from mirrord._frames import FrameReader, FrameWriter, PassedFd
from mirrord.protocol import FrameDecoder, encode_frame

pytestmark = pytest.mark.anyio


class _Done(Exception):
    """Every frame with an fd was read."""


async def _pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    a, b = socket.socketpair()
    return (
        await anyio.abc.UNIXSocketStream.from_socket(a),
        await anyio.abc.UNIXSocketStream.from_socket(b),
    )


def _file(content: bytes) -> PassedFd:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, content)
    return PassedFd(fd)


@pytest.mark.parametrize("callback", [False, True])
async def test_fds_arrive_in_the_order_of_the_frames_they_came_with(callback: bool) -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        assert writer.can_pass
        # frames without fds between those with one, some batched behind a full socket
        writer.send_nowait(b"\0" * (4 * 1024 * 1024))
        for i in range(40):
            passing = (_file(b"file %d" % i),) if i % 3 == 0 else ()
            writer.send_nowait(encode_frame(["frame", i, bool(passing)]), passing)
        reader = FrameReader(theirs, receive_fds=True)
        assert reader.receives_fds
        decoder = FrameDecoder()
        got: list[bytes] = []
        skip = 4 * 1024 * 1024

        def on_data(data: bytes) -> None:
            nonlocal skip
            if skip:
                used = min(skip, len(data))
                skip -= used
                data = data[used:]
            decoder.receive_data(data)
            while (payload := decoder.next_payload()) is not None:
                _, i, has_fd = cbor2.loads(payload)
                if has_fd:
                    fd = reader.take_fd()
                    assert fd is not None, f"frame {i} came without its fd"
                    got.append(os.pread(fd.fileno(), 100, 0))
                    fd.close()
            if len(got) == 14:
                raise _Done

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            with anyio.fail_after(30), pytest.raises(_Done):
                if callback:
                    await reader.run(on_data)
                else:
                    while True:
                        on_data(await reader.receive())
            tg.cancel_scope.cancel()
        assert got == [b"file %d" % i for i in range(0, 40, 3)]
        assert reader.take_fd() is None


async def test_a_reader_without_receive_fds_gets_the_bytes_and_no_fd() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        writer.send_nowait(encode_frame(["x"]), (_file(b"never seen"),))
        reader = FrameReader(theirs)
        assert not reader.receives_fds
        with anyio.fail_after(10):
            data = await reader.receive()
        assert data == encode_frame(["x"]) and reader.take_fd() is None
