"""The shared frame stream layer (`mirrord._frames`) over real socket pairs, under asyncio
(the daemon's backend) and trio (the agent's), through anyio's pytest plugin."""

from __future__ import annotations

import array
import socket

import anyio
import anyio.abc
import anyio.lowlevel
import cbor2
import pytest

from mirrord._frames import FrameReader, FrameWriter, plain_socket
from mirrord.protocol import FrameDecoder, encode_frame

pytestmark = pytest.mark.anyio


async def _pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    a, b = socket.socketpair()
    return (
        await anyio.abc.UNIXSocketStream.from_socket(a),
        await anyio.abc.UNIXSocketStream.from_socket(b),
    )


async def _read_frames(reader: FrameReader, n: int) -> list[object]:
    decoder = FrameDecoder()
    out: list[object] = []
    with anyio.fail_after(30):
        while len(out) < n:
            payload = decoder.next_payload()
            if payload is None:
                decoder.receive_data(await reader.receive())
                continue
            out.append(payload)
    return out


async def test_frames_keep_their_order_and_are_batched() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        frames = [encode_frame(["frame", i, b"x" * (i % 50)]) for i in range(300)]
        # the socket buffer is filled first so every frame is queued behind a pending write
        writer.send_nowait(b"\0" * (8 * 1024 * 1024))  # one blob the peer discards
        for frame in frames:
            writer.send_nowait(frame)
        assert writer.statistics()["queued_frames"] == 301
        writes_before = writer.writes
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            reader = FrameReader(theirs)
            blob = bytearray()
            with anyio.fail_after(30):
                while len(blob) < 8 * 1024 * 1024:
                    blob += await reader.receive(8 * 1024 * 1024 - len(blob))
            got = await _read_frames(reader, len(frames))
            writer.close()
        assert got == [f[4:] for f in frames]
        # 300 frames in far fewer writes than frames: they were joined
        assert writer.writes - writes_before < 50
        assert writer.written_bytes == 8 * 1024 * 1024 + sum(map(len, frames))


async def test_an_idle_writer_writes_at_once_without_its_task() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        frame = encode_frame(["reply", 1])
        writer.send_nowait(frame)  # run() is not even started
        assert writer.queued_bytes == 0
        assert writer.written_bytes == len(frame)
        assert await _read_frames(FrameReader(theirs), 1) == [frame[4:]]


async def test_many_producers_concurrently() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        per_producer = 200

        async def produce(tag: int) -> None:
            for i in range(per_producer):
                writer.send_nowait(encode_frame([tag, i, b"y" * 3000]))
                if i % 7 == 0:
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            async with anyio.create_task_group() as producers:
                for tag in range(4):
                    producers.start_soon(produce, tag)
            got = await _read_frames(FrameReader(theirs), 4 * per_producer)
            writer.close()
        seen: dict[int, list[int]] = {}
        for tag, i in map(_tag_index, got):
            seen.setdefault(tag, []).append(i)
        assert seen == {tag: list(range(per_producer)) for tag in range(4)}


def _tag_index(payload: object) -> tuple[int, int]:
    assert isinstance(payload, bytes)
    tag, i, _ = cbor2.loads(payload)
    return int(tag), int(i)


async def test_close_writes_what_is_queued_then_ends() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        writer.send_nowait(b"\1" * (6 * 1024 * 1024))
        writer.send_nowait(b"tail")
        writer.close()
        writer.send_nowait(b"dropped after close")
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            received = bytearray()
            reader = FrameReader(theirs)
            with anyio.fail_after(30):
                while not received.endswith(b"tail"):
                    received += await reader.receive()
            with anyio.fail_after(30):
                await writer.wait_flushed()
        assert len(received) == 6 * 1024 * 1024 + 4
        assert not writer.broken


async def test_a_broken_peer_ends_the_writer_and_frames_are_dropped() -> None:
    ours, theirs = await _pair()
    async with ours:
        writer = FrameWriter(ours, "test")
        await theirs.aclose()
        spare_a, spare_b = socket.socketpair()
        spare_b.close()
        writer.send_nowait(b"\2" * (8 * 1024 * 1024))  # EPIPE direct, or queued and failing
        with anyio.fail_after(30):
            await writer.run()
        assert writer.broken
        assert writer.closed
        writer.send_nowait(b"later", [spare_a])
        assert spare_a.fileno() == -1  # the writer owned it and closed it
        with anyio.fail_after(5):
            await writer.wait_queued_below(0)


async def test_wait_queued_below_follows_the_reader() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test", batch_limit=64 * 1024)
        total = 16 * 1024 * 1024
        for _ in range(total // (256 * 1024)):
            writer.send_nowait(b"\3" * (256 * 1024))
        assert writer.queued_bytes > 1024 * 1024
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)

            async def drain() -> None:
                reader = FrameReader(theirs)
                got = 0
                with anyio.fail_after(60):
                    while got < total:
                        got += len(await reader.receive())

            tg.start_soon(drain)
            with anyio.fail_after(60):
                await writer.wait_queued_below(1024 * 1024)
            assert writer.queued_bytes <= 1024 * 1024
            writer.close()


async def test_sockets_pass_with_their_frame() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        inner_a, inner_b = socket.socketpair()
        with inner_b:
            writer.send_nowait(b"\0" * (6 * 1024 * 1024))  # so the passing frame is queued
            writer.send_nowait(b"with-fd", [inner_a])
            writer.send_nowait(b"after")
            raw = plain_socket(theirs)
            assert raw is not None
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                received = bytearray()
                fds: list[int] = []
                with anyio.fail_after(30):
                    while not received.endswith(b"with-fdafter"):
                        await anyio.wait_readable(raw)
                        try:
                            data, anc, _, _ = raw.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
                        except BlockingIOError:
                            continue
                        received += data
                        for level, kind, payload in anc:
                            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                                fds += array.array("i", payload[: len(payload) // 4 * 4])
                writer.close()
            assert inner_a.fileno() == -1  # our copy closed once sent
            assert len(fds) == 1
            with socket.socket(fileno=fds[0]) as passed:
                passed.sendall(b"through the passed socket")
                assert inner_b.recv(100) == b"through the passed socket"


async def test_reader_reports_the_end() -> None:
    ours, theirs = await _pair()
    async with theirs:
        reader = FrameReader(theirs)
        await ours.send(b"last")
        await ours.aclose()
        assert await reader.receive() == b"last"
        with pytest.raises(anyio.EndOfStream):
            await reader.receive()


async def test_reader_does_not_starve_other_tasks() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        reader = FrameReader(theirs, 1024)
        await ours.send(b"z" * 200 * 1024)  # always data to read: 200 reads in a row
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            with anyio.fail_after(30):
                for _ in range(200):
                    await reader.receive(1024)
            tg.cancel_scope.cancel()
        assert ticks > 10


class _Chunks(anyio.abc.ByteReceiveStream):
    """A byte stream that is no socket (a port-forward stream, say)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if not self._chunks:
            raise anyio.EndOfStream
        return self._chunks.pop(0)[:max_bytes]

    async def aclose(self) -> None:
        self._chunks.clear()


async def test_reader_over_a_stream_that_is_no_socket() -> None:
    reader = FrameReader(_Chunks([b"ab", b"cd"]))
    assert [await reader.receive(), await reader.receive()] == [b"ab", b"cd"]
    with pytest.raises(anyio.EndOfStream):
        await reader.receive()


async def test_over_tcp_loopback() -> None:
    # asyncio's TCP streams are transport-backed (no direct path); trio's are plain sockets
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        frames = [encode_frame(["tcp", i, b"t" * 5000]) for i in range(500)]
        got: list[object] = []

        async def serve(server: anyio.abc.SocketStream) -> None:
            async with server:
                got.extend(await _read_frames(FrameReader(server), len(frames)))

        async with client:
            writer = FrameWriter(client, "tcp")
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, serve)
                tg.start_soon(writer.run)
                for frame in frames:
                    writer.send_nowait(frame)
                with anyio.fail_after(30):
                    while len(got) < len(frames):
                        await anyio.sleep(0.01)
                writer.close()
                tg.cancel_scope.cancel()
        assert got == [f[4:] for f in frames]


async def test_a_frame_never_overtakes_one_queued_before_it() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        blob = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket takes at once
        writer.send_nowait(blob)
        assert writer.queued_bytes > 0
        raw = plain_socket(theirs)
        assert raw is not None
        received = bytearray()
        for _ in range(10_000):  # the peer empties the socket: there is room again
            try:
                received += raw.recv(1 << 20)
            except BlockingIOError:
                break
        writer.send_nowait(b"next")  # room in the socket, but the blob's rest goes first
        assert received == blob[: len(received)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            reader = FrameReader(theirs)
            with anyio.fail_after(30):
                while len(received) < len(blob) + 4:
                    received += await reader.receive()
            writer.close()
        assert bytes(received) == blob + b"next"


async def test_run_hands_every_read_to_the_callback_in_order(anyio_backend: str) -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        reader = FrameReader(theirs, 4096)
        decoder = FrameDecoder()
        got: list[object] = []
        outside_tasks: list[bool] = []

        def on_data(data: bytes) -> None:
            if anyio_backend == "asyncio":
                import asyncio

                outside_tasks.append(asyncio.current_task() is None)
            decoder.receive_data(data)
            while (payload := decoder.next_payload()) is not None:
                got.append(cbor2.loads(payload))

        frames = [encode_frame(["run", i, b"r" * (i * 37 % 9000)]) for i in range(400)]

        async def send_then_close() -> None:
            for frame in frames:
                await ours.send(frame)
            await ours.aclose()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_then_close)
                await reader.run(on_data)  # returns at the end of the stream
        assert got == [["run", i, b"r" * (i * 37 % 9000)] for i in range(400)]
        assert reader.reads > 0
        if anyio_backend == "asyncio":
            # the loop's reader callback, not a task woken per read
            assert outside_tasks and all(outside_tasks)


async def test_run_raises_what_the_callback_raised_and_stops_reading() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        reader = FrameReader(theirs, 2)
        seen: list[bytes] = []

        def on_data(data: bytes) -> None:
            seen.append(data)
            raise ValueError("bad frame")

        await ours.send(b"abcdef")
        with anyio.fail_after(30), pytest.raises(ValueError, match="bad frame"):
            await reader.run(on_data)
        assert seen == [b"ab"]
        # the socket is no longer watched: the rest is still there for whoever reads next
        assert await reader.receive(100) == b"cdef"


async def test_run_reports_a_broken_stream() -> None:
    a, b = socket.socketpair()
    theirs = await anyio.abc.UNIXSocketStream.from_socket(b)
    async with theirs:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        a.send(b"x")
        reader = FrameReader(theirs)
        got: list[bytes] = []
        a.close()
        with anyio.fail_after(30):
            await reader.run(got.append)  # a unix peer's close is an end, not a reset
        assert got == [b"x"]


async def test_run_can_be_paused_and_resumed() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        reader = FrameReader(theirs)
        got: list[bytes] = []

        def on_data(data: bytes) -> None:
            got.append(data)
            reader.pause_reading()

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run, on_data)
            await ours.send(b"one")
            with anyio.fail_after(30):
                while not got:
                    await anyio.sleep(0.005)
            await ours.send(b"two")
            await anyio.sleep(0.1)  # paused: nothing read however long we wait
            assert got == [b"one"]
            reader.resume_reading()
            with anyio.fail_after(30):
                while len(got) < 2:
                    await anyio.sleep(0.005)
            assert got == [b"one", b"two"]
            tg.cancel_scope.cancel()  # a cancelled run() leaves the socket unwatched


async def test_run_over_a_stream_that_is_no_socket() -> None:
    reader = FrameReader(_Chunks([b"ab", b"cd"]))
    got: list[bytes] = []
    with anyio.fail_after(30):
        await reader.run(got.append)
    assert got == [b"ab", b"cd"]


async def test_a_frame_in_parts_is_written_whole_in_order() -> None:
    """A frame given as parts (a head and a large body, `frame_parts_with_head`) goes out as
    the same bytes as the joined frame, also when it is queued behind a full socket, and the
    large body is sent as it is (not joined)."""
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        body = memoryview(bytes(range(256)) * 8192)  # 2 MiB
        head = b"HEAD"
        writer.send_nowait(b"\0" * (8 * 1024 * 1024))  # fills the socket: what follows queues
        writer.send_nowait([head, body])
        writer.send_nowait(b"tail")
        assert writer.queued_bytes >= len(head) + len(body) + 4
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            reader = FrameReader(theirs)
            got = bytearray()
            want = 8 * 1024 * 1024 + len(head) + len(body) + 4
            with anyio.fail_after(30):
                while len(got) < want:
                    got += await reader.receive(want - len(got))
            writer.close()
        assert bytes(got[8 * 1024 * 1024 :]) == head + bytes(body) + b"tail"
        assert writer.written_bytes == want


async def test_an_idle_writer_sends_parts_at_once() -> None:
    ours, theirs = await _pair()
    async with ours, theirs:
        writer = FrameWriter(ours, "test")
        frame = encode_frame(["reply", 2, b"z" * 70_000])
        writer.send_nowait([frame[:9], memoryview(frame)[9:]])  # run() is not even started
        assert writer.queued_bytes == 0 and writer.written_bytes == len(frame)
        assert await _read_frames(FrameReader(theirs), 1) == [frame[4:]]


@pytest.mark.parametrize("fds", [False, True])
async def test_run_receives_a_large_frame_in_place(anyio_backend: str, fds: bool) -> None:
    """`run(into=...)`: the rest of a large frame is received straight into the decoder's
    buffer (`free_space`), under both backends, with and without fd passing."""
    ours, theirs = await _pair()
    async with ours, theirs:
        reader = FrameReader(theirs, 4096, receive_fds=fds)
        decoder = FrameDecoder()
        got: list[object] = []
        in_place: list[int] = []

        def on_data(data: bytes | memoryview) -> None:
            if isinstance(data, memoryview):
                in_place.append(len(data))
            decoder.receive_data(data)
            while (payload := decoder.next_payload()) is not None:
                got.append(cbor2.loads(payload))

        items = [["big", i, bytes([i]) * (300_000 + i)] for i in range(5)] + [["small", 9]]

        async def send_then_close() -> None:
            for item in items:
                await ours.send(encode_frame(item))
            await ours.aclose()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_then_close)
                await reader.run(on_data, into=decoder.free_space)
        assert got == items
        # the 4096-byte read size bounds only reads of what is not a large frame's rest
        assert sum(in_place) > 5 * 290_000 and max(in_place) > 4096
