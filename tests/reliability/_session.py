"""One session of the fault app (`_fault_app.py`) as the reliability tests drive it: `mirrord
run --steal` of the app against a pod, its output lines with their arrival times, the pod's
client of a stolen connection, the pids of every party, and the checks that nothing is left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mirrord.localpod import LocalPod
from tests.cli.conftest import Mirrord, agent_pids, pid_alive, processes_with_env
from tests.reliability.conftest import (
    Size,
    guard_agent,
    guard_pids,
    leftover_files,
    leftover_processes,
    our_rules,
)

ERROR_WITHIN = 2.0  # seconds: issue 20, "time to error <= 2 s"
CLEAN_WITHIN = 2.0  # seconds: issue 20 item 5, "nothing of ours within 2 s"
APP = str(Path(__file__).with_name("_fault_app.py"))
VICTIMS = ["agent", "guard", "daemon", "app", "run"]

# -- reading a process's output with the time of each line --------------------------------------


class Lines:
    """Lines of a pipe, each with the monotonic time it arrived, read by a thread."""

    def __init__(self, pipe: IO[str]) -> None:
        self.items: list[tuple[float, str]] = []
        self.closed_at: float | None = None
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.items.append((time.monotonic(), line.rstrip("\n")))
        self.closed_at = time.monotonic()

    def first(self, match: Callable[[str], bool], after: float = 0.0) -> float | None:
        for at, line in list(self.items):
            if at >= after and match(line):
                return at
        return None

    def wait(self, match: Callable[[str], bool], after: float, timeout: float, what: str) -> float:
        """The time of the first matching line after `after`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.first(match, after)
            if at is not None:
                return at
            time.sleep(0.01)
        raise AssertionError(f"no {what} within {timeout:g} s; lines: {self.text()}")

    def text(self) -> str:
        return "\n".join(line for _, line in self.items)


class StolenClient:
    """The pod's side of a stolen connection: connects to the pod's port 8080 from the host
    (PREROUTING redirect) and echoes 512 bytes at a time, recording each outcome with its time:
    `ok`, `stall` (no answer for 0.5 s), `eof`, `error <ERRNO>`. Ends at its first eof/error."""

    def __init__(self, pod: LocalPod) -> None:
        self.pod = pod
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with socket.create_connection((self.pod.ip, 8080), timeout=10) as sock:
                sock.settimeout(0.5)
                while not self.stop.is_set():
                    payload = os.urandom(512)
                    sock.sendall(payload)
                    got = b""
                    while len(got) < len(payload) and not self.stop.is_set():
                        try:
                            chunk = sock.recv(len(payload) - len(got))
                        except TimeoutError:
                            self.events.append((time.monotonic(), "stall"))
                            continue
                        if not chunk:
                            self.events.append((time.monotonic(), "eof"))
                            return
                        got += chunk
                    if got == payload:
                        self.events.append((time.monotonic(), "ok"))
                    time.sleep(0.01)
        except OSError as exc:
            self.events.append((time.monotonic(), f"error {exc.__class__.__name__}"))
        finally:
            self.done.set()

    def ended_at(self) -> float | None:
        for at, what in list(self.events):
            if what == "eof" or what.startswith("error"):
                return at
        return None

    def oks_after(self, at: float) -> int:
        return sum(1 for t, what in list(self.events) if t > at and what == "ok")

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5)


# -- one session of the fault app ----------------------------------------------------------------


@dataclass
class Scene:
    cli: Mirrord
    pod: LocalPod
    size: Size
    phase: str
    run: subprocess.Popen[str]
    out: Lines
    err: Lines
    client: StolenClient | None = None
    figures: dict[str, str] = field(default_factory=dict)

    def app_pid(self) -> int | None:
        for pid in processes_with_env("MIRRORD_RUNTIME_DIR", str(self.cli.runtime)):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if len(argv) > 1 and argv[1] == APP.encode():  # not `mirrord run ... APP`
                return pid
        return None

    def session_id(self) -> str:
        """The session's id, as the app got it (MIRRORD_SESSION)."""
        pid = self.app_pid()
        assert pid is not None, "the app is not running"
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        (value,) = [v for v in environ if v.startswith(b"MIRRORD_SESSION=")]
        return value.split(b"=", 1)[1].decode()

    def agent_pid(self) -> int | None:
        pids = agent_pids(self.cli.runtime)
        return pids[0] if pids else None

    def guard_pid(self) -> int | None:
        agents = set(agent_pids(self.cli.runtime))
        guards = [g for g in guard_pids(self.pod) if guard_agent(g) in agents]
        return guards[0] if guards else None

    def daemon_pid(self) -> int | None:
        pid = self.cli.daemon_pid()
        return pid if pid is not None and pid_alive(pid) else None

    def pid_of(self, victim: str) -> int | None:
        if victim == "run":
            return self.run.pid if self.run.poll() is None else None
        return {
            "agent": self.agent_pid,
            "guard": self.guard_pid,
            "daemon": self.daemon_pid,
            "app": self.app_pid,
        }[victim]()


def start_scene(cli: Mirrord, pod: LocalPod, size: Size, phase: str) -> Scene:
    cli.env["RELIABILITY_LAYER_TIMEOUT_MS"] = str(size.layer_timeout_ms)
    cli.env["MIRRORD_AGENT_STARTUP_TIMEOUT"] = "5"
    # the relayed path: a handed-over file or socket outlives the agent and the daemon (they
    # are not in its data path), and these cases are about what a lost relay does
    cli.env["MIRRORD_FILE_HANDOVER"] = "false"
    cli.env["MIRRORD_OUTGOING_HANDOVER"] = "false"
    run = cli.popen("run", "--steal", "-t", f"pid/{pod.pid}", "--", sys.executable, APP, phase)
    assert run.stdout is not None and run.stderr is not None
    return Scene(cli, pod, size, phase, run, Lines(run.stdout), Lines(run.stderr))


def wait_ready(scene: Scene) -> None:
    """Until the phase's work runs (for `stolen`: a client echoes through the app)."""
    scene.out.wait(lambda line: line == "listening", 0, 30, "listening line")
    wait_rules(scene.pod, present=True)
    if scene.phase == "stolen":
        scene.client = StolenClient(scene.pod)
        deadline = time.monotonic() + 20
        while scene.client.oks_after(0) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scene.client.oks_after(0) >= 3, scene.client.events
    else:
        scene.out.wait(lambda line: line == "ready", 0, 30, "ready line")


def wait_rules(pod: LocalPod, *, present: bool, timeout: float = 20) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bool(our_rules(pod)) == present:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"rules {'not installed' if present else 'left'}: {our_rules(pod)}")


def wait_pid(scene: Scene, victim: str, timeout: float = 30) -> int:
    """The victim's pid as soon as it exists (for `run` at startup: once the agent exists, so
    the session is being opened)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if victim == "run":
            if scene.agent_pid() is not None:
                return scene.run.pid
        elif (pid := scene.pid_of(victim)) is not None:
            return pid
        time.sleep(0.005)
    raise AssertionError(f"no {victim} within {timeout:g} s; stderr: {scene.err.text()}")


def app_error(line: str) -> bool:
    return line.startswith("error") or line == "eof"


def working(line: str) -> bool:
    return line in ("ready", "ok") or line.startswith("count")


def end_scene(scene: Scene) -> None:
    """Ends the session the way a user does (SIGTERM to `mirrord run`, forwarded to the app)."""
    if scene.client is not None:
        scene.client.close()
    if scene.run.poll() is None:
        scene.run.send_signal(signal.SIGTERM)
    try:
        scene.run.wait(timeout=20)
    except subprocess.TimeoutExpired:
        scene.run.kill()
        raise AssertionError(f"mirrord run did not end on SIGTERM: {scene.err.text()}") from None


def assert_nothing_left(scene: Scene, *, daemon_killed: bool = False) -> None:
    """Within CLEAN_WITHIN s of the session's end: no rule of ours in the pod, no process that
    should not run; no file that should not stay in the runtime directory (after a killed
    daemon, once the next daemon started: it clears what the dead one left, docs/commands.md)."""
    ended = time.monotonic()
    cleaned = wait_rules(scene.pod, present=False, timeout=CLEAN_WITHIN)
    scene.figures["rules_gone_s"] = f"{cleaned - ended:.2f}"
    deadline = time.monotonic() + CLEAN_WITHIN
    while (left := leftover_processes(scene.cli, scene.pod)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], left
    assert (
        not scene.cli.sessions()
        or daemon_killed
        or all(s["state"] != "running" for s in scene.cli.sessions())
    ), scene.cli.sessions()
    if daemon_killed:
        assert scene.cli.run("daemon", "start").returncode == 0
    assert leftover_files(scene.cli.runtime) == []


def assert_healthy(scene: Scene, since: float) -> None:
    """The healthy session kept reading its remote file, without an error, since `since`."""
    scene.out.wait(lambda line: line.startswith("count"), since, 20, "the healthy session's work")
    errors = [line for at, line in scene.out.items if line.startswith("error")]
    assert errors == [], scene.out.text()[-2000:]
    assert scene.run.poll() is None, scene.err.text()


def healthy_scene(scene_factory: Callable[[str], Scene]) -> tuple[Scene, int, int]:
    """A session of the fault app reading its remote file in a loop; its daemon and agent."""
    scene = scene_factory("read")
    wait_ready(scene)
    daemon, agent = scene.daemon_pid(), scene.agent_pid()
    assert daemon is not None and agent is not None
    return scene, daemon, agent
