"""mirrord's IDE protocol against a cluster (the in-process API server, its pods namespace
pods): the calls mirrord's own VS Code extension and IntelliJ plugin make, with their
environment, parsed as they parse them (tests/cli/_ide.py): `verify-config --ide`, `ls` for
the target picker, then `ext` and a debuggee started with what it printed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli._ide import IDE_ENV, debuggee_env, intellij_error, read_until_ready, vscode_error
from tests.cli.conftest import Mirrord
from tests.kube.apiserver import FakeApiServer

pytestmark = [pytest.mark.asyncio, pytest.mark.netns]


def _ide(cli: Mirrord, ide: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "mirrord"), *args],
        env={**cli.env, **IDE_ENV[ide], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_vscode_target_picker_lists_what_the_cluster_has(
    cluster: FakeApiServer, mirrord_cli: Mirrord
) -> None:
    # VS Code: `ls` (no -o) with MIRRORD_LS_RICH_OUTPUT=true and the kinds it offers
    kinds = json.dumps(["deployment", "rollout", "pod"])
    result = await asyncio.to_thread(
        _ide, mirrord_cli, "vscode", "ls", MIRRORD_LS_TARGET_TYPES=kinds
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    rich = json.loads(result.stdout)
    assert list(rich) == ["targets", "current_namespace", "namespaces"]
    assert rich["current_namespace"] == "default"
    assert {"default", "kube-system", "mirrord"} <= set(rich["namespaces"])
    paths = [t["path"] for t in rich["targets"]]
    assert all(t["available"] is True for t in rich["targets"])
    assert paths[0] == "deployment/web"
    assert any(p.startswith("pod/web-") and p.endswith("/container/app") for p in paths)
    # only the kinds asked for
    result = await asyncio.to_thread(
        _ide, mirrord_cli, "vscode", "ls", MIRRORD_LS_TARGET_TYPES='["pod"]'
    )
    pods = [t["path"] for t in json.loads(result.stdout)["targets"]]
    assert pods and all(p.startswith("pod/") for p in pods)
    # the namespace switch: `-n NS`, and MIRRORD_TARGET_NAMESPACE (what ext gets) the same way
    result = await asyncio.to_thread(_ide, mirrord_cli, "vscode", "ls", "-n", "kube-system")
    assert json.loads(result.stdout)["current_namespace"] == "kube-system"
    assert json.loads(result.stdout)["targets"] == []
    result = await asyncio.to_thread(
        _ide, mirrord_cli, "vscode", "ls", MIRRORD_TARGET_NAMESPACE="kube-system"
    )
    assert json.loads(result.stdout)["current_namespace"] == "kube-system"


async def test_intellij_ls_with_output_json(cluster: FakeApiServer, mirrord_cli: Mirrord) -> None:
    # IntelliJ: `ls -f CFG -o json`, rich output asked for by its environment
    config = Path(mirrord_cli.runtime) / "mirrord.json"
    config.write_text("{}")
    result = await asyncio.to_thread(
        _ide,
        mirrord_cli,
        "intellij",
        "ls",
        "-f",
        str(config),
        "-o",
        "json",
        MIRRORD_LS_RICH_OUTPUT="true",
    )
    assert result.returncode == 0, result.stderr
    assert {"path": "deployment/web", "available": True} in json.loads(result.stdout)["targets"]
    # without the rich variable: a JSON array of the paths (mirrord's older shape)
    result = await asyncio.to_thread(
        _ide, mirrord_cli, "intellij", "ls", "-f", str(config), "-o", "json", "-t", "deployment"
    )
    assert json.loads(result.stdout) == ["deployment/web"]


async def test_ls_errors_are_the_json_line_the_ides_parse(
    cluster: FakeApiServer, mirrord_cli: Mirrord, tmp_path: Path
) -> None:
    bad = await asyncio.to_thread(
        _ide, mirrord_cli, "vscode", "ls", MIRRORD_LS_TARGET_TYPES="deployment"
    )
    assert bad.returncode == 2 and bad.stdout == ""
    for error in (vscode_error(bad.stderr), intellij_error(bad.stderr)):
        assert (
            "MIRRORD_LS_TARGET_TYPES" in error["message"]
            and '["deployment", "pod"]' in error["help"]
        )
    missing = tmp_path / "no-kubeconfig.yaml"
    gone = await asyncio.to_thread(
        _ide, mirrord_cli, "intellij", "ls", "-o", "json", KUBECONFIG=str(missing)
    )
    assert gone.returncode == 1 and gone.stdout == ""
    assert str(missing) in intellij_error(gone.stderr)["message"]


async def test_vscode_flow_verify_pick_ext_debuggee(
    cluster: FakeApiServer, mirrord_cli: Mirrord, tmp_path: Path
) -> None:
    """What the extension does on a debug launch: verify the config (no target: ask), list
    targets, run `ext -t PICKED -f CFG`, wait for the ready line, start the debuggee with the
    environment; the session lasts until the debuggee exits."""
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"fs": "read"}}))
    verified = await asyncio.to_thread(
        _ide, mirrord_cli, "vscode", "verify-config", "--ide", str(config)
    )
    assert verified.returncode == 0, verified.stderr
    success = json.loads(verified.stdout)
    assert success["type"] == "Success" and success["config"]["path"] is None  # ask the user
    listed = await asyncio.to_thread(_ide, mirrord_cli, "vscode", "ls", "-f", str(config))
    picked = json.loads(listed.stdout)["targets"][0]["path"]
    assert picked == "deployment/web"
    env = {
        **mirrord_cli.env,
        **IDE_ENV["vscode"],
        "MIRRORD_IGNORE_DEBUGGER_PORTS": "45000-65535",
        "MIRRORD_DETECT_DEBUGGER_PORT": "debugpy",
    }
    ext = subprocess.Popen(
        [str(Path(sys.executable).parent / "mirrord"), "ext", "-t", picked, "-f", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert ext.stdout is not None
        execution = await asyncio.to_thread(read_until_ready, ext.stdout)
        assert execution.environment["POD_VAR"] == "from-the-pod"
        assert execution.patched_path is None and execution.uses_operator is False
        debuggee = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-c",
                "import os; print(os.environ['POD_VAR'], open('/app/test.txt').read())",
            ],
            env=debuggee_env(env, execution),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert debuggee.stdout.split() == ["from-the-pod", "pod-only", "file"], debuggee.stderr
        out, err = await asyncio.to_thread(ext.communicate, timeout=30)
        assert ext.returncode == 0, err
        assert out == "" and err == ""  # nothing after the ready line
    finally:
        if ext.poll() is None:
            ext.kill()
            ext.communicate(timeout=10)
