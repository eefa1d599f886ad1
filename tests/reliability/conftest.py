"""Fixtures of the reliability suite (docs/reliability.md): its size, and what a test needs to
say "nothing is left" — the processes, the pod's rules and the runtime directory's files of a
session — and how much memory and how many fds a process holds.

The suite runs at a quick size by default (CI) and at the full size with `--reliability-full`
or `MIRRORD_RELIABILITY_FULL=1`.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mirrord.localpod import LocalPod
from tests.cli.conftest import Mirrord, agent_pids, pid_alive, processes_with_env, temp_mirrord
from tests.incoming.test_steal_rules import ours as our_rules

if TYPE_CHECKING:
    from tests.reliability._session import Scene

__all__ = [
    "Size",
    "fd_count",
    "guard_agent",
    "guard_pids",
    "leftover_files",
    "leftover_processes",
    "our_rules",
    "pod_is_clean",
    "record_figures",
    "rss_kib",
]


@dataclass(frozen=True)
class Size:
    """How much each reliability test does (the issue's figures are the full size)."""

    full: bool
    fuzz_frames: int  # frames sent to each socket by each fuzz test
    stolen_connections: int  # concurrent stolen connections of the load test
    transfer_bytes: int  # bytes each way through one stolen and one outgoing connection
    sequential_runs: int  # `mirrord run`s one after the other against one daemon
    # The layer's `timeout_ms` (how long a silent daemon may hold a remote call): the
    # product's default at the full size; shortened for the quick size, whose budget cannot
    # afford waiting 30 s per stalled case.
    layer_timeout_ms: int


QUICK = Size(
    full=False,
    fuzz_frames=1_500,
    stolen_connections=100,
    transfer_bytes=16 * 1024 * 1024,
    sequential_runs=50,
    layer_timeout_ms=1_000,
)
FULL = Size(
    full=True,
    fuzz_frames=10_000,
    stolen_connections=1_000,
    transfer_bytes=1024 * 1024 * 1024,
    sequential_runs=500,
    layer_timeout_ms=30_000,
)


@pytest.fixture(scope="session")
def size(request: pytest.FixtureRequest) -> Size:
    full = bool(request.config.getoption("--reliability-full")) or os.environ.get(
        "MIRRORD_RELIABILITY_FULL", ""
    ) not in ("", "0")
    return FULL if full else QUICK


@pytest.fixture
def mirrord() -> Iterator[Mirrord]:
    with temp_mirrord("mrdrel") as cli:
        yield cli


@pytest.fixture
def scene_factory(mirrord: Mirrord, pod: LocalPod, size: Size) -> Iterator[Callable[[str], Scene]]:
    """`scene_factory(phase)` starts the fault app under `mirrord run --steal` against `pod`
    (tests/reliability/_session.py); whatever a test stopped is continued afterwards."""
    from tests.reliability._session import VICTIMS, start_scene

    scenes: list[Scene] = []

    def make(phase: str) -> Scene:
        scene = start_scene(mirrord, pod, size, phase)
        scenes.append(scene)
        return scene

    try:
        yield make
    finally:
        for scene in scenes:
            # a stopped process would survive its test: continue everything first
            for victim in VICTIMS:
                pid = scene.pid_of(victim)
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            if scene.client is not None:
                scene.client.close()


# -- measuring a process -----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def guard_pids(pod: LocalPod) -> list[int]:
    """Live steal guards of agents that target `pod`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if b"mirrord.agent._steal_guard" not in argv or not pid_alive(int(entry)):
            continue
        if argv[argv.index(b"--target-pid") + 1] == str(pod.pid).encode():
            found.append(int(entry))
    return found


def guard_agent(guard: int) -> int:
    argv = _cmdline(guard)
    return int(argv[argv.index(b"--agent-pid") + 1]) if b"--agent-pid" in argv else 0


# -- nothing is left -----------------------------------------------------------------------------

# What a runtime directory holds while its daemon runs or after it (docs/commands.md): the
# daemon's sockets, pid lock, start lock and log, agents' logs. An agent's socket and secret
# belong there only while that agent runs.
_DAEMON_FILES = {"mirrordd.sock", "layer.sock", "mirrordd.pid", "mirrordd.start.lock"}
_AGENT_FILE = re.compile(r"agent-\d+-\d+\.(sock|secret)")


def leftover_files(runtime: Path) -> list[str]:
    """Files of the runtime directory that should not be there: an agent's socket or secret
    with no live agent listening on it, the daemon's sockets with no live daemon, anything
    unknown. Logs stay (they are for the user)."""
    try:
        names = sorted(os.listdir(runtime))
    except FileNotFoundError:
        return []
    live_sockets = set()
    for pid in agent_pids(runtime):
        for arg in _cmdline(pid):
            if arg.startswith(b"unix:"):
                live_sockets.add(Path(os.fsdecode(arg[5:])).name)
    daemon_alive = False
    try:
        daemon_alive = pid_alive(int((runtime / "mirrordd.pid").read_text().strip()))
    except (OSError, ValueError):
        pass
    wrong = []
    for name in names:
        if name.endswith(".log"):
            continue
        if name in _DAEMON_FILES:
            if not daemon_alive and name.endswith(".sock"):
                wrong.append(name)
            continue
        if _AGENT_FILE.fullmatch(name):
            if name.rsplit(".", 1)[0] + ".sock" not in live_sockets:
                wrong.append(name)
            continue
        wrong.append(name)
    return wrong


def leftover_processes(cli: Mirrord, pod: LocalPod) -> list[str]:
    """Processes of this runtime directory that should not run: commands started through it
    (the user app), agents of a dead daemon, steal guards in `pod` of dead agents."""
    wrong = []
    daemon = cli.daemon_pid()
    daemon_alive = daemon is not None and pid_alive(daemon)
    agents = agent_pids(cli.runtime)
    guards = guard_pids(pod)
    family = {*agents, *guards, *([daemon] if daemon is not None else [])}
    for pid in processes_with_env("MIRRORD_RUNTIME_DIR", str(cli.runtime)):
        if pid not in family:
            wrong.append(f"command {pid}: {b' '.join(_cmdline(pid))[:120]!r}")
    if not daemon_alive:
        wrong += [f"agent {pid} of a dead daemon" for pid in agents]
    for guard in guards:
        if not pid_alive(guard_agent(guard)):
            wrong.append(f"guard {guard} of the dead agent {guard_agent(guard)}")
    return wrong


def pod_is_clean(pod: LocalPod) -> bool:
    return our_rules(pod) == []


def record_figures(name: str, figures: Mapping[str, object]) -> None:
    """A test's measurements, for docs/reliability.md: printed (seen with `-s`) and appended
    as one JSON line to `$MIRRORD_RELIABILITY_FIGURES` when that is set."""
    line = json.dumps({"test": name, **figures})
    print(line)
    path = os.environ.get("MIRRORD_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
