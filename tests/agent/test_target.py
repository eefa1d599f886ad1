"""Target resolution over a /proc-shaped directory (the node agent scans the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrord.agent import find_container_pid, resolve_target
from mirrord.agent._exceptions import BadArguments, TargetNotFound

CID = "3f4e5d6c7b8a99887766554433221100aabbccddeeff00112233445566778899"


def _proc(root: Path, pid: int, ppid: int, cgroup: str, state: str = "S") -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_text(f"{pid} (some (odd) name) {state} {ppid} 1 1 0 -1\n")
    (d / "cgroup").write_text(cgroup)


def test_container_pid_is_the_first_process_of_the_container(tmp_path: Path) -> None:
    containerd = f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{CID}.scope\n"
    _proc(tmp_path, 1, 0, "0::/init.scope\n")
    _proc(tmp_path, 900, 1, "0::/system.slice/containerd.service\n")
    _proc(tmp_path, 1001, 900, containerd)  # the container's first process
    _proc(tmp_path, 1002, 1001, containerd)  # a child inside the container
    _proc(tmp_path, 950, 900, f"12:pids:/docker/{CID[::-1]}\n")  # another container
    (tmp_path / "self").mkdir()
    assert find_container_pid(CID, proc=tmp_path) == 1001
    assert find_container_pid(CID[:12], proc=tmp_path) == 1001
    assert resolve_target(f"container/{CID}", proc=tmp_path).pid == 1001


def test_exited_processes_and_bad_ids(tmp_path: Path) -> None:
    _proc(tmp_path, 1, 0, "0::/\n")
    _proc(tmp_path, 77, 1, f"0::/docker/{CID}\n", state="Z")
    with pytest.raises(TargetNotFound, match="no process on this node"):
        find_container_pid(CID, proc=tmp_path)
    with pytest.raises(BadArguments):
        find_container_pid("abc", proc=tmp_path)
    with pytest.raises(BadArguments):
        find_container_pid("../../etc", proc=tmp_path)
    with pytest.raises(TargetNotFound):
        resolve_target("pid/77", proc=tmp_path)
    assert resolve_target("pid/1", proc=tmp_path).pid == 1
    with pytest.raises(BadArguments):
        resolve_target("pid/x", proc=tmp_path)
