"""Read-ahead and write-behind of handle-backed remote files (native/files_buffer.c), from
real programs under the layer: what they read is the target's file, what they wrote is on the
target after close, fsync, fork, exec and exit, and a write-back the target refuses is the
error of the close or fsync that caused it."""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings
from mirrord.protocol import messages as m
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import PYTHON, Runner

HERE = Path(__file__).resolve().parent
# fetch_limit 1000: every file below is bigger, so it is handle-backed and buffered (on the
# relayed path: a local target's agent would hand the files over, test_handover.py)
BUFFERED = LayerSettings(fs_mode="write", timeout_ms=5000, fetch_limit=1000, fs_handover=False)


def _content(n: int) -> bytes:
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n // 32 + 1))[:n]


def _count(daemon: LayerDaemon, kind: str) -> int:
    return daemon.kinds().count(kind)


def test_small_reads_are_served_from_the_read_ahead(run: Runner, daemon: LayerDaemon) -> None:
    content = _content(3 * 1024 * 1024 + 123)
    daemon.add_file("/app/big.bin", content)
    code = """
import hashlib, os
fd = os.open('/app/big.bin', os.O_RDONLY)
parts = []
while chunk := os.read(fd, 4096):
    parts.append(chunk)
data = b''.join(parts)
print(len(data), hashlib.sha256(data).hexdigest())
# back and forth: lseek is the layer's, the bytes are the target's
print(os.lseek(fd, 1000, os.SEEK_SET), os.read(fd, 16).hex())
print(os.lseek(fd, -16, os.SEEK_END), os.read(fd, 64).hex(), os.read(fd, 64))
print(os.pread(fd, 8, 2 * 1024 * 1024).hex())
big = os.pread(fd, 3 * 1024 * 1024, 5)
os.lseek(fd, 0, os.SEEK_SET)
whole = os.read(fd, 8 * 1024 * 1024)
print(hashlib.sha256(big).hexdigest(), len(whole), hashlib.sha256(whole).hexdigest())
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().splitlines()
    assert out == [
        f"{len(content)} {hashlib.sha256(content).hexdigest()}",
        f"1000 {content[1000:1016].hex()}",
        f"{len(content) - 16} {content[-16:].hex()} b''",
        content[2 * 1024 * 1024 : 2 * 1024 * 1024 + 8].hex(),
        f"{hashlib.sha256(content[5 : 5 + 3 * 1024 * 1024]).hexdigest()} {len(content)} "
        f"{hashlib.sha256(content).hexdigest()}",
    ]
    # 3 MiB in 4 KiB reads would be 769 requests through the handle
    assert _count(daemon, "FileRead") < 40


@pytest.mark.parametrize("size", [1024 * 1024, 700 * 1024])
def test_large_sequential_reads_grow_the_read_ahead_window(
    run: Runner, daemon: LayerDaemon, size: int
) -> None:
    """Reads that begin inside the read-ahead and go past it are sequential: the window grows
    to FB_MAX_WINDOW (8 MiB, eight requests) and the reads after it are served from it. (It
    was reset on each such read: every read then cost a round trip for its rest, two requests
    per read.)"""
    content = _content(24 * 1024 * 1024 + 7)
    daemon.add_file("/app/big.bin", content)
    code = f"""
import hashlib, os
fd = os.open('/app/big.bin', os.O_RDONLY)
parts = []
while chunk := os.read(fd, {size}):
    parts.append(chunk)
data = b''.join(parts)
print(len(data), hashlib.sha256(data).hexdigest())
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().split()
    assert out == [str(len(content)), hashlib.sha256(content).hexdigest()]
    # ~1 request per MiB once the window is grown (24 MiB: 30-32 with the first small
    # windows); reset windows made it
    # two requests per read (40 here for 1 MiB reads)
    assert _count(daemon, "FileRead") <= 34, _count(daemon, "FileRead")


def _paused(
    run: Runner, daemon: LayerDaemon, code: str, first: bytes, meanwhile: Callable[[], None]
) -> bytes:
    """Runs `code` under the layer until it prints the line `first`, then `meanwhile()` while
    it waits for a line on its stdin, then lets it finish: the rest of its output."""
    daemon.start()
    proc = subprocess.Popen(
        [PYTHON, "-S", "-c", code],
        env=run.env(BUFFERED),
        cwd=run.cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == first + b"\n"
        meanwhile()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
        return out
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _reads(daemon: LayerDaemon) -> list[m.FileRead]:
    return [msg for msg in daemon.requests() if isinstance(msg, m.FileRead)]


def _asked(daemon: LayerDaemon) -> int:
    return max((r.offset + r.size for r in _reads(daemon) if r.offset is not None), default=0)


def test_the_read_ahead_runs_ahead_while_the_app_works(run: Runner, daemon: LayerDaemon) -> None:
    """Once a file is read on past its first window, the read-ahead has a daemon connection of
    its own and asks for the next MiBs as the app consumes each one: while the app does
    something else after three 1 MiB reads, the target is already asked for the bytes up to
    2 MiB past where it stopped (the window by then; it grows to 8 MiB). The batch read-ahead
    had asked up to 3.5 MiB then: nothing moved between the app's reads."""
    content = _content(12 * 1024 * 1024 + 99)
    daemon.add_file("/app/stream.bin", content)
    code = """
import hashlib, os, sys
fd = os.open('/app/stream.bin', os.O_RDONLY)
parts = [os.read(fd, 1 << 20) for _ in range(3)]
sys.stdout.write('read\\n'); sys.stdout.flush()
sys.stdin.readline()  # the test looks at what was asked for meanwhile
while chunk := os.read(fd, 1 << 20):
    parts.append(chunk)
data = b''.join(parts)
print(len(data), hashlib.sha256(data).hexdigest())
"""
    asked = [0]

    def look() -> None:
        deadline = time.monotonic() + 10  # the daemon's thread records what the app sent
        while (got := _asked(daemon)) < 5 << 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        asked[0] = got

    out = _paused(run, daemon, code, b"read", look)
    assert asked[0] == 5 << 20, asked
    assert out.split() == [str(len(content)).encode(), hashlib.sha256(content).hexdigest().encode()]
    # ~1 request per MiB, and a few past the end of the file
    assert len(_reads(daemon)) <= 20, len(_reads(daemon))


def test_many_files_read_at_once_seeks_and_a_fork_read_the_right_bytes(
    run: Runner, daemon: LayerDaemon
) -> None:
    """Twelve files read in turns, with seeks, then a fork in the middle of a streamed read:
    every byte is the target's. At most 8 files of a process stream on connections of their
    own (FB_STREAMS); the others read ahead in batches on the shared one. Before fork the
    streams are closed with replies in flight: parent and child go on at the handle's offset,
    which the agent keeps for both."""
    files = {f"/app/many{i}.bin": _content(2 * 1024 * 1024 + 1000 * i) for i in range(12)}
    forked = _content(5 * 1024 * 1024)
    for path, content in files.items():
        daemon.add_file(path, content)
    daemon.add_file("/app/forked.bin", forked)
    code = """
import hashlib, os, sys
names, forked = sys.argv[2:], sys.argv[1]
fds = [os.open(n, os.O_RDONLY) for n in names]
parts = {fd: [] for fd in fds}
for turn in range(40):
    for fd in fds:
        if turn == 5:
            os.lseek(fd, 300000, os.SEEK_SET)  # back: read again from there
            parts[fd] = [os.pread(fd, 300000, 0)]
        if chunk := os.read(fd, 96 * 1024):
            parts[fd].append(chunk)
for n, fd in zip(names, fds):
    data = b''.join(parts[fd])
    print(n, len(data), hashlib.sha256(data).hexdigest())
fd = os.open(forked, os.O_RDONLY)
first = os.read(fd, 1 << 20) + os.read(fd, 1 << 20)  # streaming now, replies in flight
pid = os.fork()
if pid == 0:
    child = os.read(fd, 4096)
    os._exit(0 if child == open(forked, 'rb').read()[2 << 20:(2 << 20) + 4096] else 3)
_, status = os.waitpid(pid, 0)
rest = os.read(fd, 1 << 20)
print('fork', os.waitstatus_to_exitcode(status), hashlib.sha256(first).hexdigest(),
      hashlib.sha256(rest).hexdigest())
"""
    argv = [PYTHON, "-S", "-c", code, "/app/forked.bin", *sorted(files)]
    out = run(argv, settings=BUFFERED).stdout.decode().splitlines()
    assert out[:-1] == [
        f"{path} {len(c)} {hashlib.sha256(c).hexdigest()}" for path, c in sorted(files.items())
    ]
    assert out[-1].split() == [
        "fork",
        "0",
        hashlib.sha256(forked[: 2 << 20]).hexdigest(),
        hashlib.sha256(forked[(2 << 20) + 4096 : (3 << 20) + 4096]).hexdigest(),
    ]
    hellos = [pid for pid, msg in daemon.messages if isinstance(msg, m.LayerHello)]
    # the app's connections: its own, and one per stream, at most 8 at once; the twelve files
    # stay open to the end, so the forked file's stream is a 9th only if one had closed (none
    # did: before fork the streams are closed, and the forked file streamed before that)
    assert 1 + 8 >= hellos.count(hellos[0]) >= 1 + 1, hellos


@pytest.mark.parametrize("read_ahead", [0, 8192])
def test_the_first_read_ahead_is_the_configured_one(
    run: Runner, daemon: LayerDaemon, read_ahead: int
) -> None:
    """feature.fs.readonly_file_buffer: 0 leaves every read a request at the handle's offset;
    8192 makes the first read of 4 KiB ask for 8 KiB (the default, 128000, asks for 125 KiB)."""
    content = _content(2 * 1024 * 1024)
    daemon.add_file("/app/ra.bin", content)
    code = """
import os
fd = os.open('/app/ra.bin', os.O_RDONLY)
print(os.read(fd, 4096).hex(), os.read(fd, 4096).hex(), os.read(fd, 4096).hex())
"""
    settings = dataclasses.replace(BUFFERED, read_ahead=read_ahead)
    out = run.py(code, settings=settings).stdout.decode().split()
    assert out == [content[i : i + 4096].hex() for i in (0, 4096, 8192)]
    reads = [(r.offset, r.size) for r in _reads(daemon)]
    if read_ahead == 0:
        assert reads == [(None, 4096)] * 3
    else:
        # the third read: the next window, 16 KiB, its slots ending on multiples of 16 KiB
        assert reads == [(0, 8192), (8192, 8192), (16384, 16384)], reads


def test_a_file_that_grows_is_read_to_its_new_end(run: Runner, daemon: LayerDaemon) -> None:
    """A short read-ahead is the end of the file as it was: nothing past it is kept, so what
    the target's file grew by is read on (tail -f)."""
    daemon.add_file("/app/grow.log", b"a" * 5000)
    code = """
import os, sys
fd = os.open('/app/grow.log', os.O_RDONLY)
sys.stdout.write(f'{len(os.read(fd, 100000))}\\n'); sys.stdout.flush()
sys.stdin.readline()  # the target's file grows meanwhile
rest = os.read(fd, 100000)
print(len(rest), set(rest))
"""

    def grow() -> None:
        with open(daemon.host_path("/app/grow.log"), "ab") as f:
            f.write(b"b" * 3000)

    out = _paused(run, daemon, code, b"5000", grow)
    assert out == b"3000 {98}\n"


def test_small_writes_reach_the_target_at_close(run: Runner, daemon: LayerDaemon) -> None:
    daemon.add_file("/app/data.bin", b"x" * 8192)
    code = """
import os
fd = os.open('/app/data.bin', os.O_WRONLY)
for i in range(600):
    assert os.write(fd, bytes([i % 251]) * 4096) == 4096
print(os.lseek(fd, 0, os.SEEK_CUR), os.fstat(fd).st_size)
os.close(fd)
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().split()
    assert out == [str(600 * 4096), str(600 * 4096)]
    assert daemon.files["/app/data.bin"] == b"".join(bytes([i % 251]) * 4096 for i in range(600))
    # 600 writes through the handle would be 600 requests; the buffer sends ~1 MiB each
    assert _count(daemon, "FileWrite") < 10


def test_full_buffers_go_out_while_the_app_writes_on(run: Runner, daemon: LayerDaemon) -> None:
    """A full write-behind buffer is sent without waiting for its reply: the target has the
    first MiBs while the app is still writing (before, nothing left before close with 4 MiB
    buffered), and close waits for every write-back."""
    daemon.add_file("/app/stream.bin", b"\0" * 4096)
    code = """
import os, sys
fd = os.open('/app/stream.bin', os.O_WRONLY)
for i in range(3 * 256 + 1):  # 3 MiB and 4 KiB
    os.write(fd, bytes([i % 251]) * 4096)
sys.stdout.write('written\\n'); sys.stdout.flush()
sys.stdin.readline()  # the test looks at what reached the target meanwhile
os.close(fd)
print('closed')
"""
    sent = [0]

    def look() -> None:
        deadline = time.monotonic() + 10
        while _count(daemon, "FileWrite") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        sent[0] = _count(daemon, "FileWrite")

    out = _paused(run, daemon, code, b"written", look)
    sent_while_writing = sent[0]
    assert sent_while_writing >= 2  # full buffers (~1 MiB each) went out before close
    assert out == b"closed\n"
    assert daemon.files["/app/stream.bin"] == b"".join(
        bytes([i % 251]) * 4096 for i in range(3 * 256 + 1)
    )
    assert _count(daemon, "FileWrite") == 4  # three full buffers and the rest, at close


def test_a_failed_write_back_is_the_error_of_a_later_write(
    run: Runner, daemon: LayerDaemon
) -> None:
    """A write-back the app did not wait for fails: the fd's next write says so (as NFS
    reports an asynchronous write's error), once; close reports those still in flight."""
    daemon.add_file("/app/limit.bin", b"=" * 4096)
    daemon.start()
    _limit_agent_file_size(daemon, 64 * 1024)
    code = """
import errno, os
fd = os.open('/app/limit.bin', os.O_WRONLY)
os.lseek(fd, 1 << 20, os.SEEK_SET)
failed = None
for i in range(8 * 256):
    try:
        os.write(fd, b'x' * 4096)
    except OSError as e:
        failed = (i, errno.errorcode[e.errno])
        break
print(failed[1], failed[0] >= 255)
try:
    os.close(fd)
    print('close ok')
except OSError as e:
    print('close', errno.errorcode[e.errno])
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().splitlines()
    assert out[0] == "EFBIG True"  # a later write: the first ones went into the buffer
    assert out[1] in ("close ok", "close EFBIG")  # ok when nothing was in flight any more
    assert daemon.files["/app/limit.bin"] == b"=" * 4096


def test_writes_are_read_back_through_the_same_and_another_fd(
    run: Runner, daemon: LayerDaemon
) -> None:
    daemon.add_file("/app/rw.bin", b"0" * 5000)
    code = """
import os
fd = os.open('/app/rw.bin', os.O_RDWR)
os.write(fd, b'hello')
os.lseek(fd, 4998, os.SEEK_SET)
os.write(fd, b'WORLD')
print(os.lseek(fd, 0, os.SEEK_END))
print(os.pread(fd, 7, 0), os.pread(fd, 8, 4996))
other = os.open('/app/rw.bin', os.O_RDONLY)
print(os.pread(other, 5, 0))
os.lseek(fd, 0, os.SEEK_SET)
os.write(fd, b'again')
with open('/app/rw.bin', 'rb') as f:  # a remote open of the path: written back first
    print(f.read(5))
os.close(other)
os.close(fd)
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().splitlines()
    assert out == ["5003", "b'hello00' b'00WORLD'", "b'hello'", "b'again'"]
    assert daemon.files["/app/rw.bin"] == b"again" + b"0" * 4993 + b"WORLD"


def test_dup_fds_share_the_buffer_and_the_offset(run: Runner, daemon: LayerDaemon) -> None:
    daemon.add_file("/app/dup.bin", b"." * 4000)
    code = """
import os
fd = os.open('/app/dup.bin', os.O_WRONLY)
os.write(fd, b'one,')
d = os.dup(fd)
os.write(d, b'two,')
os.dup2(fd, 50)
os.close(fd)        # written back; the other fds keep the file and the offset
os.write(50, b'three,')
os.write(d, b'four')
os.close(50)
print(os.lseek(d, 0, os.SEEK_CUR))
os.close(d)
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().split()
    assert out == ["18"]
    assert daemon.files["/app/dup.bin"] == b"one,two,three,four" + b"." * 3982


def test_fork_child_continues_at_the_shared_offset(run: Runner, daemon: LayerDaemon) -> None:
    daemon.add_file("/app/fork.bin", b"-" * 3000)
    code = """
import os
fd = os.open('/app/fork.bin', os.O_RDWR)
os.write(fd, b'parent1,')
pid = os.fork()
if pid == 0:
    os.write(fd, b'child,')
    os._exit(0)           # _exit: the child's buffer is written back all the same
os.waitpid(pid, 0)
os.write(fd, b'parent2')
os.lseek(fd, 0, os.SEEK_SET)
print(os.read(fd, 21))
os.close(fd)
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().split()
    assert out == ["b'parent1,child,parent2'"]
    assert daemon.files["/app/fork.bin"] == b"parent1,child,parent2" + b"-" * 2979


def test_exec_inherits_what_was_written_and_the_offset(run: Runner, daemon: LayerDaemon) -> None:
    daemon.add_file("/app/exec.bin", b"_" * 2000)
    code = """
import os, subprocess
fd = os.open('/app/exec.bin', os.O_WRONLY)
os.write(fd, b'before-exec,')
subprocess.run(['sh', '-c', 'printf from-sh, >&%d' % fd], pass_fds=[fd], check=True)
os.write(fd, b'after')
os.close(fd)
"""
    run.py(code, settings=BUFFERED)
    assert daemon.files["/app/exec.bin"] == b"before-exec,from-sh,after" + b"_" * 1975


def test_pending_writes_reach_the_target_at_exit(run: Runner, daemon: LayerDaemon) -> None:
    daemon.add_file("/app/exit.bin", b" " * 2000)
    code = "import os\nfd = os.open('/app/exit.bin', os.O_WRONLY)\nos.write(fd, b'not closed')\n"
    run.py(code, settings=BUFFERED)
    assert daemon.files["/app/exit.bin"] == b"not closed" + b" " * 1990


def _limit_agent_file_size(daemon: LayerDaemon, limit: int) -> None:
    """The agent's writes beyond `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    pid = daemon.agent_pid()
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_a_refused_write_back_is_the_error_of_close_and_fsync(
    run: Runner, daemon: LayerDaemon
) -> None:
    daemon.add_file("/app/full.bin", b"=" * 4096)
    daemon.start()
    _limit_agent_file_size(daemon, 64 * 1024)
    code = """
import errno, os
fd = os.open('/app/full.bin', os.O_WRONLY)
os.lseek(fd, 1 << 20, os.SEEK_SET)
assert os.write(fd, b'past the limit') == 14   # buffered: accepted
try:
    os.fsync(fd)
except OSError as e:
    print('fsync', errno.errorcode[e.errno])
os.lseek(fd, 0, os.SEEK_SET)
os.write(fd, b'fits')
os.fsync(fd)
print('fsync ok')
os.lseek(fd, 1 << 20, os.SEEK_SET)
os.write(fd, b'past again')
try:
    os.close(fd)
except OSError as e:
    print('close', errno.errorcode[e.errno])
try:
    os.close(fd)
except OSError as e:
    print('closed', errno.errorcode[e.errno])
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().splitlines()
    assert out == ["fsync EFBIG", "fsync ok", "close EFBIG", "closed EBADF"]
    assert daemon.files["/app/full.bin"] == b"fits" + b"=" * 4092


@pytest.fixture(scope="module")
def buffers_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cbuild") / "buffers"
    subprocess.run(
        ["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(HERE / "c" / "buffers.c")],
        check=True,
        timeout=60,
    )
    return out


def test_c_program_writes_reads_forks_and_sees_errors(
    run: Runner, daemon: LayerDaemon, buffers_program: Path
) -> None:
    size = 2 * 1024 * 1024
    daemon.add_file("/app/c.bin", b"\0" * size)
    daemon.add_file("/app/c-full.bin", b"\0" * 4096)
    daemon.start()
    _limit_agent_file_size(daemon, 3 * 1024 * 1024)
    out = run(
        [str(buffers_program), "/app/c.bin", "/app/c-full.bin"], settings=BUFFERED, check=False
    )
    lines = out.stdout.decode().splitlines()
    assert out.returncode == 0 and not [x for x in lines if "FAIL" in x], out.stdout.decode()
    assert lines[-1] == "done"
    expected = bytearray(size)
    for i in range(size // 4096):
        expected[i * 4096 : (i + 1) * 4096] = bytes([i % 256]) * 4096
    expected[:5] = b"child"
    assert daemon.files["/app/c.bin"] == bytes(expected)


def test_local_files_are_not_buffered(run: Runner, daemon: LayerDaemon) -> None:
    local = run.cwd / "local.bin"
    local.write_bytes(b"." * 5000)
    code = """
import os
fd = os.open('local.bin', os.O_RDWR)
os.write(fd, b'local')
print(open('local.bin', 'rb').read(5))  # no buffer: visible before close
os.close(fd)
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().split()
    assert out == ["b'local'"]
    assert "FileWrite" not in daemon.kinds()


def test_threads_share_one_buffered_fd(run: Runner, daemon: LayerDaemon) -> None:
    """The buffer and the offset are the open file's: threads reading (or writing) one fd
    get every byte once, in some order, as with a local file."""
    content = _content(2 * 1024 * 1024)
    daemon.add_file("/app/threads.bin", content)
    daemon.add_file("/app/threads-out.bin", b"\0" * 2000)
    code = """
import hashlib, os, threading
fd = os.open('/app/threads.bin', os.O_RDONLY)
parts = {}
def reader(k):
    while True:
        chunk = os.read(fd, 1000 + k)
        if not chunk:
            return
        parts.setdefault(k, []).append(len(chunk))
threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(sum(v) for v in parts.values()))
pieces = []
def preader(k):
    for i in range(k, 64, 4):
        pieces.append((i, os.pread(fd, 32768, i * 32768)))
threads = [threading.Thread(target=preader, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(hashlib.sha256(b''.join(p for _, p in sorted(pieces))).hexdigest())
out = os.open('/app/threads-out.bin', os.O_WRONLY)
def writer(k):
    for _ in range(50):
        os.write(out, bytes([65 + k]) * 100)
threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
os.close(out)
"""
    out = run.py(code, settings=BUFFERED).stdout.decode().split()
    assert out == [str(len(content)), hashlib.sha256(content).hexdigest()]
    written = daemon.files["/app/threads-out.bin"]
    assert len(written) == 20000
    # every write landed whole, none overwrote another: 50 runs of 100 bytes per thread
    assert sorted(written[i : i + 100] for i in range(0, 20000, 100)) == sorted(
        bytes([65 + k]) * 100 for k in range(4) for _ in range(50)
    )
