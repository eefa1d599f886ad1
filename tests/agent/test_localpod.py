"""Local pods (the test stand-in for Kubernetes pods) are what the other tests assume."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec, cleanup_leftovers

pytestmark = pytest.mark.netns


def test_pod_has_its_own_files_env_hostname_and_services(
    make_pod: Callable[..., LocalPod],
) -> None:
    pod = make_pod(
        PodSpec(
            env={"GREETING": "hi"},
            files={"/app/test.txt": b"pod bytes\n", "/etc/shadow": b"pod shadow\n"},
            symlinks={"/app/link": "/etc/shadow"},
            hosts={"only-in-pod.test": "10.213.255.254"},
        )
    )
    assert Path(f"/proc/{pod.pid}/root/app/test.txt").read_bytes() == b"pod bytes\n"
    assert (
        not Path("/app/test.txt").exists() or Path("/app/test.txt").read_bytes() != b"pod bytes\n"
    )
    environ = Path(f"/proc/{pod.pid}/environ").read_bytes().split(b"\0")
    assert b"GREETING=hi" in environ
    out = pod.run_in_pod(["cat", "/app/link", "/etc/hosts"]).stdout
    assert out.startswith(b"pod shadow\n")
    assert b"only-in-pod.test" in out
    assert b"only-in-pod.test" not in Path("/etc/hosts").read_bytes()
    assert pod.run_in_pod(["hostname"]).stdout.strip() == pod.hostname.encode()
    with socket.create_connection((pod.ip, 7777), timeout=5) as conn:
        conn.sendall(b"echo me")
        assert conn.recv(100) == b"echo me"
    # The pod's loopback is its own: the service on 127.0.0.1 there is not the host's.
    out = pod.run_in_pod(["python3", "-c", _CONNECT_LOOPBACK]).stdout
    assert out == b"echo"


_CONNECT_LOOPBACK = """
import socket
s = socket.create_connection(("127.0.0.1", 7777), timeout=5)
s.sendall(b"echo"); print(s.recv(10).decode(), end="")
"""


def test_close_removes_everything(make_pod: Callable[..., LocalPod]) -> None:
    pod = make_pod()
    pid, netns = pod.pid, pod.netns
    pod.close()
    pod.close()
    assert (
        not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
    )
    names = subprocess.run(
        ["ip", "netns", "list"], check=True, capture_output=True, text=True
    ).stdout
    assert netns not in names.split()
    links = subprocess.run(["ip", "link"], check=True, capture_output=True, text=True).stdout
    assert pod.host_if not in links
    assert not pod.workdir.exists()


def test_cleanup_leftovers_spares_live_creators(make_pod: Callable[..., LocalPod]) -> None:
    pod = make_pod()
    removed = cleanup_leftovers()
    assert not any(str(os.getpid()) in name for name in removed)
    assert Path(f"/proc/{pod.pid}").exists()
