"""Shared test configuration.

Backends: code shared by the daemon (asyncio) and the agent (trio) is tested under both with
anyio's pytest plugin (`@pytest.mark.anyio` and the `anyio_backend` fixture below); daemon-only
code uses pytest-asyncio (`@pytest.mark.asyncio`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mirrord.localpod import LocalPod, PodSpec


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/reliability/conftest.py: options must be known before collection.
    parser.addoption(
        "--reliability-full",
        action="store_true",
        default=False,
        help="run tests/reliability at its full size (10,000 fuzz frames a socket, 1,000 "
        "stolen connections, 1 GiB each way, 500 sequential runs; also "
        "MIRRORD_RELIABILITY_FULL=1); see docs/reliability.md",
    )


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- local pods (mirrord.localpod) -------------------------------------------------------------
# A pod is a network + mount + UTS namespace with a real process inside; see
# src/mirrord/localpod/_pod.py. `pod` gives one default pod; `make_pod(PodSpec(...))` makes pods
# with custom files/env/hosts. Every pod is removed after the test, also on failure; leftovers of
# dead earlier runs are cleared once per session.


@pytest.fixture(scope="session")
def _localpod_leftovers_cleared() -> None:
    from mirrord.localpod import cleanup_leftovers

    cleanup_leftovers()


@pytest.fixture
def make_pod(
    _localpod_leftovers_cleared: None,
) -> Iterator[Callable[..., LocalPod]]:
    from mirrord.localpod import create_pod

    pods: list[LocalPod] = []

    def make(spec: PodSpec | None = None) -> LocalPod:
        made = create_pod(spec)
        pods.append(made)
        return made

    try:
        yield make
    finally:
        for made in pods:
            made.close()


@pytest.fixture
def pod(make_pod: Callable[..., LocalPod]) -> LocalPod:
    return make_pod()
