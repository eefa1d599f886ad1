"""Files of the target, confined to its root, and the per-channel handle tables.

Owns: every file operation of the agent protocol (kinds 10-37), done under the target's root
with `openat2(RESOLVE_IN_ROOT)` (syscall 437 through ctypes): an absolute symlink, a leading
`/` or any number of `..` resolve inside `/proc/PID/root`, never on the node. Path operations
that must not follow the last component (lstat, readlink, unlink, rmdir, mkdir, rename) open
the *parent* confined and act on the last name relative to it. Magic links (`/proc/*/fd/*`,
`/proc/*/root`) are refused, as they could name anything on the node.

Everything here is blocking and runs in worker threads (`_workers.py`), except the small
operations on regular local files that `_files_inline.py` decides to answer on the event
loop. A `HandleTable` belongs to one channel; handles are small integers that
the layer maps to its own fds. Does not own: message dispatch (`_channel.py`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat as stat_module
import threading
from dataclasses import dataclass, field

from mirrord._splice import PipePart, PipePool

__all__ = [
    "DirHandle",
    "FileHandle",
    "HandleTable",
    "TargetRoot",
    "fstatfs",
    "stat_list",
    "utimens_at",
]

_SYS_OPENAT2 = 437  # same number on every architecture (new syscalls are unified)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: __fsword_t/fsblkcnt_t/fsfilcnt_t are all 8 bytes.
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def stat_list(st: os.stat_result) -> list[int]:
    """The wire shape of a stat (messages.STAT_FIELDS)."""
    return [
        st.st_dev,
        st.st_ino,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_size,
        st.st_blksize,
        st.st_blocks,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
    ]


def fstatfs(fd: int) -> list[int]:
    """The wire shape of fstatfs(fd) (messages.STATFS_FIELDS); works on O_PATH fds."""
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        _raise_errno("fstatfs")
    return [
        buf.f_type & 0xFFFFFFFF,
        buf.f_bsize,
        buf.f_blocks,
        buf.f_bfree,
        buf.f_bavail,
        buf.f_files,
        buf.f_ffree,
        buf.f_namelen,
        buf.f_frsize,
        buf.f_flags,
    ]


_AT_SYMLINK_NOFOLLOW = 0x100
_UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimens_at(
    dirfd: int, name: bytes | None, times: tuple[int | None, int | None], flags: int
) -> None:
    """utimensat(2) with UTIME_OMIT for a None time (os.utime cannot leave one time alone);
    `name` None is futimens on `dirfd`."""
    spec = (_Timespec * 2)()
    for i, ns in enumerate(times):
        if ns is None:
            spec[i].tv_sec, spec[i].tv_nsec = 0, _UTIME_OMIT
        else:
            spec[i].tv_sec, spec[i].tv_nsec = divmod(ns, 1_000_000_000)
    # glibc's utimensat refuses a NULL name (EINVAL): futimens is its call for an fd
    rc = _libc.futimens(dirfd, spec) if name is None else _libc.utimensat(dirfd, name, spec, flags)
    if rc != 0:
        _raise_errno("utimensat")


def read_into_pipe(
    fd: int, size: int, offset: int | None, pipes: PipePool, *, regular: bool = False
) -> tuple[PipePart, bytes] | bytes:
    """A large read (at most `SPLICE_MAX`) of the regular file `fd`, at `offset` (None: at its
    position, which moves): its page-cache pages spliced into a pipe of `pipes`, no byte
    copied (`mirrord._splice`), and the bytes the pipe had no room for (a read that is not
    page-aligned), read into memory. Short only at the end of the file, as `pread`. Anything
    that is not a regular file, or a file system that cannot splice, is read with `pread`
    (bytes). Blocks like a read (a worker's call, or `splice_cached`'s: `regular`, the caller
    knows `fd` is a regular file)."""
    if not regular and not stat_module.S_ISREG(os.fstat(fd).st_mode):
        return _read(fd, size, offset)
    try:
        pipe = pipes.take()
    except OSError:
        return _read(fd, size, offset)
    total, full = 0, False
    try:
        while total < size:
            moved = os.splice(
                fd, pipe.w, size - total, offset_src=None if offset is None else offset + total
            )
            if not moved:
                break
            total += moved
    except BlockingIOError:
        full = True  # the pipe is full: the rest is read into memory
    except OSError as exc:
        if total:  # as read(2): what was read before the error
            return PipePart(pipe, total, pipes), b""
        pipes.give(pipe, True)
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        return _read(fd, size, offset)  # this file system cannot splice
    if not total:
        pipes.give(pipe, True)
        return _read(fd, size, offset) if full else b""
    rest = _read(fd, size - total, None if offset is None else offset + total) if full else b""
    return PipePart(pipe, total, pipes), rest


def _read(fd: int, size: int, offset: int | None) -> bytes:
    return os.read(fd, size) if offset is None else os.pread(fd, size, offset)


def _d_type(mode: int) -> int:
    for test, value in (
        (stat_module.S_ISREG, 8),
        (stat_module.S_ISDIR, 4),
        (stat_module.S_ISLNK, 10),
        (stat_module.S_ISCHR, 2),
        (stat_module.S_ISBLK, 6),
        (stat_module.S_ISFIFO, 1),
        (stat_module.S_ISSOCK, 12),
    ):
        if test(mode):
            return value
    return 0


# mount types where a path lookup may wait on the network or a helper (automount, FUSE)
_BLOCKING_MOUNTS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre"}
    | {"gpfs", "ncpfs", "coda", "davfs", "autofs", "virtiofs", "fuse", "fuseblk", "beegfs"}
)


def _paths_inline(pid: int) -> bool:
    """Whether path lookups in the target may run on the event loop: none of its mounts is of
    a network, FUSE or automount type (read from its mountinfo; unreadable: no)."""
    try:
        with open(f"/proc/{pid}/mountinfo", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        _, sep, rest = line.partition(" - ")
        fs_type = rest.split(" ", 1)[0].split(".", 1)[0]  # "fuse.sshfs" -> "fuse"
        if not sep or fs_type in _BLOCKING_MOUNTS:
            return False
    return True


class TargetRoot:
    """The target's root directory, opened once; every path is resolved inside it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.paths_inline = _paths_inline(pid)  # see _files_inline.py

    def __repr__(self) -> str:
        return f"<TargetRoot pid={self.pid} fd={self.fd}>"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open(self, path: bytes, flags: int, mode: int = 0) -> int:
        """openat2 under the root; returns a new fd (close-on-exec)."""
        if b"\0" in path:
            raise OSError(errno.EINVAL, "path contains a NUL byte")
        how = _OpenHow(
            flags=(flags | os.O_CLOEXEC) & 0xFFFFFFFF,
            # O_TMPFILE includes the O_DIRECTORY bit: test it whole, or a directory opened with
            # a mode (Python's os.open passes 0o777) gets EINVAL from openat2
            mode=mode & 0o7777 if flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE else 0,
            resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        )
        fd = _libc.syscall(
            _SYS_OPENAT2,
            self.fd,
            ctypes.c_char_p(path or b"."),
            ctypes.byref(how),
            ctypes.sizeof(how),
        )
        if fd < 0:
            _raise_errno("openat2")
        return int(fd)

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the confined parent directory, last name). The last name is never '.' or
        '..' or empty: such paths name the directory itself (callers then use `open`)."""
        stripped = path.rstrip(b"/")
        head, _, name = stripped.rpartition(b"/")
        if not stripped or name in (b"", b".", b".."):
            raise IsADirectoryError(errno.EISDIR, "path names a directory itself")
        if not head and stripped.startswith(b"/"):
            head = b"/"
        return self.open(head or b".", os.O_PATH | os.O_DIRECTORY), name

    def stat(self, path: bytes, follow: bool) -> list[int]:
        # A trailing slash makes the kernel follow the last component (`ls -l link-to-dir/`
        # lists the directory), so lstat of "link/" is a stat.
        if follow or path.endswith(b"/"):
            fd = self.open(path, os.O_PATH)
            try:
                return stat_list(os.fstat(fd))
            finally:
                os.close(fd)
        try:
            parent, name = self._parent(path)
        except IsADirectoryError:
            return self.stat(path, True)
        try:
            return stat_list(os.stat(name, dir_fd=parent, follow_symlinks=False))
        finally:
            os.close(parent)

    def statfs(self, path: bytes) -> list[int]:
        fd = self.open(path, os.O_PATH)
        try:
            return fstatfs(fd)
        finally:
            os.close(fd)

    def access(self, path: bytes, mode: int) -> None:
        fd = self.open(path, os.O_PATH)
        try:
            # The agent's /proc names the confined fd; access() checks the file itself.
            if not os.access(f"/proc/self/fd/{fd}", mode):
                raise OSError(errno.EACCES, "access denied")
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        if path.endswith(b"/"):
            # readlink("link/") names what the link points to: a directory, not a link
            fd = self.open(path, os.O_PATH)
            os.close(fd)
            raise OSError(errno.EINVAL, "not a symbolic link")
        parent, name = self._parent_or_einval(path)
        try:
            return os.readlink(name, dir_fd=parent)
        finally:
            os.close(parent)

    def _parent_or_einval(self, path: bytes) -> tuple[int, bytes]:
        try:
            return self._parent(path)
        except IsADirectoryError:
            raise OSError(errno.EINVAL, "not a symbolic link") from None

    def mkdir(self, path: bytes, mode: int) -> None:
        try:
            parent, name = self._parent(path)
        except IsADirectoryError:
            raise FileExistsError(errno.EEXIST, "exists") from None
        try:
            os.mkdir(name, mode, dir_fd=parent)
        finally:
            os.close(parent)

    def rmdir(self, path: bytes) -> None:
        try:
            parent, name = self._parent(path)
        except IsADirectoryError:
            # as Linux answers: "dir/." EINVAL, "dir/.." ENOTEMPTY, "/" EBUSY
            last = path.rstrip(b"/").rpartition(b"/")[2]
            code = {b".": errno.EINVAL, b"..": errno.ENOTEMPTY}.get(last, errno.EBUSY)
            raise OSError(code, os.strerror(code)) from None
        try:
            os.rmdir(name, dir_fd=parent)
        finally:
            os.close(parent)

    def unlink(self, path: bytes) -> None:
        parent, name = self._parent(path)
        try:
            os.unlink(name, dir_fd=parent)
        finally:
            os.close(parent)

    def rename(self, old: bytes, new: bytes) -> None:
        try:
            old_parent, old_name = self._parent(old)
        except IsADirectoryError:
            raise OSError(errno.EBUSY, "cannot rename this directory") from None
        try:
            try:
                new_parent, new_name = self._parent(new)
            except IsADirectoryError:
                raise OSError(errno.EBUSY, "cannot rename onto this directory") from None
            try:
                os.rename(old_name, new_name, src_dir_fd=old_parent, dst_dir_fd=new_parent)
            finally:
                os.close(new_parent)
        finally:
            os.close(old_parent)

    def utimens(self, path: bytes, times: tuple[int | None, int | None], follow: bool) -> None:
        """utimensat under the root; a time of None is left as it is (UTIME_OMIT)."""
        if follow or path.endswith(b"/"):
            fd = self.open(path, os.O_PATH)
            try:
                # the agent's /proc names the confined fd (works for O_PATH, unlike futimens)
                utimens_at(-100, f"/proc/self/fd/{fd}".encode(), times, 0)
            finally:
                os.close(fd)
            return
        try:
            parent, name = self._parent(path)
        except IsADirectoryError:
            return self.utimens(path, times, True)
        try:
            utimens_at(parent, name, times, _AT_SYMLINK_NOFOLLOW)
        finally:
            os.close(parent)

    def chown(self, path: bytes, uid: int, gid: int, follow: bool) -> None:
        if follow or path.endswith(b"/"):
            fd = self.open(path, os.O_PATH)
            try:
                os.chown(f"/proc/self/fd/{fd}", uid, gid)
            finally:
                os.close(fd)
            return
        try:
            parent, name = self._parent(path)
        except IsADirectoryError:
            return self.chown(path, uid, gid, True)
        try:
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    def symlink(self, target: bytes, path: bytes) -> None:
        try:
            parent, name = self._parent(path)
        except IsADirectoryError:
            raise FileExistsError(errno.EEXIST, "exists") from None
        try:
            os.symlink(target, name, dir_fd=parent)
        finally:
            os.close(parent)

    def link(self, old: bytes, new: bytes, follow: bool) -> None:
        try:
            new_parent, new_name = self._parent(new)
        except IsADirectoryError:
            raise FileExistsError(errno.EEXIST, "exists") from None
        try:
            if follow:
                # resolved confined first: the kernel would follow an absolute link on the node
                fd = self.open(old, os.O_PATH)
                try:
                    os.link(f"/proc/self/fd/{fd}", new_name, dst_dir_fd=new_parent)
                finally:
                    os.close(fd)
                return
            try:
                old_parent, old_name = self._parent(old)
            except IsADirectoryError:
                raise PermissionError(errno.EPERM, "cannot link a directory") from None
            try:
                os.link(
                    old_name,
                    new_name,
                    src_dir_fd=old_parent,
                    dst_dir_fd=new_parent,
                    follow_symlinks=False,
                )
            finally:
                os.close(old_parent)
        finally:
            os.close(new_parent)

    def opendir_fd(self, path: bytes) -> int:
        return self.open(path, os.O_RDONLY | os.O_DIRECTORY)


@dataclass(eq=False)
class FileHandle:
    """An open file of one channel. Closed only when no operation uses it any more."""

    fd: int
    users: int = 0
    closing: bool = False
    inline: bool = False  # a regular file on a local file system (_files_inline.py)

    def release_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False)
class DirHandle(FileHandle):
    """An open directory: entries are read in batches, `.` and `..` first like readdir."""

    entries: list[tuple[bytes, int, int]] | None = None
    position: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read_batch(self, root: TargetRoot, max_entries: int) -> list[tuple[bytes, int, int]]:
        with self.lock:
            if self.entries is None:
                self.entries = self._list(root)
            batch = self.entries[self.position : self.position + max_entries]
            self.position += len(batch)
            return batch

    def _list(self, root: TargetRoot) -> list[tuple[bytes, int, int]]:
        # Listing the whole directory once keeps batches consistent; its size is bounded by
        # what the target's file system holds in one directory.
        own = os.fstat(self.fd)
        parent_ino = own.st_ino
        root_st = os.fstat(root.fd)
        if (own.st_dev, own.st_ino) != (root_st.st_dev, root_st.st_ino):
            try:
                parent_ino = os.stat("..", dir_fd=self.fd).st_ino
            except OSError:
                pass
        out: list[tuple[bytes, int, int]] = [(b".", own.st_ino, 4), (b"..", parent_ino, 4)]
        with os.scandir(self.fd) as it:
            for entry in it:
                if entry.is_symlink():
                    kind = 10
                elif entry.is_dir(follow_symlinks=False):
                    kind = 4
                elif entry.is_file(follow_symlinks=False):
                    kind = 8
                else:
                    try:
                        kind = _d_type(entry.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        kind = 0
                out.append((os.fsencode(entry.name), entry.inode(), kind))
        return out

    def copy(self) -> DirHandle:
        """A handle for a forked channel: its own fd, the same position."""
        with self.lock:
            entries = list(self.entries) if self.entries is not None else None
            return DirHandle(fd=os.dup(self.fd), entries=entries, position=self.position)


class HandleTable:
    """Handle number -> open file or directory, for one channel.

    Mutated only from the event loop thread; the fds are used in worker threads between
    `acquire` and `release`, so a concurrent close never closes an fd under a running read.
    """

    def __init__(self) -> None:
        self._handles: dict[int, FileHandle] = {}
        self._next = 1

    def __repr__(self) -> str:
        return f"<HandleTable open={len(self._handles)}>"

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: FileHandle) -> int:
        number = self._next
        self._next += 1
        self._handles[number] = handle
        return number

    def acquire(self, number: int, kind: type[FileHandle] | None = FileHandle) -> FileHandle:
        handle = self._handles.get(number)
        if handle is None or handle.closing:
            raise OSError(errno.EBADF, f"no open handle {number}")
        if kind is DirHandle and not isinstance(handle, DirHandle):
            raise OSError(errno.EBADF, f"handle {number} is not a directory stream")
        if kind is FileHandle and isinstance(handle, DirHandle):
            raise OSError(errno.EBADF, f"handle {number} is a directory stream")
        handle.users += 1
        return handle

    def release(self, handle: FileHandle) -> None:
        handle.users -= 1
        if handle.closing and handle.users == 0:
            handle.release_fd()

    def take(self, number: int, kind: type[FileHandle] | None = FileHandle) -> FileHandle:
        """Remove `number` from the table and return it."""
        handle = self.acquire(number, kind)
        handle.users -= 1
        del self._handles[number]
        return handle

    def close(self, number: int, kind: type[FileHandle] | None = FileHandle) -> None:
        handle = self.acquire(number, kind)
        del self._handles[number]
        handle.closing = True
        self.release(handle)

    def close_all(self) -> None:
        for handle in self._handles.values():
            handle.closing = True
            if handle.users == 0:
                handle.release_fd()
        self._handles.clear()

    def copy(self) -> HandleTable:
        """A table for a forked channel: every handle duplicated, numbers kept."""
        table = HandleTable()
        for number, handle in self._handles.items():
            if handle.closing:
                continue
            if isinstance(handle, DirHandle):
                table._handles[number] = handle.copy()
            else:
                table._handles[number] = FileHandle(fd=os.dup(handle.fd), inline=handle.inline)
        table._next = self._next
        return table
