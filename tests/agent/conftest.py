"""Fixtures of the agent tests: a real `mirrord-agent` subprocess next to a real local pod.

Agents come from the one launcher (`tests/_agent_process.py`: a temporary runtime directory
each, never ~/.mirrord) and are stopped after the test, also on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from mirrord.localpod import LocalPod
from tests._agent_process import AgentProc, start_agent, stop_agent


@pytest.fixture
def anyio_backend() -> str:
    # The agent under test is a subprocess; the test client only needs one backend.
    return "trio"


@pytest.fixture
def make_agent() -> Iterator[Callable[..., AgentProc]]:
    agents: list[AgentProc] = []

    def make(target: str, *extra: str) -> AgentProc:
        agent = start_agent(target, *extra)
        agents.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            stop_agent(agent)


@pytest.fixture
def agent(pod: LocalPod, make_agent: Callable[..., AgentProc]) -> AgentProc:
    return make_agent(f"pid/{pod.pid}", "--idle-timeout", "60")
