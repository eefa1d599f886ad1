"""Target resolution: which process the agent impersonates, and noticing when it exits.

Owns: parsing `pid/N` and `container/ID`, finding a container's process by scanning
`/proc/*/cgroup` for the container id (works for containerd, CRI-O, Docker and podman without
their APIs; the node agent in Kubernetes uses the same code), and waiting for the target's exit.
Does not own: entering namespaces (`_netns.py`) or reading files (`_files.py`).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import anyio

from mirrord.agent._exceptions import BadArguments, TargetNotFound

__all__ = ["Target", "find_container_pid", "resolve_target", "wait_target_exit"]

_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{7,127}$")
_EXIT_POLL_INTERVAL = 0.5  # seconds, only when pidfd_open is unavailable


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved target: `pid` as seen by the agent, and the spec it came from."""

    spec: str
    pid: int

    @property
    def description(self) -> str:
        if self.spec.startswith("pid/"):
            return self.spec
        return f"{self.spec} (pid {self.pid})"


def _alive(pid: int, proc: Path) -> bool:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return False
    # A zombie has exited: nothing of it is left to impersonate.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _ppid(pid: int, proc: Path) -> int:
    try:
        return int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def find_container_pid(container_id: str, *, proc: Path = Path("/proc")) -> int:
    """The PID of the main process of the container whose cgroup path contains `container_id`.

    Among the processes found, the one whose parent is not itself in the container is the
    container's first process; ties go to the lowest PID. Raises `TargetNotFound`.
    """
    if not _CONTAINER_ID_RE.match(container_id):
        raise BadArguments(
            f"container id {container_id!r} is not valid: give at least 8 characters of the "
            "id that containerd, CRI-O, Docker or podman shows"
        )
    matches: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cgroup").read_text()
        except OSError:
            continue  # exited while we scanned
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            if container_id in path:
                matches.add(int(entry.name))
                break
    live = sorted(pid for pid in matches if _alive(pid, proc))
    if not live:
        raise TargetNotFound(
            f"no process on this node runs in a cgroup of container {container_id}: check the "
            "id (e.g. `crictl ps`, `docker ps --no-trunc`) and that the agent sees the host's "
            "/proc (hostPID)"
        )
    roots = [pid for pid in live if _ppid(pid, proc) not in matches]
    return (roots or live)[0]


def resolve_target(spec: str, *, proc: Path = Path("/proc")) -> Target:
    """`pid/N` or `container/ID` to a live `Target`; `BadArguments` or `TargetNotFound`."""
    kind, _, ident = spec.partition("/")
    if kind == "pid":
        if not ident.isdigit() or int(ident) <= 0:
            raise BadArguments(f"target {spec!r} is not valid: use pid/N with N a process id")
        pid = int(ident)
        if not _alive(pid, proc):
            raise TargetNotFound(
                f"target process {pid} does not exist (or has exited): check the pid, and that "
                "the agent runs in the host's pid namespace"
            )
        return Target(spec=spec, pid=pid)
    if kind == "container":
        return Target(spec=spec, pid=find_container_pid(ident, proc=proc))
    raise BadArguments(f"target {spec!r} is not valid: use pid/N or container/ID")


async def wait_target_exit(pid: int) -> None:
    """Return when process `pid` has exited (a pidfd where the kernel has one)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        fd = -1
    if fd < 0:
        while _alive(pid, Path("/proc")):
            await anyio.sleep(_EXIT_POLL_INTERVAL)
        return
    try:
        # A pidfd becomes readable when the process exits, also for non-children.
        while _alive(pid, Path("/proc")):
            with anyio.move_on_after(5):
                await anyio.wait_readable(fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
