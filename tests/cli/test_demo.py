"""`mirrord demo`, as the README runs it."""

from __future__ import annotations

import pytest

from tests.cli.conftest import Mirrord, processes_mentioning

pytestmark = pytest.mark.netns


def test_demo_shows_env_file_dns_loopback_and_a_stolen_request_then_cleans_up(
    mirrord: Mirrord,
) -> None:
    result = mirrord.run("demo", timeout=110)
    out = result.stdout
    assert "[ok]   env DEMO_GREETING: hello from the demo pod" in out, (out, result.stderr)
    assert "[ok]   file /app/config.yaml: service: demo" in out
    assert "[ok]   DNS demo-db.cluster.local: 10.213.254.10" in out
    assert "[ok]   GET http://127.0.0.1:8080/ (the pod's loopback): demo GET" in out
    assert "[ok]   a request stolen from the pod: 'GET /checkout HTTP/1.1'" in out
    assert "got: 'stolen by the demo app" in out
    assert result.returncode == 0
    assert "[fail]" not in out
    # its private daemon and agent (in a directory under the runtime dir) are gone, and so is
    # that directory
    assert processes_mentioning(str(mirrord.runtime)) == []
    assert [p.name for p in mirrord.runtime.iterdir() if p.name.startswith("demo-")] == []
