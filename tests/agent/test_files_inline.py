"""Small operations on regular local files, writes into them and large reads of what is in the
page cache are answered on the agent's event loop; whatever may block (FIFOs, /proc files,
creating opens, large reads of pages not in the cache, writes that wait for the disk) still goes
to a worker thread, with the same results and errors either way."""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirrord._splice import PIPE_SIZE, PipePart, PipePool
from mirrord.agent._files import TargetRoot
from mirrord.agent._files_inline import (
    INLINE_READ_MAX,
    NOT_INLINE,
    all_cached,
    fetch_inline,
    open_inline,
    splice_cached,
    write_inline,
)
from mirrord.localpod import LocalPod, PodSpec
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentError
from tests._agent_process import AgentProc

O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC, O_NOFOLLOW = 0, 1, 0o100, 0o1000, 0o400000
DATA = bytes(range(256)) * 16


@pytest.fixture
def root() -> Iterator[TargetRoot]:
    target = TargetRoot(os.getpid())
    try:
        yield target
    finally:
        target.close()


def _inline(root: TargetRoot, path: Path, flags: int, max_size: int = -1) -> object:
    """open_inline in a thread, so a call that blocked would fail the test instead of hanging."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(open_inline(root, os.fsencode(path), flags, max_size))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert result, "open_inline blocked"
    return result[0]


def test_a_regular_file_opens_inline_with_the_flags_asked(root: TargetRoot, tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(DATA)
    fd = _inline(root, path, O_RDONLY)
    assert isinstance(fd, int)
    try:
        assert os.read(fd, 10_000) == DATA
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    fd = _inline(root, path, O_WRONLY | O_TRUNC)
    assert isinstance(fd, int)
    os.close(fd)
    assert path.read_bytes() == b""


def test_what_may_block_or_differs_is_not_inline(root: TargetRoot, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"b" * (INLINE_READ_MAX + 1))
    (tmp_path / "link").symlink_to(big)
    assert _inline(root, fifo, O_RDONLY) is NOT_INLINE  # the lookup never waits for a writer
    assert _inline(root, tmp_path, O_RDONLY) is NOT_INLINE  # a directory
    assert _inline(root, Path("/proc/self/status"), O_RDONLY) is NOT_INLINE  # proc f_type
    assert _inline(root, big, O_RDONLY, INLINE_READ_MAX) is NOT_INLINE
    assert _inline(root, tmp_path / "new", O_WRONLY | O_CREAT) is NOT_INLINE
    assert _inline(root, tmp_path / "link", O_RDONLY | O_NOFOLLOW) is NOT_INLINE  # ELOOP there
    assert _inline(root, big, O_RDONLY | 0o40000000) is NOT_INLINE  # unknown to the inline path
    assert not (tmp_path / "new").exists()


def test_lookup_errors_are_the_ordinary_open_errors(root: TargetRoot, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(DATA)
    for name, code in ((tmp_path / "missing", errno.ENOENT), (path / "below", errno.ENOTDIR)):
        error = _inline(root, name, O_RDONLY)
        assert isinstance(error, OSError) and error.errno == code
        with pytest.raises(OSError) as ordinary:
            root.open(os.fsencode(name), O_RDONLY)
        assert ordinary.value.errno == code


def test_an_inline_fetch_is_one_stat_and_one_read(
    root: TargetRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "small"
    path.write_bytes(DATA)
    calls: list[str] = []
    for name in ("fstat", "pread", "read", "stat", "lseek"):
        real = getattr(os, name)

        def counted(
            *args: object, _real: Callable[..., object] = real, _name: str = name
        ) -> object:
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(os, name, counted)
    fd, st, data = fetch_inline(root, os.fsencode(path), O_RDONLY, 1 << 20)
    monkeypatch.undo()
    assert (fd, data) == (-1, DATA)  # read-only and whole: nothing left open
    assert st[7] == len(DATA) and st[1] == path.stat().st_ino
    assert sorted(calls) == ["fstat", "pread"]


def test_an_inline_fetch_gives_what_the_ordinary_one_gives(
    root: TargetRoot, tmp_path: Path
) -> None:
    path = tmp_path / "small"
    path.write_bytes(DATA)
    # over the caller's max_size: the stat and a handle, no content
    fd, st, data = fetch_inline(root, os.fsencode(path), O_RDONLY, 100)
    assert data is None and fd >= 0 and st[7] == len(DATA)
    assert os.read(fd, 8) == DATA[:8]
    os.close(fd)
    # read-write: the content and a handle at offset 0
    fd, st, data = fetch_inline(root, os.fsencode(path), os.O_RDWR, 1 << 20)
    assert data == DATA and fd >= 0 and os.lseek(fd, 0, os.SEEK_CUR) == 0
    os.close(fd)
    # write-only: no content
    fd, st, data = fetch_inline(root, os.fsencode(path), O_WRONLY, 1 << 20)
    assert data is None and fd >= 0
    os.close(fd)
    # a truncating open: the stat after it
    fd, st, data = fetch_inline(root, os.fsencode(path), os.O_RDWR | O_TRUNC, 1 << 20)
    assert st[7] == 0 and data == b""
    os.close(fd)
    assert fetch_inline(root, os.fsencode(tmp_path), O_RDONLY, 1 << 20) is NOT_INLINE


def test_a_large_file_is_opened_inline_unless_its_content_is_read(
    root: TargetRoot, tmp_path: Path
) -> None:
    """Bigger than what may be read inline: its open runs inline when the content does not
    come along (over the caller's max_size, or write-only); a read of it waits for a worker."""
    path = tmp_path / "large"
    path.write_bytes(DATA * (2 * INLINE_READ_MAX // len(DATA)))
    size = path.stat().st_size
    assert size > INLINE_READ_MAX
    for flags, max_size in ((O_RDONLY, 100), (O_WRONLY, 1 << 30), (os.O_RDWR, 100)):
        fd, st, data = fetch_inline(root, os.fsencode(path), flags, max_size)
        assert data is None and fd >= 0 and st[7] == size
        os.close(fd)
    before = len(os.listdir("/proc/self/fd"))
    assert fetch_inline(root, os.fsencode(path), O_RDONLY, 1 << 30) is NOT_INLINE
    assert fetch_inline(root, os.fsencode(path), os.O_RDWR, 1 << 30) is NOT_INLINE
    assert len(os.listdir("/proc/self/fd")) == before  # nothing left open


def test_a_file_that_grows_after_the_stat_is_read_whole(
    root: TargetRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "growing"
    path.write_bytes(DATA)
    real_fstat = os.fstat

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with open(path, "ab") as f:  # a writer in the target, between the stat and the read
            f.write(b"more")
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    fd, _, data = fetch_inline(root, os.fsencode(path), O_RDONLY, 1 << 20)
    monkeypatch.undo()
    assert fd == -1 and data == DATA + b"more"


def _threads(agent: AgentProc) -> int:
    return len(os.listdir(f"/proc/{agent.pid}/task"))


async def _small_file_round(client: AgentClient) -> None:
    opened = await client.request(
        1, lambda r: m.FileOpen(request_id=r, path=b"/app/small.bin", flags=O_RDONLY)
    )
    handle = opened.handle
    data = await client.request(1, lambda r: m.FileRead(request_id=r, handle=handle, size=4096))
    assert data.data == DATA[:4096]
    pread = await client.request(
        1, lambda r: m.FileRead(request_id=r, handle=handle, size=16, offset=256)
    )
    assert pread.data == DATA[256:272]
    st = await client.request(
        1, lambda r: m.FileStat(request_id=r, path=b"/app/small.bin", follow=True)
    )
    assert st.stat[7] == len(DATA)
    fetched = await client.request(
        1, lambda r: m.FileFetch(request_id=r, path=b"/app/small.bin", flags=O_RDONLY)
    )
    assert fetched.data == DATA and fetched.handle is None
    await client.request(1, lambda r: m.FileClose(request_id=r, handle=handle))


@pytest.mark.netns
@pytest.mark.anyio
async def test_the_agent_answers_regular_files_without_a_worker_thread(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    pod = make_pod(PodSpec(name="inline", files={"/app/small.bin": DATA}))
    agent = make_agent(f"pid/{pod.pid}")
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        await _small_file_round(client)
        before = _threads(agent)
        for _ in range(20):
            await _small_file_round(client)
        with pytest.raises(AgentError) as missing:
            await client.request(
                1, lambda r: m.FileOpen(request_id=r, path=b"/app/missing", flags=O_RDONLY)
            )
        assert missing.value.errno == errno.ENOENT
        assert _threads(agent) == before  # nothing was handed to a worker thread
        # a creating open is not one the agent makes on its event loop
        await client.request(
            1,
            lambda r: m.FileOpen(
                request_id=r, path=b"/app/created", flags=O_WRONLY | O_CREAT, mode=0o600
            ),
        )
        assert _threads(agent) == before + 1


def test_a_write_waits_for_the_disk_only_in_a_worker(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 8192)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert write_inline(fd, b"ab", 100) == 2
        assert write_inline(fd, memoryview(b"cd"), None) == 2  # at the fd's offset: 0
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:2] == b"cd" and data[100:102] == b"ab" and len(data) == 8192
    for sync in (os.O_DSYNC, os.O_SYNC):
        fd = os.open(path, os.O_WRONLY | sync)
        try:
            assert write_inline(fd, b"zz", 0) is NOT_INLINE
        finally:
            os.close(fd)
    assert path.read_bytes()[:2] == b"cd"  # nothing written by a NOT_INLINE answer


@pytest.mark.netns
@pytest.mark.anyio
async def test_the_agent_writes_regular_files_without_a_worker_thread(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    """The layer's write-behind sends up to 1 MiB per FileWrite: each is written on the event
    loop when the file is a regular local one, in a worker when its fd is O_DSYNC."""
    files = {"/app/small.bin": DATA, "/app/out.bin": b"\0" * (3 << 20)}
    pod = make_pod(PodSpec(name="inlinew", files=files))
    agent = make_agent(f"pid/{pod.pid}")
    chunk = os.urandom(1 << 20)
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        await _small_file_round(client)  # the session's own threads have started
        before = _threads(agent)

        async def write_file(flags: int, at: int, data: bytes) -> None:
            opened = await client.request(
                1, lambda r: m.FileOpen(request_id=r, path=b"/app/out.bin", flags=flags)
            )
            handle = opened.handle
            written = await client.request(
                1, lambda r: m.FileWrite(request_id=r, handle=handle, data=data, offset=at)
            )
            assert written.count == len(data)
            small = await client.request(
                1, lambda r: m.FileWrite(request_id=r, handle=handle, data=b"tail")
            )
            assert small.count == 4  # at the handle's own offset: 0
            await client.request(1, lambda r: m.FileClose(request_id=r, handle=handle))

        for i in range(3):
            await write_file(O_WRONLY, i << 20, chunk)
        assert _threads(agent) == before  # nothing was handed to a worker thread
        await write_file(O_WRONLY | os.O_DSYNC, 0, chunk[:4096])
        assert _threads(agent) == before + 1
    on_target = Path(f"/proc/{pod.pid}/root/app/out.bin").read_bytes()
    assert on_target[:4] == b"tail" and on_target[4:4096] == chunk[4:4096]
    assert on_target[4096 : 1 << 20] == chunk[4096:]
    assert on_target[1 << 20 :] == chunk * 2


def _piped(got: object) -> bytes:
    assert isinstance(got, tuple)
    part, rest = got
    assert isinstance(part, PipePart)
    data: bytes = os.read(part.pipe.r, PIPE_SIZE) + rest
    part.left = 0
    part.release()
    return data


def test_a_large_read_of_cached_pages_is_spliced_inline_and_others_are_not(
    tmp_path: Path,
) -> None:
    """cachestat(2) says whether every page a read covers is in the page cache: then nothing in
    it waits for a disk and the agent splices it on its event loop. tmp_path is on a disk file
    system here, so its pages can be dropped from the cache (a tmpfs's cannot)."""
    content = os.urandom(3 << 20)
    path = tmp_path / "cached.bin"
    path.write_bytes(content)
    pool = PipePool()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert all_cached(fd, 0, len(content))
        assert _piped(splice_cached(fd, 1 << 20, 5, pool)) == content[5 : (1 << 20) + 5]
        # the end of the file: what is there
        assert _piped(splice_cached(fd, 1 << 20, len(content) - 100, pool)) == content[-100:]
        assert splice_cached(fd, 1 << 20, None, pool) is NOT_INLINE  # at the fd's offset
        assert splice_cached(fd, 1 << 20, len(content), pool) == b""  # the end: nothing
        os.fsync(fd)  # clean pages, which the kernel drops when asked
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if all_cached(fd, 0, 4096):
            pytest.skip("this file system keeps its pages (tmp_path on a tmpfs?)")
        assert splice_cached(fd, 1 << 20, 0, pool) is NOT_INLINE
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead past it
        os.pread(fd, 1 << 20, 1 << 20)  # the second MiB is read back in
        assert all_cached(fd, 1 << 20, 1 << 20)
        assert _piped(splice_cached(fd, 1 << 20, 1 << 20, pool)) == content[1 << 20 : 2 << 20]
        assert splice_cached(fd, (1 << 20) + 4096, 1 << 20, pool) is NOT_INLINE  # one page out
    finally:
        os.close(fd)
        pool.close()
    r, w = os.pipe()
    try:
        os.write(w, b"fifo")
        assert splice_cached(r, 1 << 20, 0, pool) is NOT_INLINE  # not a regular file
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.netns
@pytest.mark.anyio
async def test_the_agent_reads_cached_large_files_without_a_worker_thread(
    make_pod: Callable[..., LocalPod], make_agent: Callable[..., AgentProc]
) -> None:
    """The layer's read-ahead asks for 1 MiB at a time at explicit offsets: each is spliced on
    the event loop when its pages are in the page cache (a pod's files are, written just now),
    and read in a worker at the fd's offset."""
    big = os.urandom((4 << 20) + 777)
    pod = make_pod(PodSpec(name="inliner", files={"/app/small.bin": DATA, "/app/big.bin": big}))
    agent = make_agent(f"pid/{pod.pid}")
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        await _small_file_round(client)  # the session's own threads have started
        before = _threads(agent)
        opened = await client.request(
            1, lambda r: m.FileOpen(request_id=r, path=b"/app/big.bin", flags=O_RDONLY)
        )
        handle = opened.handle
        for at in (0, 1 << 20, 5, (4 << 20) - 1000):
            ask = functools.partial(m.FileRead, handle=handle, size=1 << 20, offset=at)
            got = await client.request(1, lambda r: ask(request_id=r))  # noqa: B023
            assert got.data == big[at : at + (1 << 20)]
        assert _threads(agent) == before  # nothing was handed to a worker thread
        got = await client.request(
            1, lambda r: m.FileRead(request_id=r, handle=handle, size=1 << 20)
        )
        assert got.data == big[: 1 << 20]
        assert _threads(agent) == before + 1
