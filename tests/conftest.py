"""Shared test configuration.

Backends: code shared by the daemon (asyncio) and the agent (trio) is tested under both with
anyio's pytest plugin (`@pytest.mark.anyio` and the `anyio_backend` fixture below); daemon-only
code uses pytest-asyncio (`@pytest.mark.asyncio`).
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
