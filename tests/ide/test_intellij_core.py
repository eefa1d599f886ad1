"""The IntelliJ plugin's core (extensions/intellij/core, Kotlin) tested against the real CLI.

One pytest test runs `extensions/intellij/scripts/test-core` (kotlinc from npm, JUnit 5 on
Debian's JDK 17): the parser tests on recorded lines, and the real-CLI tests with what they need
set up here: a local pod (the target, `pid/N`), the in-process API server with a deployment on
that pod (for `mirrord ls` and the target chooser), and a runtime directory of this test's own
(its daemon and agents are stopped afterwards). The JUnit XML report must show every Kotlin test
run and passed: none skipped, so a missing variable cannot make the real-CLI tests vanish.

The API server runs on this test's event loop: the script runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import MIRRORD, temp_mirrord
from tests.kube._cluster import add_deployment
from tests.kube.apiserver import FakeApiServer

pytestmark = [pytest.mark.asyncio, pytest.mark.netns, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TEST_CORE = ROOT / "extensions" / "intellij" / "scripts" / "test-core"


POD_SPEC = PodSpec(
    name="web",
    env={"POD_VAR": "from-the-pod"},
    files={"/app/test.txt": b"pod-only file\n"},
)


def _expected_tests() -> int:
    """The Kotlin tests the report must count: every @Test of the sources."""
    sources = (TEST_CORE.parent.parent / "core/src/test").rglob("*.kt")
    return sum(p.read_text().count("@Test\n") for p in sources)


def _run_test_core(env: dict[str, str], build: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TEST_CORE)],
        env={**env, "MIRRORD_INTELLIJ_BUILD": str(build)},
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(900)
async def test_intellij_core_against_the_real_cli(
    make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(POD_SPEC)
    workdir = tmp_path / "work"
    workdir.mkdir()
    # The build is kept between runs (gitignored), so a second run skips kotlinc.
    build = Path(os.environ.get("MIRRORD_INTELLIJ_BUILD", ROOT / "extensions/intellij/build/core"))
    async with FakeApiServer(workdir=tmp_path / "api") as server:
        add_deployment(server, "web", pods=[pod])
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        with temp_mirrord("mrdi") as cli:
            env = {
                **cli.env,
                "KUBECONFIG": str(kubeconfig),
                "MIRRORD_TEST_BINARY": MIRRORD,
                "MIRRORD_TEST_POD_PID": str(pod.pid),
                "MIRRORD_TEST_PYTHON": sys.executable,
                "MIRRORD_TEST_WORKDIR": str(workdir),
            }
            try:
                result = await asyncio.to_thread(_run_test_core, env, build)
            finally:
                # The daemon must stop while the API server still answers (it deletes its Jobs).
                await asyncio.to_thread(cli.cleanup)
    output = result.stdout[-20000:] + result.stderr[-5000:]
    report = build / "reports" / "TEST-junit-jupiter.xml"
    assert report.is_file(), output
    suite = ET.parse(report).getroot()
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    assert result.returncode == 0, output
    assert counts == {"tests": _expected_tests(), "failures": 0, "errors": 0, "skipped": 0}, output
