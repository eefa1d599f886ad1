"""`mirrord verify-config [--ide] PATH` and `mirrord schema`, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mirrord.config import config_schema

CASES = Path(__file__).parent / "cases"


def _mirrord(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from mirrord.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_")}


def test_verify_config_ide_success(tmp_path: Path) -> None:
    path = tmp_path / "mirrord.json"
    path.write_text(
        json.dumps(
            {"target": "pod/x", "operator": True, "feature": {"network": {"incoming": "steal"}}}
        )
    )
    proc = _mirrord("verify-config", "--ide", str(path), env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["type"] == "Success"
    # the IDE shape: the target only, its path as the target string (the plugins only ask
    # whether it is null: then they offer a target picker)
    assert out["config"] == {"path": "pod/x", "namespace": None}
    assert "deployment" in out["compatible_target_types"]
    assert any("operator" in w for w in out["warnings"])
    # and the whole resolved configuration
    assert out["resolved"]["target"]["path"] == "pod/x"
    assert out["resolved"]["feature"]["network"]["incoming"]["mode"] == "steal"


def test_verify_config_ide_target_shapes(tmp_path: Path) -> None:
    path = tmp_path / "mirrord.json"
    for target, expected in [
        (None, None),
        ("targetless", "targetless"),
        ("deployment/api/container/main", "deployment/api/container/main"),
        ({"deployment": "api", "container": "main"}, "deployment/api/container/main"),
        ("pid/4242", "pid/4242"),
    ]:
        path.write_text(json.dumps({"target": {"path": target, "namespace": "ns"}}))
        proc = _mirrord("verify-config", "--ide", str(path), env=_clean_env())
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["config"] == {"path": expected, "namespace": "ns"}


def test_verify_config_ide_fail(tmp_path: Path) -> None:
    path = tmp_path / "mirrord.json"
    path.write_text(json.dumps({"feature": {"fs": "raed", "nework": {}}}))
    proc = _mirrord("verify-config", "--ide", str(path), env=_clean_env())
    # the verdict is the JSON: the IDEs take a non-zero exit for a crash and read stderr
    assert proc.returncode == 0
    assert proc.stderr == ""
    out = json.loads(proc.stdout)
    assert out["type"] == "Fail"
    assert len(out["errors"]) == 2
    text = "\n".join(out["errors"])
    assert "feature.fs.mode" in text and "did you mean 'read'" in text
    assert "feature.nework" in text and "did you mean 'network'" in text
    assert "Traceback" not in proc.stderr


def test_verify_config_human_output() -> None:
    proc = _mirrord("verify-config", str(CASES / "same.toml"), env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "is a valid mirrord config" in proc.stdout
    assert "deployment/api/container/main" in proc.stdout
    assert "steal" in proc.stdout


def test_verify_config_human_errors_and_env(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("feature:\n  network:\n    incoming: {mode: stael}\n")
    proc = _mirrord("verify-config", str(path), env=_clean_env())
    assert proc.returncode == 1
    assert "feature.network.incoming.mode" in proc.stderr
    assert "'stael'" in proc.stderr and "Traceback" not in proc.stderr
    env = _clean_env() | {"MIRRORD_AGENT_TTL": "x"}
    proc = _mirrord("verify-config", str(CASES / "default_ide.json"), env=env)
    assert proc.returncode == 1
    assert "MIRRORD_AGENT_TTL" in proc.stderr


def test_verify_config_missing_file(tmp_path: Path) -> None:
    proc = _mirrord("verify-config", "--ide", str(tmp_path / "none.json"), env=_clean_env())
    assert proc.returncode == 0
    out = json.loads(proc.stdout)
    assert out["type"] == "Fail" and "not found" in out["errors"][0]


def test_schema_command_prints_the_schema() -> None:
    proc = _mirrord("schema")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == config_schema()
