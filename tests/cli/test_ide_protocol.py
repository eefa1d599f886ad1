"""mirrord's IDE protocol against a local pod target: the calls of mirrord's own VS Code
extension and IntelliJ plugin, with their environment, parsed as they parse them
(tests/cli/_ide.py); and `MIRRORD_PROGRESS_MODE` for `run` and `ext`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord import __version__
from mirrord.localpod import LocalPod, PodSpec
from tests.cli._ide import (
    IDE_ENV,
    READY,
    check_message,
    debuggee_env,
    intellij_error,
    read_until_ready,
    vscode_error,
)
from tests.cli.conftest import Mirrord, agent_pids, wait_for

SPEC = PodSpec(env={"POD_VAR": "from-the-pod"}, files={"/app/test.txt": b"pod-only file\n"})
SHOW = "import os; print(os.environ['POD_VAR'], open('/app/test.txt').read().strip())"


def test_version_is_one_line_mirrord_x_y_z(mirrord: Mirrord) -> None:
    started = time.monotonic()
    result = mirrord.run("--version", timeout=10)
    assert result.returncode == 0 and result.stderr == ""
    # VS Code: stdout.split(" ")[1].trim()
    assert result.stdout.split(" ")[0] == "mirrord"
    assert result.stdout.split(" ")[1].strip() == __version__
    assert result.stdout.count("\n") == 1
    assert time.monotonic() - started < 10


@pytest.mark.netns
@pytest.mark.parametrize("ide", ["vscode", "intellij"])
def test_ext_as_the_ide_runs_it(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], ide: str
) -> None:
    pod = make_pod(SPEC)
    mirrord.env.update(IDE_ENV[ide])
    ext = mirrord.popen("ext", "-t", f"pid/{pod.pid}", "-e", sys.executable)
    try:
        assert ext.stdout is not None
        execution = read_until_ready(ext.stdout)
        assert execution.messages[0] == {"type": "NewTask", "name": READY, "parent": None}
        # every step finished before the ready line, each under the root
        started = [m["name"] for m in execution.messages[1:] if m["type"] == "NewTask"]
        finished = [m["name"] for m in execution.messages if m["type"] == "FinishedTask"]
        assert started and finished[:-1] == started and finished[-1] == READY
        infos = [m["message"] for m in execution.messages if m["type"] == "Info"]
        if ide == "intellij":  # MIRRORD_EXT_PRINT_CONFIG=TRUE: mirrord's "config summary"
            assert "config summary" in started
            assert f"target: pid/{pod.pid}" in infos and "fs: read" in infos
        else:
            assert infos == []
        debuggee = subprocess.run(
            [sys.executable, "-c", SHOW],
            env=debuggee_env(mirrord.env, execution),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert debuggee.stdout.split() == ["from-the-pod", "pod-only", "file"], debuggee.stderr
        out, err = ext.communicate(timeout=30)  # the debuggee is gone: the session ends
        assert ext.returncode == 0 and out == "" and err == ""
    finally:
        if ext.poll() is None:
            ext.kill()
            ext.communicate(timeout=10)


@pytest.mark.netns
def test_ext_errors_are_one_json_line_on_stderr(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"fs": "raed", "nework": {}}}))
    mirrord.env.update(IDE_ENV["intellij"])
    result = mirrord.run("ext", "-t", f"pid/{pod.pid}", "-f", str(config), timeout=60)
    assert result.returncode != 0
    for line in result.stdout.splitlines():
        check_message(json.loads(line))
    error = intellij_error(result.stderr)
    assert error == vscode_error(result.stderr)
    assert error["severity"] == "error" and "verify-config" in error["help"]
    text = error["message"] + "\n".join(error["causes"])
    assert "feature.fs.mode" in text and "feature.nework" in text


@pytest.mark.netns
@pytest.mark.parametrize("support", [True, False])
def test_agent_lost_after_ready_is_an_ide_message_only_when_supported(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], support: bool
) -> None:
    pod = make_pod(SPEC)
    mirrord.env.update(IDE_ENV["vscode"])
    if not support:
        del mirrord.env["MIRRORD_PROGRESS_SUPPORT_IDE"]
    ext = mirrord.popen("ext", "-t", f"pid/{pod.pid}")
    assert ext.stdout is not None
    execution = read_until_ready(ext.stdout)
    holder = subprocess.Popen(
        [sys.executable, "-c", "open('/app/test.txt').read(); print('in', flush=True); input()"],
        env=debuggee_env(mirrord.env, execution),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    mirrord.children.append(holder)
    assert holder.stdout is not None and holder.stdout.readline() == "in\n"
    (agent,) = wait_for(lambda: agent_pids(mirrord.runtime, f"pid/{pod.pid}"), 10, "the agent")
    os.kill(agent, signal.SIGKILL)
    message = check_message(json.loads(ext.stdout.readline()))
    if support:
        assert message["type"] == "IdeMessage"
        assert message["message"]["id"] == "agent_lost"
        assert message["message"]["level"] == "Warning" and message["message"]["actions"] == []
    else:
        assert message["type"] == "Warning"
    assert "agent" in json.dumps(message)


@pytest.mark.netns
def test_progress_modes_of_ext(mirrord: Mirrord, make_pod: Callable[..., LocalPod]) -> None:
    pod = make_pod(SPEC)
    for mode in ("simple", "dumb", "std", "standard"):
        mirrord.env["MIRRORD_PROGRESS_MODE"] = mode
        result = mirrord.run("ext", "-t", f"pid/{pod.pid}", "--wait-timeout", "0", timeout=60)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == READY and "\x1b" not in result.stdout
        assert json.loads(lines[-1])["environment"]["POD_VAR"] == "from-the-pod"
    mirrord.env["MIRRORD_PROGRESS_MODE"] = "off"
    result = mirrord.run("ext", "-t", f"pid/{pod.pid}", "--wait-timeout", "0", timeout=60)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


@pytest.mark.netns
def test_progress_modes_of_run(mirrord: Mirrord, make_pod: Callable[..., LocalPod]) -> None:
    pod = make_pod(SPEC)
    cmd = ("run", "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", SHOW)
    mirrord.env["MIRRORD_PROGRESS_MODE"] = "json"
    result = mirrord.run(*cmd)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from-the-pod pod-only file\n"  # the command's stdout is its own
    messages = [check_message(json.loads(line)) for line in result.stderr.splitlines()]
    assert messages[0] == {"type": "NewTask", "name": "mirrord exec", "parent": None}
    assert messages[-1] == {
        "type": "FinishedTask",
        "name": "mirrord exec",
        "success": True,
        "message": None,
    }
    mirrord.env["MIRRORD_PROGRESS_MODE"] = "off"
    result = mirrord.run(*cmd)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == "from-the-pod pod-only file\n"
    mirrord.env["MIRRORD_PROGRESS_MODE"] = "simple"
    mirrord.env["FORCE_COLOR"] = "1"  # no colours, no spinner: plain lines
    result = mirrord.run(*cmd)
    assert result.returncode == 0 and "\x1b" not in result.stderr
    assert all(line.startswith("mirrord: ") for line in result.stderr.splitlines())
    # an error in JSON mode is the one JSON line
    mirrord.env["MIRRORD_PROGRESS_MODE"] = "json"
    result = mirrord.run("run", "-t", "pid/999999", "--", "true")
    assert result.returncode == 1
    assert "999999" in vscode_error(result.stderr)["message"]


def test_verify_config_ide_names_a_local_target_by_its_string(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"target": "pid/4242"}))
    mirrord.env.update(IDE_ENV["vscode"])
    result = mirrord.run("verify-config", "--ide", str(config))
    assert result.returncode == 0 and result.stderr == ""
    verified = json.loads(result.stdout)
    assert verified["type"] == "Success"
    assert verified["config"] == {"path": "pid/4242", "namespace": None}
    # the namespace the IDE picked reaches the config as MIRRORD_TARGET_NAMESPACE does
    mirrord.env["MIRRORD_TARGET_NAMESPACE"] = "shop"
    result = mirrord.run("verify-config", "--ide", str(config))
    assert json.loads(result.stdout)["config"]["namespace"] == "shop"


def test_usage_errors_of_ide_commands_are_the_json_line(mirrord: Mirrord) -> None:
    for args in (("ext", "--no-such-option"), ("ls", "-t"), ("ext", "-t")):
        result = mirrord.run(*args, timeout=30)
        assert result.returncode == 2 and result.stdout == ""
        error = intellij_error(result.stderr)
        assert error == vscode_error(result.stderr)
        assert f"mirrord {args[0]} --help" in error["help"]
    # the exit codes of the commands themselves are unchanged
    result = mirrord.run("ls", "-o", "json", "-t", "nothing", timeout=30)
    assert (
        result.returncode == 2 and "unknown target type" in vscode_error(result.stderr)["message"]
    )


@pytest.mark.skipif(not Path("/sbin/ldconfig").exists(), reason="no static binary to point at")
def test_ext_recognises_a_static_executable(mirrord: Mirrord) -> None:
    from mirrord.cli._ext import static_executable

    assert static_executable(Path("/sbin/ldconfig"))  # glibc's ldconfig is static-pie
    assert not static_executable(Path(os.path.realpath(sys.executable)))
    assert not static_executable(Path(__file__))  # not ELF at all
    # what `mirrord ext -e` makes of one once the session is open (the ready line's
    # patched_path, or a warning when the config turns the supervisor off) is tested with a
    # pod in tests/cli/test_syscall_supervisor.py; a failed start says nothing about it
    mirrord.env.update(IDE_ENV["vscode"])
    result = mirrord.run("ext", "-t", "pid/999999", "-e", "/sbin/ldconfig", timeout=60)
    messages = [check_message(json.loads(line)) for line in result.stdout.splitlines()]
    assert result.returncode == 1 and messages[-1]["success"] is False, messages
    assert not [m for m in messages if m["type"] == "Warning"], messages
