"""`mirrord daemon ...`, the daemon's own lifecycle, and the environment a command gets."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.cli._sessions import child_env
from mirrord.daemon._client import daemon_env
from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import Mirrord, agent_pids, pid_alive, processes_mentioning, wait_for

LAYER = "/x/site-packages/mirrord/layer/libmirrord_layer.so"


def test_child_env_appends_the_layer_to_the_users_preload() -> None:
    session = {"LD_PRELOAD": LAYER, "MIRRORD_SESSION": "s2", "POD": "1"}
    base = {"LD_PRELOAD": "/usr/lib/libjemalloc.so", "MIRRORD_SESSION": "s1", "HOME": "/h"}
    env = child_env(session, base)
    assert env["LD_PRELOAD"] == f"/usr/lib/libjemalloc.so {LAYER}"
    assert env["MIRRORD_SESSION"] == "s2" and env["POD"] == "1" and env["HOME"] == "/h"
    # nested: an outer session's layer is replaced, not doubled
    nested = child_env(session, {"LD_PRELOAD": "/old/libmirrord_layer.so", "MIRRORD_SESSION": "o"})
    assert nested["LD_PRELOAD"] == LAYER


def test_the_daemon_never_preloads_the_layer_into_itself() -> None:
    env = daemon_env(
        {
            "LD_PRELOAD": f"/usr/lib/libjemalloc.so {LAYER}",
            "MIRRORD_LAYER_SOCKET": "/s",
            "MIRRORD_SESSION": "x",
            "KUBECONFIG": "/k",
        }
    )
    assert env == {"LD_PRELOAD": "/usr/lib/libjemalloc.so", "KUBECONFIG": "/k"}
    assert "LD_PRELOAD" not in daemon_env({"LD_PRELOAD": LAYER})


def test_daemon_start_status_logs_and_sigterm(mirrord: Mirrord) -> None:
    first = mirrord.run("daemon", "start")
    assert first.returncode == 0 and "started" in first.stdout
    again = mirrord.run("daemon", "start")
    assert again.returncode == 0 and "already running" in again.stdout
    pid = mirrord.daemon_pid()
    assert pid is not None
    assert mirrord.status()["daemon"]["event_loop"] == "uvloop"  # a dependency: mirrord._loop
    runtime = mirrord.runtime
    assert (runtime.stat().st_mode & 0o777) == 0o700
    assert (runtime / "mirrordd.sock").stat().st_mode & 0o777 == 0o600
    assert (runtime / "layer.sock").stat().st_mode & 0o777 == 0o600
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 10, "the daemon to exit on SIGTERM")
    assert not (runtime / "mirrordd.sock").exists()
    logs = mirrord.run("daemon", "logs")
    assert "ready" in logs.stdout and "shutting down" in logs.stdout
    assert mirrord.run("daemon", "status").returncode == 3


@pytest.mark.netns
def test_a_killed_mirrord_run_closes_its_session(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(PodSpec())
    marker = tmp_path / "child.pid"
    app = [
        sys.executable,
        "-c",
        f"import os,time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *app)
    wait_for(lambda: marker.exists() and marker.read_text(), 30, "the command to start")
    assert len(mirrord.sessions()) == 1
    proc.kill()  # SIGKILL: no chance to close the session itself
    proc.wait(timeout=10)
    wait_for(lambda: mirrord.sessions() == [], 10, "the session to close")
    os.kill(int(marker.read_text()), signal.SIGKILL)  # the orphaned command holds the pipes
    proc.communicate(timeout=10)
    assert len(agent_pids(mirrord.runtime)) == 1  # the agent lingers for the next run


def test_ensure_daemon_runs_the_callers_check_while_the_daemon_starts(mirrord: Mirrord) -> None:
    from mirrord.daemon import RuntimePaths, ensure_daemon, live_daemon_pid

    paths = RuntimePaths(mirrord.runtime)
    steps: list[str] = []

    def refuse() -> None:
        # the daemon's process exists while the check runs: the two overlap
        steps.append(f"check, daemon process {processes_mentioning(str(mirrord.runtime)) != []}")
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        ensure_daemon(paths, steps.append, meanwhile=refuse)
    # a refused check leaves no daemon, no socket, and no announcement of its start
    assert steps == ["check, daemon process True"]
    assert live_daemon_pid(paths) is None
    assert not paths.control_socket.exists()
    assert processes_mentioning(str(mirrord.runtime)) == []

    steps.clear()
    assert ensure_daemon(paths, steps.append, meanwhile=lambda: steps.append("check")) is True
    assert steps == ["check", "starting the mirrord daemon"]
    assert mirrord.status()["daemon"]["pid"] == live_daemon_pid(paths)
    # a daemon that answers: the check still runs, once, and nothing starts
    steps.clear()
    assert ensure_daemon(paths, steps.append, meanwhile=lambda: steps.append("check")) is False
    assert steps == ["check"]
