"""Which file calls the agent answers on its event loop, and the calls that decide it.

A worker-thread round trip (a queue put, a thread's wake-up, a hand-back to the event loop)
costs more than the system call of a small operation on a regular file, which does not block
meaningfully when the file lives on a disk or in memory (page cache, tmpfs, overlayfs). So
open, fetch, read and pread (up to `INLINE_READ_MAX` bytes; a larger pread when every page it
covers is in the page cache, `splice_cached`), write and pwrite (`write_inline`:
into the page cache, unless the fd was opened O_SYNC or O_DSYNC, which waits for the disk on
every write; a large write's data may come in pipes, `write_from_pipes`), lseek, fstat and path stats of such files run inline; everything that may block
stays in the worker threads (`_workers.py`):
FIFOs, sockets and character or block devices (st_mode), files on network, FUSE or unknown
file systems and `/proc`/`/sys` files (statfs f_type: `/proc/kmsg` is a "regular" file whose
read blocks), opens that create (O_CREAT, O_TMPFILE) or take unusual flags, larger reads, and
every path operation of a target whose mount table holds a network, FUSE or automount file
system (a path lookup there may wait on the network; `TargetRoot.paths_inline`).

An inline call returns its result, or `NOT_INLINE` when the file turns out to be one that may
block: the channel then runs the ordinary call in a worker thread, so errors and results are
the same either way.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import stat as stat_module
from collections.abc import Callable, Sequence
from typing import Any

from mirrord._splice import PipePart, PipePool
from mirrord.agent._files import TargetRoot, _libc, fstatfs, read_into_pipe, stat_list

__all__ = [
    "INLINE_READ_MAX",
    "NOT_INLINE",
    "Inline",
    "fetch_file",
    "fetch_inline",
    "inline_fd",
    "open_inline",
    "splice_cached",
    "takes_piped_writes",
    "write_at",
    "write_from_pipes",
    "write_inline",
]

INLINE_READ_MAX = 64 * 1024  # bytes a read (or a fetched file) may have to run inline

# statfs f_type of the file systems whose regular files are disk or memory backed
_LOCAL_FS_TYPES = frozenset(
    {
        0xEF53,  # ext2/3/4
        0x58465342,  # xfs
        0x9123683E,  # btrfs
        0x01021994,  # tmpfs
        0x794C7630,  # overlayfs
        0x858458F6,  # ramfs
        0x73717368,  # squashfs
        0xF2F52010,  # f2fs
        0x2FC12FC1,  # zfs
        0xE0F5E1E2,  # erofs
    }
)
_O_PATH = getattr(os, "O_PATH", 0o10000000)
# open flags an inline open takes (anything else, e.g. O_CREAT, O_DIRECTORY, O_PATH, goes the
# ordinary way: openat2 answers unknown bits with EINVAL, the reopen below would not)
_INLINE_FLAGS = (
    os.O_ACCMODE
    | os.O_APPEND
    | os.O_NONBLOCK
    | os.O_NOFOLLOW
    | os.O_CLOEXEC
    | os.O_TRUNC
    | os.O_NOCTTY
    | os.O_DSYNC
    | os.O_SYNC
    | getattr(os, "O_LARGEFILE", 0)
    | getattr(os, "O_NOATIME", 0)
)


class _NotInline:
    def __repr__(self) -> str:
        return "NOT_INLINE"


NOT_INLINE: Any = _NotInline()


class Inline:
    """A file call planned to run on the event loop: `fast()` gives the result (or raises as
    the call would), or NOT_INLINE, and then `slow()` runs in a worker thread."""

    __slots__ = ("fast", "slow")

    def __init__(self, fast: Callable[[], Any], slow: Callable[[], Any]) -> None:
        self.fast = fast
        self.slow = slow

    def __repr__(self) -> str:
        return f"<Inline {self.fast!r}>"

    def __call__(self) -> Any:
        return self.slow()


def inline_fd(fd: int) -> bool:
    """Whether calls on `fd` may run inline: a regular file on a local file system."""
    return stat_module.S_ISREG(os.fstat(fd).st_mode) and fstatfs(fd)[0] in _LOCAL_FS_TYPES


def write_inline(fd: int, data: bytes | memoryview, offset: int | None) -> int | Any:
    """write (pwrite at `offset`) of `data` on an inline handle's fd, or NOT_INLINE when the
    fd waits for the disk on every write (O_SYNC, O_DSYNC: the status flags may have changed
    since the open, so they are read here). A write into the page cache of a local file system
    costs a copy (~0.1 ms per MiB here), less than a worker thread's round trip; the layer's
    write-behind sends 1 MiB at a time. Dirty-page throttling may still pause it (the kernel
    bounds each pause at 200 ms), as it would pause the target's own write."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_SYNC | os.O_DSYNC):
        return NOT_INLINE
    return write_at(fd, data, offset)


# cachestat(2), Linux 6.5: 451 in the generic table (x86_64, arm64, riscv64); elsewhere
# (alpha, mips, ...) the number is another call's, so it is not made there
_SYS_CACHESTAT = 451


class _CachestatRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Cachestat(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    )


# False on other architectures, or once the kernel (or a seccomp filter) refused it
_cachestat_works = platform.machine() in ("x86_64", "aarch64", "arm64", "riscv64")


def all_cached(fd: int, offset: int, size: int) -> bool:
    """Every page of [offset, offset+size) of `fd` is in the page cache (cachestat(2)): reading
    it waits for no disk. False when the kernel cannot say (before 6.5, or a seccomp filter)."""
    global _cachestat_works
    if not _cachestat_works or size <= 0:
        return False
    rng, got = _CachestatRange(offset, size), _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(got), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _cachestat_works = False
        return False
    first, end = offset // mmap.PAGESIZE, -(-(offset + size) // mmap.PAGESIZE)
    return int(got.nr_cache) >= end - first


def splice_cached(
    fd: int, size: int, offset: int | None, pipes: PipePool
) -> tuple[PipePart, bytes] | bytes | Any:
    """A large pread of an inline handle's file on the event loop: `read_into_pipe`, when every
    page it covers (up to the end of the file) is in the page cache, else NOT_INLINE (a read
    without an offset too); nothing (b"") at or past the end of the file. Splicing a cached
    MiB costs the kernel less than a worker thread's round trip (about a sixth of the agent's
    time in a bulk read went to that hand-off)."""
    if offset is None:
        return NOT_INLINE
    st = os.fstat(fd)
    if not stat_module.S_ISREG(st.st_mode):
        return NOT_INLINE
    if offset >= st.st_size:
        return b""  # at or past the end: nothing to read, nothing to wait for
    if not all_cached(fd, offset, min(size, st.st_size - offset)):
        return NOT_INLINE
    return read_into_pipe(fd, size, offset, pipes, regular=True)


def write_at(fd: int, data: bytes | memoryview, offset: int | None) -> int:
    """`FileWrite`'s call, inline or in a worker: pwrite at `offset`, or write at the fd's
    own offset when there is none."""
    return os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)


def takes_piped_writes(fd: int) -> bool:
    """Whether a large write's data may come to the inline handle's `fd` in pipes
    (`write_from_pipes`): not when it appends (splice refuses an O_APPEND file) or waits for
    the disk on every write (O_SYNC, O_DSYNC: a worker's `write_at`)."""
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_APPEND | os.O_SYNC | os.O_DSYNC)


def write_from_pipes(fd: int, head: bytes, parts: Sequence[PipePart], offset: int | None) -> int:
    """`FileWrite`'s call when its data came from the daemon's socket into pipes: `head` (the
    bytes that came with the frame's head) then the parts' bytes, written at `offset` (at the
    fd's own offset when there is none), from the pipes into the page cache by the kernel.
    The bytes written: fewer when the file system took only some (an error after some bytes
    is that short count, as write(2) reports it); an error before any raises. A file system
    that takes no splice (EINVAL) gets the bytes read out of the pipe and written."""
    done = 0
    try:
        if head:
            done = write_at(fd, head, offset)
            if done < len(head):
                return done
        for part in parts:
            while part.left:
                at = None if offset is None else offset + done
                try:
                    moved = os.splice(part.pipe.r, fd, part.left, offset_dst=at)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    data = _drain(part)
                    moved = write_at(fd, data, at)
                    done += moved
                    if moved < len(data):
                        return done
                    continue
                if not moved:
                    return done
                part.left -= moved
                done += moved
    except OSError:
        if done:
            return done
        raise
    return done


def _drain(part: PipePart) -> bytes:
    """What is left in `part`'s pipe, read out (it is all there: the pipe was filled first)."""
    data = bytearray()
    while len(data) < part.left:
        chunk = os.read(part.pipe.r, part.left - len(data))
        if not chunk:
            break
        data += chunk
    part.left -= len(data)
    return bytes(data)


def open_inline(root: TargetRoot, path: bytes, flags: int, max_size: int = -1) -> int | Any:
    """openat2(path, flags) for a regular file on a local file system (of at most `max_size`
    bytes when that is not -1), without a call that may block: the path is looked up with
    O_PATH (which never waits on a FIFO or a device), checked, then the same inode is opened
    through /proc/self/fd. NOT_INLINE for anything else (nothing is left open then)."""
    opened = _open_checked(root, path, flags, max_size)
    return opened if opened is NOT_INLINE else opened[0]


def _open_checked(
    root: TargetRoot, path: bytes, flags: int, max_size: int
) -> tuple[int, os.stat_result] | Any:
    """`open_inline`'s work: (the fd, the stat of the looked-up inode, taken before the open)."""
    if not root.paths_inline or flags & ~_INLINE_FLAGS or flags & os.O_ACCMODE == os.O_ACCMODE:
        return NOT_INLINE
    looked_up = root.open(path, _O_PATH | (flags & os.O_NOFOLLOW))
    try:
        st = os.fstat(looked_up)
        if (
            not stat_module.S_ISREG(st.st_mode)
            or (max_size >= 0 and st.st_size > max_size)
            or fstatfs(looked_up)[0] not in _LOCAL_FS_TYPES
        ):
            return NOT_INLINE
        # /proc/self/fd/N is itself a (magic) link: O_NOFOLLOW was applied by the lookup
        fd = os.open(f"/proc/self/fd/{looked_up}", (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC)
        return fd, st
    finally:
        os.close(looked_up)


def fetch_inline(
    root: TargetRoot, path: bytes, flags: int, max_size: int
) -> tuple[int, list[int], bytes | None] | Any:
    """FileFetch on the event loop, for a regular file on a local file system of at most
    `INLINE_READ_MAX` bytes (else NOT_INLINE): `fetch_file`'s result with the fewest calls.
    The stat of the lookup serves the checks and the reply (the same inode is opened through
    /proc/self/fd), and the content is one pread of the stat's size plus one byte: a short
    read is the end of a regular file, so only a file that grew since the stat reads on.
    An open that truncates is stat'ed again after it (`fetch_file`). A file whose content
    does not come along (bigger than `max_size`, opened write-only) is opened inline whatever
    its size: only the read of a large one waits for a worker."""
    opened = _open_checked(root, path, flags, -1)
    if opened is NOT_INLINE:
        return NOT_INLINE
    fd, st = opened
    if st.st_size > INLINE_READ_MAX and _content_comes_along(flags, st, max_size):
        os.close(fd)  # the worker opens it again and reads it
        return NOT_INLINE
    # a truncating open changed the size the lookup saw: fetch_file stats it again
    return fetch_file(fd, flags, max_size, None if flags & os.O_TRUNC else st)


def _content_comes_along(flags: int, st: os.stat_result, max_size: int) -> bool:
    """Whether FileFetch reads the file opened with `flags` (`fetch_file`'s rule)."""
    return (
        stat_module.S_ISREG(st.st_mode)
        and st.st_size <= max_size
        and not flags & _O_PATH
        and flags & os.O_ACCMODE != os.O_WRONLY
    )


def _read_whole(fd: int, max_size: int, size: int = -1) -> bytes | None:
    """The whole file from offset 0 (the fd's own offset untouched), or None if it has grown
    beyond `max_size`. `size`: the stat's size of a file whose short read is its end (a
    regular file of a local file system, checked by the caller): one pread of size + 1 bytes
    then reads it, and only a file that grew since reads on; -1: read until a read returns
    nothing (a FUSE file may return less before its end)."""
    chunks: list[bytes] = []
    total = 0
    if size >= 0:
        data = os.pread(fd, size + 1, 0)
        if len(data) <= size:
            return data
        chunks.append(data)
        total = len(data)
    while total <= max_size:
        chunk = os.pread(fd, max_size + 1 - total, total)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    return None


def fetch_file(
    fd: int, flags: int, max_size: int, st: os.stat_result | None = None
) -> tuple[int, list[int], bytes | None]:
    """FileFetch on an opened `fd` (owned from here on): (the fd, or -1 when the content came
    along and the open was read-only, so it is closed; its stat; the content of a regular
    file of at most `max_size` bytes opened for reading, else None). `st`: the file's stat
    when the caller has it (the inline lookup's: a local file system, so a short read is the
    end), else it is fstat'ed."""
    try:
        inline = st is not None
        if st is None:
            st = os.fstat(fd)
        data = None
        if _content_comes_along(flags, st, max_size):
            data = _read_whole(fd, max_size, st.st_size if inline else -1)
        if data is not None and flags & os.O_ACCMODE == os.O_RDONLY:
            os.close(fd)
            fd = -1
        return fd, stat_list(st), data
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
