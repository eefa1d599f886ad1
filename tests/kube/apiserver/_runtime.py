"""The processes behind the in-process API server's pods: container and pod runtimes, their
logs, dialing a port inside a pod's network namespace, and the cgroups that make a target
container's ID findable by a `/proc/*/cgroup` scan (removed with the server, and leftovers of
dead runs at start). The controllers that drive them are in `_kubelet.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
CGROUP_PREFIX = "mrdkube"
_CLONE_NEWNET = 0x40000000


# ------------------------------------------------------------------------------- logs


class LogBuffer:
    """One container's log: appended by the kubelet, read (and followed) by the log endpoint."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        self.data += chunk
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def wait_change(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)


# ------------------------------------------------------------------------------- runtime


@dataclass
class ContainerRuntime:
    name: str
    container_id: str
    process: asyncio.subprocess.Process | None = None
    bound_pid: int | None = None  # a process the test owns (a namespace pod's)
    log: LogBuffer = field(default_factory=LogBuffer)
    ephemeral: bool = False

    @property
    def pid(self) -> int | None:
        if self.process is not None and self.process.returncode is None:
            return self.process.pid
        return self.bound_pid


@dataclass
class PodRuntime:
    namespace: str
    name: str
    uid: str
    containers: dict[str, ContainerRuntime] = field(default_factory=dict)
    netns_pid: int | None = None  # a process whose network namespace is the pod's
    cgroup_dirs: list[Path] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def new_container_id() -> str:
    return secrets.token_hex(32)


def _libc() -> Any:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def connect_in_netns(pid: int, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:port made inside the network namespace of `pid`, like the
    kubelet's port-forward (which enters the pod sandbox's namespace). Runs in a worker thread:
    setns moves only this thread, and it is moved back before returning."""
    libc = _libc()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.settimeout(None)
            sock.setblocking(False)
            return sock
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover - would poison the pool
                os._exit(70)
    finally:
        os.close(own)
        os.close(target)


def rmtree_cgroup(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        rmtree_cgroup(child)
    # Processes still inside go back to the root cgroup before the directory can go.
    procs = path / "cgroup.procs"
    with contextlib.suppress(OSError):
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / "cgroup.procs").write_text(pid)
    path.rmdir()


def cleanup_leftover_cgroups() -> None:
    """Remove cgroup directories of earlier test processes that are gone."""
    if not CGROUP_ROOT.is_dir():
        return
    for d in CGROUP_ROOT.glob(f"{CGROUP_PREFIX}*"):
        pid = d.name[len(CGROUP_PREFIX) :]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                rmtree_cgroup(d)
