"""Hand-over of remote files (a local target's agent): the layer under test gets the agent's
own open file through the daemon (SCM_RIGHTS) and the app's reads, writes and seeks on it are
the kernel's; only the open crossed the daemon and the agent."""

from __future__ import annotations

import os

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
    assert out[0] == "True False"  # a write-back cache in a memfd
    assert daemon.host_path("/app/data.txt").read_bytes() == b"from the pod\nappended\n"
    assert all(r.handover_flags is None for r in daemon.requests() if isinstance(r, m.FileFetch))
