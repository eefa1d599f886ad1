"""The layer against the real daemon and agent (`mirrord run` into a local pod): files,
directories, DNS, outgoing connections and forked children, as a user would see them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import Mirrord, temp_mirrord

pytestmark = pytest.mark.netns

SPEC = PodSpec(
    files={"/app/test.txt": b"pod-only file\n", "/app/conf/a.yaml": b"a: 1\n"},
    hosts={"pod-only-service": "10.213.250.9"},
)

FORKS = r"""
import os, socket, sys
kids = []
for i in range(5):
    pid = os.fork()
    if pid == 0:
        data = open('/app/test.txt').read()
        s = socket.create_connection(('127.0.0.1', 7777), timeout=10)
        s.sendall(f'child {i}\n'.encode())
        echo = s.makefile('rb').readline().decode()
        os._exit(0 if data == 'pod-only file\n' and echo == f'child {i}\n' else 1)
    kids.append(pid)
print('children ok', all(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) == 0 for k in kids))
print('dns', socket.getaddrinfo('pod-only-service', 80, proto=socket.IPPROTO_TCP)[0][4][0])
print('listdir', sorted(os.listdir('/app')))
"""


@pytest.fixture
def mirrord() -> Iterator[Mirrord]:
    with temp_mirrord("mrdl") as cli:
        yield cli


def test_programs_see_the_pod_through_the_real_daemon_and_agent(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    target = f"pid/{pod.pid}"
    result = mirrord.run(
        "run",
        "-t",
        target,
        "--",
        "bash",
        "-c",
        "cat /app/test.txt; ls /app; [[ -r /app/conf/a.yaml ]] && echo readable",
    )
    assert result.stdout.splitlines() == ["pod-only file", "conf", "test.txt", "readable"], (
        result.stderr
    )
    app = tmp_path / "forks.py"
    app.write_text(FORKS)
    result = mirrord.run("run", "-t", target, "--", sys.executable, str(app), timeout=90)
    assert result.stdout.splitlines() == [
        "children ok True",
        "dns 10.213.250.9",
        "listdir ['conf', 'test.txt']",
    ], result.stderr
