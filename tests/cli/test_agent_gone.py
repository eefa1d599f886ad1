"""A dead agent is dropped from `mirrord daemon status`, and what the daemon kept for it (its
socket and secret file in the runtime directory) is removed, whether a session still used it
or it was lingering. Real daemon, real agent, a namespace pod."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import Mirrord, agent_pids, wait_for

pytestmark = pytest.mark.netns


def _agents(mirrord: Mirrord) -> list[dict[str, object]]:
    return list(mirrord.status()["agents"])


@pytest.mark.parametrize("in_use", [True, False], ids=["with-a-session", "lingering"])
def test_a_killed_agent_leaves_status_and_its_secret_is_removed(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], in_use: bool
) -> None:
    pod = make_pod(PodSpec(env={"POD_VAR": "v"}))
    target = f"pid/{pod.pid}"
    mirrord.env["MIRRORD_DAEMON_AGENT_LINGER"] = "120"  # a lingering agent stays until killed
    if in_use:
        proc = mirrord.popen("run", "-t", target, "--", "sh", "-c", "echo ready; exec sleep 60")
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    else:
        done = mirrord.run("run", "-t", target, "--", "true")
        assert done.returncode == 0, done.stderr
    [agent] = wait_for(lambda: agent_pids(mirrord.runtime, target), 20, "the agent")
    [entry] = _agents(mirrord)
    assert entry["alive"] is True
    secrets = list(mirrord.runtime.glob("agent-*.secret"))
    assert len(secrets) == 1
    os.kill(agent, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: not _agents(mirrord), 15, "the dead agent to leave `daemon status`")
    assert time.monotonic() - started < 15
    assert not secrets[0].exists()
    assert not list(mirrord.runtime.glob("agent-*.sock"))
