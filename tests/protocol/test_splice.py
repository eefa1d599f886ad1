"""Frames whose bytes travel through a pipe (`mirrord._splice`), over real unix sockets and
real files: the writer splices them into its socket in order with the other frames (both
backends), and every pipe is released whatever happens (written, dropped, writer closed or
broken); the decoder hands the rest of a large frame to whoever takes it; the agent's read
into a pipe; a `PipeFill`'s next pipe, or its copy, when a pipe fills before its frame is
in."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from mirrord._frames import FrameWriter
from mirrord._splice import PIPE_SIZE, PipeFill, PipePart, PipePool
from mirrord.agent._files import read_into_pipe
from mirrord.protocol import FrameDecoder
from mirrord.protocol._framing import bytes_frame, bytes_frame_head
from tests._pipes import piped

pytestmark = pytest.mark.anyio

_TIMEOUT = 30


async def _pair(
    family: int = socket.AF_UNIX,
) -> tuple[anyio.abc.SocketStream, socket.socket]:
    """Our end as a stream, the peer as a blocking socket (read from a thread)."""
    a, b = socket.socketpair(family)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)  # many pieces per pipe
    return await anyio.abc.UNIXSocketStream.from_socket(a), b


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def _receive(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(_TIMEOUT)
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        assert chunk, f"the stream ended after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def test_piped_frames_go_out_whole_and_in_order_with_the_others() -> None:
    ours, peer = await _pair()
    pool = PipePool()
    async with ours:
        with peer:
            writer = FrameWriter(ours, "test")
            assert writer.can_splice
            expected = b""
            parts: list[PipePart] = []
            for i, size in enumerate((300_000, 5, PIPE_SIZE, 70_000, 1, 200_000)):
                data = os.urandom(size)
                if i % 2 == 0:  # a pipe's bytes, then bytes of its own frame's tail
                    parts.append(piped(pool, data[:-3]))
                    writer.send_nowait([bytes_frame_head([7, i], size), parts[-1], data[-3:]])
                else:
                    writer.send_nowait(bytes_frame([7, i], data))
                expected += bytes_frame([7, i], data)
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                with anyio.fail_after(_TIMEOUT):
                    got = await anyio.to_thread.run_sync(_receive, peer, len(expected))
                writer.close()
    assert got == expected
    assert all(part.pipe is None and part.left == 0 for part in parts)
    # written out whole, each pipe went back to the pool open, and is taken again
    assert pool.created == 3
    again = pool.take()
    assert _open(again.r) and _open(again.w) and pool.created == 3
    pool.close()
    again.close()


async def test_pipes_of_frames_never_written_are_closed() -> None:
    ours, peer = await _pair()
    pool = PipePool()
    async with ours:
        writer = FrameWriter(ours, "test")
        queued = [piped(pool, b"q" * 100_000) for _ in range(3)]
        for part in queued:
            writer.send_nowait([bytes_frame_head([1], len(part)), part])
        pipes = [(part.pipe.r, part.pipe.w) for part in queued]
        peer.close()  # the peer is gone: the first splice breaks the writer
        with anyio.fail_after(_TIMEOUT):
            await writer.run()
        assert writer.broken
        late = piped(pool, b"late")
        late_fds = (late.pipe.r, late.pipe.w)
        writer.send_nowait([bytes_frame_head([1], 4), late])  # dropped: the writer is closed
    assert not any(_open(fd) for pair in [*pipes, late_fds] for fd in pair)
    assert all(part.pipe is None for part in [*queued, late])


async def test_a_writer_that_cannot_splice_refuses_a_pipe_and_closes_it() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        async with client:
            writer = FrameWriter(client, "tcp")
            assert not writer.can_splice  # into TCP the kernel copies anyway
            pool = PipePool()
            part = piped(pool, b"x" * 1000)
            fds = (part.pipe.r, part.pipe.w)
            with pytest.raises(TypeError):
                writer.send_nowait([bytes_frame_head([1], 1000), part])
            assert not _open(fds[0]) and not _open(fds[1])


def test_the_decoder_gives_up_the_rest_of_a_large_frame() -> None:
    payload_head = bytes_frame_head([2, 13, 9], 200_000)
    frame = payload_head + os.urandom(200_000)
    after = bytes_frame([2, 13, 10], b"next")
    decoder = FrameDecoder()
    decoder.receive_data(frame[:5000])
    assert decoder.next_payload() is None
    assert decoder.large_prefix() == (frame[4:68], len(frame) - 5000)
    assert decoder.large_prefix(10_000) == (frame[4:5000], len(frame) - 5000)
    started = decoder.large_frames
    taken, rest = decoder.take_large()
    assert taken == frame[4:5000] and rest == len(frame) - 5000
    assert decoder.large_prefix() is None
    with pytest.raises(ValueError):
        decoder.take_large()
    # the taker took `rest` bytes itself: the decoder goes on with the next frame
    decoder.receive_data(after)
    assert decoder.next_payload() == after[4:]
    assert decoder.large_frames == started


def test_a_large_frame_given_up_never_gets_a_buffer() -> None:
    # its buffer is made when its next bytes come: a frame taken before (the daemon's splice)
    # costs no zero-filled MiB
    import tracemalloc

    frame = bytes_frame_head([2, 13, 9], 1_500_000) + b"x" * 4000
    size = int.from_bytes(frame[:4], "big")
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        decoder.receive_data(frame)
        assert decoder.next_payload() is None
        taken, rest = decoder.take_large()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(taken) + rest == size
    assert peak < 100_000, peak
    # a frame that is not taken gets its buffer at its next bytes, and arrives whole
    decoder.receive_data(frame)
    assert decoder.next_payload() is None
    decoder.receive_data(b"y" * (size - len(taken)))
    payload = decoder.next_payload()
    assert payload is not None and len(payload) == size
    assert bytes(payload[-3:]) == b"yyy"


@pytest.mark.parametrize("offset", [0, 5, 4096, 12345])
def test_the_agent_reads_a_file_into_a_pipe_whole_whatever_its_offset(
    tmp_path: Path, offset: int
) -> None:
    content = os.urandom(3 * 1024 * 1024)
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    pool = PipePool()
    fd = os.open(path, os.O_RDONLY)
    try:
        got = read_into_pipe(fd, 1024 * 1024, offset, pool)
        assert isinstance(got, tuple)
        part, rest = got
        # a pipe holds 256 pieces of pages: an unaligned MiB spans 257, its end comes apart
        assert (len(rest) > 0) == (offset % 4096 != 0)
        data = os.read(part.pipe.r, PIPE_SIZE) + rest
        assert data == content[offset : offset + 1024 * 1024]
        part.left = 0
        part.release()
        # at its position (which moves), and short only at the end of the file
        os.lseek(fd, len(content) - 100_000 - offset, os.SEEK_SET)
        got = read_into_pipe(fd, 1024 * 1024, None, pool)
        assert isinstance(got, tuple)
        part, rest = got
        assert os.read(part.pipe.r, PIPE_SIZE) + rest == content[-100_000 - offset :]
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(content)
        part.left = 0
        part.release()
        assert read_into_pipe(fd, 1024 * 1024, None, pool) == b""  # the end: nothing piped
    finally:
        os.close(fd)
        pool.close()


def test_the_agent_reads_what_is_no_regular_file_into_memory(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"from a fifo")
        assert read_into_pipe(r, 100_000, None, PipePool()) == b"from a fifo"
    finally:
        os.close(r)
        os.close(w)


class _NoPipes(PipePool):
    def take(self) -> Any:
        raise OSError(errno.EMFILE, "no more pipes")


def _fill(pool: PipePool, first_pipe_size: int, data: bytes) -> tuple[PipeFill, list[PipeFill]]:
    """`data` received by a `PipeFill` whose first pipe has room for `first_pipe_size` bytes,
    sent in two halves with reads in between; (the fill, the fills it said were done)."""
    import fcntl

    pipe = PipePool().take()
    fcntl.fcntl(pipe.w, fcntl.F_SETPIPE_SZ, first_pipe_size)
    done: list[PipeFill] = []
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        b.setblocking(False)
        job = PipeFill(pool, pipe, len(data), done.append)
        half = len(data) // 2
        for chunk in (data[:half], data[half:]):
            a.sendall(chunk)
            for _ in range(1000):
                try:
                    job.receive_from(b.fileno())
                except BlockingIOError:
                    if job.size - job.left >= half or done:
                        break
        return job, done


def test_a_fill_takes_another_pipe_when_one_fills_early() -> None:
    # a pipe of one page fills at once: the rest goes into the next pipe, nothing is copied,
    # and the frame is complete (no wait for room that only forwarding it would make)
    pool = PipePool()
    data = os.urandom(200_000)
    job, done = _fill(pool, 4096, data)
    assert done == [job] and job.copy is None
    assert len(job.pipes) == 2 and sum(job.filled) == len(data)
    parts = job.take_parts()
    assert job.pipes == [] and len(parts) == 2 and sum(len(part) for part in parts) == len(data)
    got = b"".join(os.read(part.pipe.r, PIPE_SIZE) for part in parts)
    assert got == data
    for part in parts:
        part.left = 0  # read out above
        part.release()
    assert pool.created == 1  # the second pipe (the first was another pool's)
    pool.close()


def test_a_fill_copies_the_rest_when_it_gets_no_more_pipes() -> None:
    data = os.urandom(200_000)
    job, done = _fill(_NoPipes(), 4096, data)
    assert done == [job]
    assert job.copy is not None and bytes(job.copy) == data
    assert job.pipes == [] and job.take_parts() == []  # the drained pipe went back
