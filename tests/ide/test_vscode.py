"""The VS Code extension (extensions/vscode) in a real VS Code.

code-server 4.100.3 (installed from npm into a cache by extensions/vscode/test/ide/
install-code-server.sh) with the extension installed from its .vsix, its workbench opened in
Debian's chromium by playwright-core (extensions/vscode/test/ide/driver.ts), and the suite
(extensions/vscode/test/ide/suite.ts) running in the extension host: real node (js-debug) and
python (debugpy's adapter) debug sessions against a local pod stop at a breakpoint and print the
pod's variable and pod-only file; the target pick lists what `mirrord ls` lists from the tests'
API server; errors of the CLI are shown; the sessions view lists the session. Screenshots go to
extensions/vscode/test-artifacts/.

Everything here is real: the CLI, daemon, agent, layer, pod (a network + mount namespace), the
API server speaks the real REST protocol, and VS Code and chromium are the real programs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import MIRRORD, temp_mirrord
from tests.kube._cluster import add_deployment, wait_running
from tests.kube.apiserver import FakeApiServer

pytestmark = [pytest.mark.netns, pytest.mark.slow]

EXT = Path(__file__).resolve().parents[2] / "extensions" / "vscode"
ARTIFACTS = EXT / "test-artifacts"

POD_SPEC = PodSpec(
    env={"POD_VAR": "from-the-pod"},
    files={"/app/test.txt": b"pod-only file\n"},
)

# The breakpoint is on line 4 of both programs (suite.ts), where `v` holds POD_VAR.
NODE_APP = """const fs = require('fs');
const v = process.env.POD_VAR;
const f = fs.readFileSync('/app/test.txt', 'utf8').trim();
console.log('env', v);
console.log('file', f);
"""

PYTHON_APP = """import os
v = os.environ.get("POD_VAR")
f = open("/app/test.txt").read().strip()
print("env", v, flush=True)
print("file", f, flush=True)
"""

# Every check the suite must have made and passed: a suite that skipped a step cannot pass.
REQUIRED = [
    "the extension is installed (from the .vsix)",
    "the extension host has the test's MIRRORD_RUNTIME_DIR",
    "the status bar toggle is on",
    "02-node: stopped at the breakpoint (app.js:4)",
    "02-node: at the breakpoint the program holds the pod's POD_VAR",
    "02-node: the debugger's own port is not subscribed in the pod",
    "02-node: the mirrord view lists the session",
    '02-node: the program printed "env from-the-pod"',
    '02-node: the program printed "file pod-only file"',
    "02-node: the session ends with the program",
    "03-python: stopped at the breakpoint (app.py:4)",
    "03-python: at the breakpoint the program holds the pod's POD_VAR",
    "03-python: the debugger's own port is not subscribed in the pod",
    "03-python: the mirrord view lists the session",
    '03-python: the program printed "env from-the-pod"',
    '03-python: the program printed "file pod-only file"',
    "04-error-invalid-config: the notification shows the CLI's message",
    "05-error-from-cli: the notification shows the CLI's message",
    "06-stop: the stop button of the mirrord view ends the session",
    "06-stop: and its debug session",
    "06-stop: 'Show daemon log' shows the daemon's log of the session",
    "schema: an invalid value in .mirrord/*.json is flagged by the contributed schema",
    "target pick: lists deployment/web",
    "target pick: offers targetless",
    "target pick: returns the picked target",
    "target pick: the recent target is first",
]

SET_UP_TIMEOUT = 900  # cold: npm ci (~30 s) + code-server's native builds (~2 min on 2 cores)
SUITE_TIMEOUT = 900


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: run scripts/install-system-deps (as root)"
    return path


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=SET_UP_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {SET_UP_TIMEOUT} s: {' '.join(cmd)}")
    if done.returncode != 0:
        pytest.fail(
            f"{what} failed ({done.returncode}): {done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def _build_extension() -> Path:
    """node_modules from the lock (npm ci, unless it is already installed from this lock),
    then compile and package the .vsix."""
    npm = _tool("npm")
    installed = EXT / "node_modules" / ".package-lock.json"
    lock = EXT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        _run([npm, "ci", "--no-audit", "--no-fund"], EXT, "npm ci (extensions/vscode)")
    _run([npm, "run", "package"], EXT, "npm run package (extensions/vscode)")
    vsix = EXT / "mirrord.vsix"
    assert vsix.is_file()
    return vsix


def _install_code_server() -> Path:
    out = _run(
        [str(EXT / "test" / "ide" / "install-code-server.sh")], EXT, "installing code-server"
    )
    return Path(out.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_workspace(root: Path, target: str) -> dict[str, Path]:
    (root / ".mirrord").mkdir(parents=True)
    (root / "app.js").write_text(NODE_APP)
    (root / "app.py").write_text(PYTHON_APP)
    files = {
        "config": root / ".mirrord" / "mirrord.json",
        "bad_target": root / "configs" / "missing-target.json",
        "invalid": root / "configs" / "invalid.json",
    }
    files["bad_target"].parent.mkdir()
    files["config"].write_text(json.dumps({"target": {"path": target}}, indent=2) + "\n")
    # a pid that cannot exist (above the kernel's pid_max limit of 2^22)
    files["bad_target"].write_text(json.dumps({"target": "pid/9999999"}) + "\n")
    files["invalid"].write_text(json.dumps({"feature": {"fs": "sideways"}}) + "\n")
    return files


def _stop_group(pid_file: Path) -> None:
    """code-server's process group, if the driver could not stop it itself."""
    with contextlib.suppress(OSError, ValueError):
        pgid = int(pid_file.read_text())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)


@pytest.mark.asyncio
@pytest.mark.timeout(SET_UP_TIMEOUT + SUITE_TIMEOUT + 120)
async def test_vscode_extension_in_code_server(
    make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    node = _tool("node")
    chromium = _tool("chromium")
    started = time.monotonic()
    vsix = await asyncio.to_thread(_build_extension)
    code_server = await asyncio.to_thread(_install_code_server)
    set_up = time.monotonic() - started

    pod = make_pod(POD_SPEC)
    target = f"pid/{pod.pid}"
    workspace = tmp_path / "workspace"
    files = _write_workspace(workspace, target)
    test_dir = tmp_path / "suite"
    test_dir.mkdir()
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir()
    scenario: dict[str, Any] = {
        "workspace": str(workspace),
        "mirrord": MIRRORD,
        "target": target,
        "podVar": {"name": "POD_VAR", "value": "from-the-pod"},
        "podFile": {"path": "/app/test.txt", "text": "pod-only file"},
        "python": sys.executable,
        "badTargetConfig": str(files["bad_target"]),
        "invalidConfig": str(files["invalid"]),
        "kube": True,
    }
    # code-server's and its helpers' sockets (vscode-ipc-*, js-debug's): short paths, removed
    # after the suite; the name is chosen here, the folder made right before code-server starts
    tmp_dir = Path(tempfile.gettempdir()) / f"mrdvt{os.getpid()}"
    driver_config = tmp_path / "driver.json"
    driver_config.write_text(
        json.dumps(
            {
                "codeServer": str(code_server),
                "chromium": chromium,
                "port": _free_port(),
                "workspace": str(workspace),
                "testDir": str(test_dir),
                "artifacts": str(ARTIFACTS),
                "scratch": str(tmp_path / "code-server"),
                "tmpDir": str(tmp_dir),
                "vsix": str(vsix),
                "fixture": str(EXT / "test" / "ide" / "fixture"),
                "suite": str(EXT / "out" / "test" / "ide" / "suite.js"),
                "timeoutMs": SUITE_TIMEOUT * 1000,
                # code-server's extension host gets the login shell's PATH, not ours
                "settings": {"mirrord.binaryPath": MIRRORD},
            }
        )
    )
    async with FakeApiServer(workdir=tmp_path / "api") as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        names = add_deployment(server, "web") + add_deployment(server, "api", pods=[None, None])
        await wait_running(server, "default", names)
        with temp_mirrord("mrdv") as cli:
            scenario["runtimeDir"] = str(cli.runtime)
            (test_dir / "scenario.json").write_text(json.dumps(scenario))
            env = dict(
                cli.env,
                KUBECONFIG=str(kubeconfig),
                # the venv's mirrord first, for code-server and everything it starts
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                MIRRORD_IDE_TEST_PYTHON=sys.executable,
            )
            suite_started = time.monotonic()
            shutil.rmtree(tmp_dir, ignore_errors=True)  # a crashed earlier run's
            tmp_dir.mkdir(mode=0o700)
            try:
                proc = await asyncio.create_subprocess_exec(
                    node,
                    str(EXT / "out" / "test" / "ide" / "driver.js"),
                    str(driver_config),
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                try:
                    out, err = await asyncio.wait_for(proc.communicate(), SUITE_TIMEOUT + 60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    pytest.fail(f"the driver did not finish within {SUITE_TIMEOUT + 60} s")
            finally:
                _stop_group(test_dir / "code-server.pid")
                shutil.rmtree(tmp_dir, ignore_errors=True)
                # the daemon's view of the sessions, beside the screenshots
                with contextlib.suppress(OSError):
                    shutil.copy(cli.runtime / "mirrordd.log", ARTIFACTS / "mirrordd.log")
            suite_time = time.monotonic() - suite_started
    (ARTIFACTS / "driver.log").write_bytes(err)
    (ARTIFACTS / "timing.json").write_text(
        json.dumps({"set_up_s": round(set_up, 1), "suite_s": round(suite_time, 1)})
    )
    lines = out.decode().strip().splitlines()
    assert lines, f"the driver printed no result (exit {proc.returncode}): {err.decode()[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    checks = {c["name"]: c for c in result["checks"]}
    failed = [f"{c['name']}: {c['detail'][:800]}" for c in result["checks"] if not c["ok"]]
    missing = [name for name in REQUIRED if name not in checks]
    assert not failed and not missing, (
        "failed:\n" + "\n".join(failed) + "\nmissing:\n" + "\n".join(missing)
    )
    assert proc.returncode == 0
    for shot in ("01-status-bar-on", "02-node-1-breakpoint", "03-python-1-breakpoint"):
        assert (ARTIFACTS / f"{shot}.png").is_file(), shot
