"""The fault matrix: SIGKILL and SIGSTOP of the agent, its steal guard, the daemon, the user app
and `mirrord run`, at startup, during a remote file read loop, during an outgoing stream and
with an open stolen connection.

SIGKILL: every other party sees an error within `ERROR_WITHIN` seconds (the app an errno or the
end of its connection, `mirrord run` a warning or its exit, the pod's client the end of its
stolen connection), and once the session ends nothing is left — no process, no rule in the pod,
no file in the runtime directory but what should stay (docs/reliability.md).

SIGSTOP (a debugger, a laptop lid, a stuck node): what the product promises in its docs. A
remote call blocked on a stopped agent or daemon fails with `EIO` after the layer's
`timeout_ms` (docs/layer.md, "Errors"); relayed streams simply wait; nothing else fails; after
SIGCONT everything works again; then the session ends cleanly as above.

The user app is `_fault_app.py`; the pod's side of a stolen connection is a client thread of
the test that echoes through it. Each case is one test, with its own pod and runtime directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.reliability._session import (
    ERROR_WITHIN,
    VICTIMS,
    Scene,
    app_error,
    assert_nothing_left,
    end_scene,
    wait_pid,
    wait_ready,
    working,
)
from tests.reliability.conftest import (
    Size,
    guard_agent,
    guard_pids,
    leftover_files,
    our_rules,
    record_figures,
)

pytestmark = pytest.mark.netns

PHASES = ["startup", "read", "outgoing", "stolen"]


def in_quick_size(signal_name: str, victim: str, phase: str) -> bool:
    """The quick size runs one phase per victim and signal, rotating so that each victim meets
    two phases and each phase two or three victims; the full size runs every case."""
    i = VICTIMS.index(victim) + (2 if signal_name == "stop" else 0)
    return PHASES[i % len(PHASES)] == phase


def record(request: pytest.FixtureRequest, scene: Scene) -> None:
    """Keeps a case's figures (times in seconds from the signal) for docs/reliability.md:
    appended as a JSON line to `$MIRRORD_RELIABILITY_FIGURES` when set."""
    record_figures(request.node.name, scene.figures)


# -- SIGKILL ------------------------------------------------------------------------------------


def _check_killed_during_work(scene: Scene, victim: str, killed_at: float) -> None:
    """What the other parties see after `victim` was killed while the phase's work ran."""
    client = scene.client
    if victim in ("agent", "daemon"):
        at = scene.out.wait(app_error, killed_at, ERROR_WITHIN + 10, "error seen by the app")
        scene.figures["app_error_s"] = f"{at - killed_at:.3f}"
        warning = "the agent was lost" if victim == "agent" else "the mirrord daemon went away"
        at2 = scene.err.wait(lambda line: warning in line, killed_at, ERROR_WITHIN + 10, warning)
        scene.figures["run_warning_s"] = f"{at2 - killed_at:.3f}"
        assert max(at, at2) - killed_at <= ERROR_WITHIN, scene.figures
    elif victim == "app":
        scene.run.wait(timeout=ERROR_WITHIN + 10)
        at = scene.err.closed_at or time.monotonic()
        scene.figures["run_exit_s"] = f"{at - killed_at:.3f}"
        assert scene.run.returncode == 128 + signal.SIGKILL, scene.err.text()
        assert at - killed_at <= ERROR_WITHIN
    elif victim == "run":
        app = scene.out.closed_at
        deadline = time.monotonic() + ERROR_WITHIN + 10
        while scene.app_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        gone = time.monotonic()
        assert scene.app_pid() is None, "the app outlived its mirrord run"
        scene.figures["app_gone_s"] = f"{gone - killed_at:.3f}"
        assert gone - killed_at <= ERROR_WITHIN, app
    if client is not None:
        deadline = time.monotonic() + ERROR_WITHIN + 10
        while client.ended_at() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        ended = client.ended_at()
        assert ended is not None, f"the pod's stolen connection never ended: {client.events[-3:]}"
        scene.figures["pod_client_end_s"] = f"{ended - killed_at:.3f}"
        assert ended - killed_at <= ERROR_WITHIN


def _check_killed_guard(scene: Scene, killed_at: float) -> None:
    """Issue 20 item 5: the agent notices a dead guard within 2 s, and either restarts it (a
    new guard, the rules in place) or removes the rules itself and fails the subscription
    loudly (a warning in `mirrord run`)."""
    deadline = killed_at + ERROR_WITHIN
    agent = scene.agent_pid()
    while time.monotonic() < deadline + 1:
        restarted = [g for g in guard_pids(scene.pod) if guard_agent(g) == agent]
        rules = our_rules(scene.pod)
        warned = scene.err.first(lambda line: "8080" in line and "warning" in line, killed_at)
        if (restarted and rules) or (not rules and warned is not None):
            scene.figures["guard_handled_s"] = f"{time.monotonic() - killed_at:.3f}"
            assert time.monotonic() <= deadline, scene.figures
            return
        time.sleep(0.05)
    raise AssertionError(
        f"a killed steal guard went unnoticed: rules {our_rules(scene.pod)}, stderr "
        f"{scene.err.text()!r}"
    )


# Decided at collection (a string condition sees `config` and `os`), so that a case of the full
# size only costs no pod and no daemon at the quick size.
_FULL_SIZE_ONLY = pytest.mark.skipif(
    "not (config.getoption('--reliability-full') "
    "or os.environ.get('MIRRORD_RELIABILITY_FULL', '') not in ('', '0'))",
    reason="full size only (--reliability-full or MIRRORD_RELIABILITY_FULL=1)",
)


def _cases(
    signal_name: str, known: dict[tuple[str, str], pytest.MarkDecorator] | None = None
) -> list[object]:
    known = known or {}
    cases: list[object] = []
    for victim in VICTIMS:
        for phase in PHASES:
            marks = [known[(victim, phase)]] if (victim, phase) in known else []
            if not in_quick_size(signal_name, victim, phase):
                marks.append(_FULL_SIZE_ONLY)
            cases.append(pytest.param(victim, phase, marks=marks, id=f"{victim}-{phase}"))
    return cases


@pytest.mark.parametrize(("victim", "phase"), _cases("kill"))
def test_sigkill(
    request: pytest.FixtureRequest,
    scene_factory: Callable[[str], Scene],
    victim: str,
    phase: str,
) -> None:
    scene = scene_factory(phase)
    if phase == "startup":
        pid = wait_pid(scene, victim)
    else:
        wait_ready(scene)
        running = scene.pid_of(victim)
        assert running is not None, f"no {victim} running"
        pid = running
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    if victim == "guard":
        _check_killed_guard(scene, killed_at)
    elif phase == "startup" and victim != "run":
        # the session could not start (agent, daemon) or its command died (app):
        # `mirrord run` ends with an error at once
        scene.run.wait(timeout=ERROR_WITHIN + 30)
        ended = scene.err.closed_at or time.monotonic()
        scene.figures["run_exit_s"] = f"{ended - killed_at:.3f}"
        assert scene.run.returncode != 0
        if victim != "app":
            assert "mirrord: error" in scene.err.text() or "warning" in scene.err.text()
        assert ended - killed_at <= ERROR_WITHIN, scene.err.text()
    elif phase == "startup":
        # `mirrord run` killed while its session opened: the daemon closes the session
        deadline = time.monotonic() + ERROR_WITHIN + 10
        while (
            any(s["state"] == "running" for s in scene.cli.sessions())
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert not any(s["state"] == "running" for s in scene.cli.sessions())
        scene.figures["session_closed_s"] = f"{time.monotonic() - killed_at:.3f}"
        assert scene.app_pid() is None
    else:
        _check_killed_during_work(scene, victim, killed_at)
    end_scene(scene)
    assert_nothing_left(scene, daemon_killed=victim == "daemon")
    record(request, scene)


# -- SIGSTOP ------------------------------------------------------------------------------------


def _stall_promise(victim: str, phase: str) -> str:
    """What the docs promise while `victim` is stopped during `phase`:
    `eio` — the app's remote call fails with EIO after the layer's timeout_ms (a stopped
    agent or daemon never answers a file read); `stall` — the work waits and resumes after
    SIGCONT, with no error (relayed streams have no timeout; the pod's client of a stopped
    app waits as it would for a debugged pod process); `works` — the work goes on (the guard is
    not in the data path; `mirrord run` is not in it either)."""
    if victim in ("agent", "daemon"):
        return "eio" if phase in ("read", "startup") else "stall"
    if victim == "app":
        return "stall"
    return "works"


@pytest.mark.parametrize(("victim", "phase"), _cases("stop"))
def test_sigstop(
    request: pytest.FixtureRequest,
    scene_factory: Callable[[str], Scene],
    size: Size,
    victim: str,
    phase: str,
) -> None:
    scene = scene_factory(phase)
    timeout_s = size.layer_timeout_ms / 1000
    if phase == "startup":
        pid = wait_pid(scene, victim)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(timeout_s + ERROR_WITHIN)
        with contextlib.suppress(ProcessLookupError):  # the daemon may have ended it
            os.kill(pid, signal.SIGCONT)
        # whatever failed while it was stopped, a session that started works (or `mirrord
        # run` said why it could not start)
        continued = time.monotonic()
        deadline = continued + 30
        while time.monotonic() < deadline and scene.run.poll() is None:
            if scene.out.first(working, continued) is not None:
                break
            time.sleep(0.02)
        if scene.run.poll() is not None:
            assert scene.run.returncode == 1 and "mirrord: error" in scene.err.text()
            scene.figures["outcome"] = "session refused: " + scene.err.text()[-200:]
        else:
            assert scene.out.first(working, continued), (
                scene.out.text(),
                scene.err.text(),
            )
            scene.figures["outcome"] = "works after SIGCONT"
        scene.figures["stopped_s"] = f"{continued - stopped_at:.2f}"
        end_scene(scene)
        assert_nothing_left(scene)
        record(request, scene)
        return
    wait_ready(scene)
    running = scene.pid_of(victim)
    assert running is not None, f"no {victim} running"
    pid = running
    promise = _stall_promise(victim, phase)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        if promise == "eio":
            at = scene.out.wait(
                lambda line: line == "error EIO", stopped_at, timeout_s + ERROR_WITHIN, "EIO"
            )
            scene.figures["eio_after_s"] = f"{at - stopped_at:.3f}"
            assert at - stopped_at >= timeout_s * 0.9, "EIO before the layer's timeout"
        else:
            time.sleep(max(timeout_s, 1.0) + 0.5)
            assert scene.out.first(app_error, stopped_at) is None, scene.out.text()
            if scene.client is not None:
                assert scene.client.ended_at() is None, scene.client.events[-3:]
            if promise == "works":
                if scene.client is not None:
                    assert scene.client.oks_after(stopped_at + 0.5) > 0
                else:
                    assert scene.out.first(lambda line: line.startswith("count"), stopped_at + 0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    continued = time.monotonic()
    # working again
    if scene.client is not None:
        deadline = continued + 10
        while scene.client.oks_after(continued) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scene.client.oks_after(continued) >= 3, scene.client.events[-5:]
        scene.figures["resumed_s"] = f"{time.monotonic() - continued:.3f}"
    else:
        at = scene.out.wait(
            lambda line: line == "ok" or line.startswith("count"), continued, 10, "work resumed"
        )
        scene.figures["resumed_s"] = f"{at - continued:.3f}"
    end_scene(scene)
    assert_nothing_left(scene)
    record(request, scene)


def test_a_killed_agent_is_dropped_with_its_files(scene_factory: Callable[[str], Scene]) -> None:
    scene = scene_factory("read")
    wait_ready(scene)
    agent = scene.agent_pid()
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    scene.err.wait(lambda line: "the agent was lost" in line, 0, ERROR_WITHIN, "agent lost")
    deadline = time.monotonic() + ERROR_WITHIN
    while time.monotonic() < deadline and (
        leftover_files(scene.cli.runtime) or scene.cli.status()["agents"]
    ):
        time.sleep(0.05)
    assert leftover_files(scene.cli.runtime) == []
    assert [a["pid"] for a in scene.cli.status()["agents"]] == []
    end_scene(scene)
