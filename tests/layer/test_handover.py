"""Hand-over of remote files (a local target's agent): the layer under test gets the agent's
own open file through the daemon (SCM_RIGHTS) and the app's reads, writes and seeks on it are
the kernel's; only the open crossed the daemon and the agent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mirrord.layer import LayerSettings
from mirrord.protocol import messages as m
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import Runner

APP = """
import os
fd = os.open('/app/data.txt', os.O_RDWR | os.O_APPEND)
print(os.readlink(f'/proc/self/fd/{fd}').startswith('/memfd:'), os.get_inheritable(fd))
print(os.read(fd, 100).decode().strip())
os.write(fd, b'appended\\n')
os.lseek(fd, 0, os.SEEK_SET)
print(len(os.read(fd, 100)), os.fstat(fd).st_size)
os.close(fd)
"""


def test_a_handed_over_file_is_read_and_written_with_no_request_after_the_open(
    run: Runner, daemon: LayerDaemon
) -> None:
    daemon.add_file("/app/data.txt", b"from the pod\n")
    out = run.py(APP, settings=LayerSettings(fs_mode="write")).stdout.decode().splitlines()
    assert out == ["False False", "from the pod", "22 22"]
    assert daemon.host_path("/app/data.txt").read_bytes() == b"from the pod\nappended\n"
    fetches = [r for r in daemon.requests() if isinstance(r, m.FileFetch)]
    data_fetches = [r for r in fetches if r.path == b"/app/data.txt"]
    assert len(data_fetches) == 1
    # the app's own flags, so O_APPEND appends in the pod's file as it would in the pod
    assert data_fetches[0].handover_flags == os.O_RDWR | os.O_APPEND
    kinds = set(daemon.kinds())
    assert not kinds & {"FileRead", "FileWrite", "FileSeek", "FileClose", "FileStat"}, kinds


def test_with_handover_off_the_file_is_served_through_the_agent(
    run: Runner, daemon: LayerDaemon
) -> None:
    daemon.add_file("/app/data.txt", b"from the pod\n")
    settings = LayerSettings(fs_mode="write", fs_handover=False)
    out = run.py(APP, settings=settings).stdout.decode().splitlines()
    # a write-back cache in a memfd; as in the pod, O_APPEND moves only the writes: the first
    # read starts at offset 0 (it used to start at the end and read nothing)
    assert out == ["True False", "from the pod", "22 22"]
    assert daemon.host_path("/app/data.txt").read_bytes() == b"from the pod\nappended\n"
    assert all(r.handover_flags is None for r in daemon.requests() if isinstance(r, m.FileFetch))


APPEND_RDWR = """
import os, sys
fd = os.open(sys.argv[1] if len(sys.argv) > 1 else '/app/big.txt', os.O_RDWR | os.O_APPEND)
out = [os.lseek(fd, 0, os.SEEK_CUR), os.read(fd, 4).decode()]
os.write(fd, b'<one>')
out.append(os.lseek(fd, 0, os.SEEK_CUR))
os.lseek(fd, 2, os.SEEK_SET)
out += [os.read(fd, 3).decode(), os.pwrite(fd, b'<two>', 0)]
os.write(fd, b'<three>')
out += [os.lseek(fd, 0, os.SEEK_CUR), os.fstat(fd).st_size]
os.close(fd)
print(*out)
"""


def test_a_large_file_opened_read_write_append_behaves_as_in_the_pod(
    run: Runner, daemon: LayerDaemon, tmp_path: Path
) -> None:
    """A handle-backed file (over fetch_limit) opened O_RDWR|O_APPEND: reads start at 0 and
    every write lands at the end, also after a seek (a write after a seek and a read used to
    overwrite the file at that offset)."""
    content = b"0123456789" * 200
    daemon.add_file("/app/big.txt", content)
    settings = LayerSettings(fs_mode="write", fetch_limit=1000, fs_handover=False)
    through = run.py(APPEND_RDWR, settings=settings).stdout.decode().split()
    local = tmp_path / "big.txt"
    local.write_bytes(content)
    direct = subprocess.run(
        [sys.executable, "-S", "-c", APPEND_RDWR, str(local)], capture_output=True, check=True
    )
    assert through == direct.stdout.decode().split()
    assert through[:2] == ["0", "0123"]
    assert daemon.host_path("/app/big.txt").read_bytes() == local.read_bytes()
    assert local.read_bytes() == content + b"<one><two><three>"


def test_an_append_open_starts_at_offset_0_as_in_the_pod(run: Runner, daemon: LayerDaemon) -> None:
    """open(O_WRONLY|O_APPEND) (`>>`, loggers) through the agent: the offset is 0 until the
    first write, which lands at the end of the file, as the kernel does it."""
    daemon.add_file("/app/log.txt", b"one\n")
    code = """
import os
fd = os.open('/app/log.txt', os.O_WRONLY | os.O_APPEND)
print(os.lseek(fd, 0, os.SEEK_CUR))
os.write(fd, b'two\\n')
print(os.lseek(fd, 0, os.SEEK_CUR))
os.close(fd)
"""
    settings = LayerSettings(fs_mode="write", fs_handover=False)
    assert run.py(code, settings=settings).stdout.decode().split() == ["0", "8"]
    assert daemon.host_path("/app/log.txt").read_bytes() == b"one\ntwo\n"
