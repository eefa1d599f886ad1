"""Fixtures for the Kubernetes tests: an in-process API server and a kubeconfig for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.kube.apiserver import FakeApiServer


@pytest_asyncio.fixture
async def apiserver(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(workdir=tmp_path) as server:
        yield server


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    return apiserver.write_kubeconfig(tmp_path / "kubeconfig")
