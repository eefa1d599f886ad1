"""Fixtures for the CLI's end-to-end tests: a private runtime directory per test (so the
test's daemon and agents never meet anyone else's), a way to run `mirrord ...` in it, and a
teardown that stops the daemon and every agent it started, also on failure."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

MIRRORD = str(Path(sys.executable).parent / "mirrord")


def processes_mentioning(text: str | bytes, parent: int | None = None) -> list[int]:
    """Pids of live processes whose command line contains `text` (our runtime dir), children
    of `parent` only if given."""
    needle = text.encode() if isinstance(text, str) else text
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if needle in cmdline and fields[0] != "Z" and parent in (None, int(fields[1])):
            pids.append(int(entry))
    return pids


def has_mapped(pid: int, package: str) -> bool:
    """Whether the process has a shared object of `package` (a C extension) mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return any(f"/{package}/" in line for line in f)


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes started with `name=value` in their environment (the commands a
    test ran through mirrord inherit MIRRORD_RUNTIME_DIR, whatever they do later)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def pid_alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def agent_pids(runtime: Path, target: str | None = None) -> list[int]:
    """Pids of agents serving this runtime dir (their --listen socket is in it)."""
    result = []
    for pid in processes_mentioning(str(runtime)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mirrord.agent" not in argv or b"setpriv" in argv[0]:
            continue
        if target is None or target.encode() in argv:
            result.append(pid)
    return result


class Mirrord:
    """`mirrord` commands run with this test's runtime directory."""

    def __init__(self, runtime: Path) -> None:
        self.runtime = runtime
        self.env = dict(os.environ, MIRRORD_RUNTIME_DIR=str(runtime))
        self.env.pop("MIRRORD_LAYER_DEBUG", None)
        self.env.pop("MIRRORD_LOG", None)
        self.children: list[subprocess.Popen[str]] = []

    def run(
        self, *args: str, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MIRRORD, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen([MIRRORD, *args], env=self.env, text=True, **kwargs)
        self.children.append(proc)
        return proc

    def status(self) -> dict[str, Any]:
        result = self.run("daemon", "status", "--json", timeout=20)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def sessions(self) -> list[dict[str, Any]]:
        """The daemon's sessions; none while no daemon runs yet."""
        result = self.run("daemon", "status", "--json", timeout=20)
        if result.returncode == 3:
            return []
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout)["sessions"])

    def daemon_pid(self) -> int | None:
        try:
            return int((self.runtime / "mirrordd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # an orphaned grandchild still holds the pipes: close our ends anyway
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        # commands a failed test left running (their daemon and agents are stopped below)
        for pid in processes_with_env("MIRRORD_RUNTIME_DIR", str(self.runtime)):
            if pid not in processes_mentioning(str(self.runtime)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        subprocess.run(
            [MIRRORD, "daemon", "stop"], env=self.env, capture_output=True, timeout=30, check=False
        )
        # whatever is left (a daemon that did not answer, agents of a killed daemon)
        deadline = time.monotonic() + 10
        while (pids := processes_mentioning(str(self.runtime))) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(
                        pid, signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL
                    )
                except ProcessLookupError:
                    pass
            time.sleep(0.1)


@contextlib.contextmanager
def temp_mirrord(prefix: str) -> Iterator[Mirrord]:
    """`mirrord` commands with a runtime directory of their own, removed afterwards with
    everything the commands started."""
    runtime = Path(tempfile.mkdtemp(prefix=prefix))  # short: unix socket paths <= 107 bytes
    cli = Mirrord(runtime)
    try:
        yield cli
    finally:
        cli.cleanup()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def mirrord() -> Iterator[Mirrord]:
    with temp_mirrord("mrdc") as cli:
        yield cli


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def python_app(tmp_path: Path, source: str, name: str = "app.py") -> Sequence[str]:
    path = tmp_path / name
    path.write_text(source)
    return [sys.executable, str(path)]
