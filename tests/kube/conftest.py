"""Fixtures for the Kubernetes tests: an in-process API server and a kubeconfig for it, and a
cluster with a deployment `web` (one namespace pod) for `mirrord` commands run against it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import Mirrord, temp_mirrord
from tests.kube._cluster import add_deployment
from tests.kube.apiserver import FakeApiServer

# The pod of the deployment `web` in `cluster`: an env var, a file and a name only it has.
WEB_POD_SPEC = PodSpec(
    name="web",
    env={"POD_VAR": "from-the-pod"},
    files={"/app/test.txt": b"pod-only file\n"},
    hosts={"pod-only-service": "10.213.250.7"},
)


@pytest_asyncio.fixture
async def apiserver(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(workdir=tmp_path) as server:
        yield server


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    return apiserver.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def mirrord_cli() -> Iterator[Mirrord]:
    with temp_mirrord("mrdk") as cli:
        yield cli


@pytest_asyncio.fixture
async def cluster(
    apiserver: FakeApiServer,
    kubeconfig: Path,
    mirrord_cli: Mirrord,
    make_pod: Callable[..., LocalPod],
) -> AsyncIterator[FakeApiServer]:
    """The API server with the deployment `web` (WEB_POD_SPEC); `mirrord_cli` uses it."""
    pod = make_pod(WEB_POD_SPEC)
    add_deployment(apiserver, "web", pods=[pod])
    mirrord_cli.env["KUBECONFIG"] = str(kubeconfig)
    yield apiserver
    # The daemon must stop while the API server still answers (it deletes its Jobs).
    await asyncio.to_thread(mirrord_cli.cleanup)
