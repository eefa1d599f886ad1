"""A configuration the layer cannot hold is refused by `mirrord run` before any agent starts,
naming the setting and the limit (it used to start the session; then the layer dropped
patterns past its list size, stayed inactive on a long line, or the command failed with
E2BIG because MIRRORD_LAYER_CONFIG was over Linux's limit for one environment string)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import Mirrord, agent_pids


@pytest.mark.parametrize(
    ("read_only", "expected"),
    [
        ([f"^/data/{i}/" for i in range(200)], "has 200 entries; the layer takes at most 128"),
        ([f"^/{i:03d}/" + "b" * 1500 for i in range(100)], "at most 131072 bytes per environment"),
    ],
    ids=["list", "environment"],
)
def test_mirrord_run_refuses_a_configuration_the_layer_cannot_hold(
    mirrord: Mirrord, tmp_path: Path, read_only: list[str], expected: str
) -> None:
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"fs": {"read_only": read_only}}}))
    marker = tmp_path / "ran"
    result = mirrord.run(
        "run", "-f", str(config), "-t", "pid/1", "--", "sh", "-c", f"touch {marker}", timeout=60
    )
    assert result.returncode == 2, result.stderr  # a configuration error
    assert expected in result.stderr and "feature.fs.read_only" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not agent_pids(mirrord.runtime)
    assert not list(mirrord.runtime.glob("agent-*"))  # no agent was started for it
