"""Fixtures of the layer tests: the daemon of the layer tests on a unix socket in a temporary
directory (files, DNS and hostname answered by a real agent next to a local pod), and a runner
that starts real programs with the layer preloaded (env from layer_env)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings, layer_env
from mirrord.localpod import LocalPod
from tests.layer._daemon import LayerDaemon

PYTHON = os.path.realpath(sys.executable)
TEST_FILE = b"hello from the target\n"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The daemon's agent serves a local pod: its tests need root and network namespaces.
    for item in items:
        if "daemon" in getattr(item, "fixturenames", ()) and "tests/layer/" in str(item.path):
            item.add_marker(pytest.mark.netns)


@pytest.fixture
def daemon(tmp_path: Path, make_pod: Callable[..., LocalPod]) -> Iterator[LayerDaemon]:
    with LayerDaemon(tmp_path / "layer.sock", make_pod) as d:
        d.add_file("/app/test.txt", TEST_FILE)
        d.add_file("/app/config/settings.yaml", b"debug: true\n")
        d.add_file("/etc/hosts", b"192.0.2.9 db.target\n")
        d.add_dir("/app/empty")
        d.add_symlink("/app/link", "/app/test.txt")
        d.dns["db.svc.cluster.local"] = "192.0.2.77"
        yield d
        assert d.errors == [], d.errors[0]
        assert "Traceback" not in d.agent_log(), d.agent_log()


class Runner:
    """Runs a command under the layer, in a working directory of its own (local by the
    default policy), with a bounded time."""

    def __init__(self, daemon: LayerDaemon, cwd: Path) -> None:
        self.daemon = daemon
        self.cwd = cwd

    def env(
        self, settings: LayerSettings | None = None, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MIRRORD_", "LD_PRELOAD"))}
        base.update(
            layer_env(
                socket_path=str(self.daemon.path),
                session_id="test-session",
                settings=settings or LayerSettings(timeout_ms=5000),
            )
        )
        base["PWD"] = str(self.cwd)  # shells check $PWD and $OLDPWD at start
        base.pop("OLDPWD", None)
        base.update(extra or {})
        return base

    def __call__(
        self,
        argv: Sequence[str],
        *,
        settings: LayerSettings | None = None,
        timeout: float = 30,
        check: bool = True,
        input: bytes | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        self.daemon.start()
        proc = subprocess.run(
            list(argv),
            env=self.env(settings, extra_env),
            cwd=self.cwd,
            capture_output=True,
            timeout=timeout,
            check=False,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{argv!r} exited {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
            )
        return proc

    def py(self, code: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        # -S: no site-packages, whose paths (this checkout) the default policy would send remote
        return self([PYTHON, "-S", "-c", code], **kw)  # type: ignore[arg-type]


@pytest.fixture
def run(daemon: LayerDaemon, tmp_path: Path) -> Runner:
    work = tmp_path / "work"
    work.mkdir()
    return Runner(daemon, work)


def build_c(factory: pytest.TempPathFactory, name: str, *flags: str) -> Path:
    """tests/layer/c/NAME.c built with gcc (-Wall -Werror, FLAGS or -O1) into a temporary
    directory: the program's path."""
    out = factory.mktemp("cbuild") / name
    src = Path(__file__).resolve().parent / "c" / f"{name}.c"
    subprocess.run(
        ["gcc", *(flags or ("-O1",)), "-Wall", "-Werror", "-o", str(out), str(src)],
        check=True,
        timeout=60,
    )
    return out
