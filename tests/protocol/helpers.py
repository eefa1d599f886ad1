"""In-memory connection pairs for protocol tests (no sockets)."""

from __future__ import annotations

from mirrord.protocol import (
    CLOSED,
    INITIAL_WINDOW,
    NEED_DATA,
    AgentConnection,
    AgentRole,
    LayerConnection,
    LayerRole,
    Received,
    UnknownMessage,
)

SECRET = "s3cret"
BUILD = "build-1"


def drain(conn: AgentConnection | LayerConnection) -> list[Received | UnknownMessage]:
    """Every event available now (bounded: a frame is at least 5 bytes)."""
    out: list[Received | UnknownMessage] = []
    for _ in range(100_000):
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        assert isinstance(event, Received | UnknownMessage)
        out.append(event)
    raise AssertionError("too many events")


def agent_pair(*, initial_window: int = INITIAL_WINDOW) -> tuple[AgentConnection, AgentConnection]:
    """A daemon and an agent connection, handshake done."""
    daemon = AgentConnection(AgentRole.DAEMON, secret=SECRET, initial_window=initial_window)
    agent = AgentConnection(AgentRole.AGENT, secret=SECRET, initial_window=initial_window)
    agent.receive_data(daemon.hello("test"))
    drain(agent)
    daemon.receive_data(agent.welcome(agent_version="t", target="pid/1"))
    drain(daemon)
    return daemon, agent


def layer_pair() -> tuple[LayerConnection, LayerConnection]:
    """A layer and a daemon connection, handshake done."""
    layer = LayerConnection(LayerRole.LAYER, build_id=BUILD)
    daemon = LayerConnection(LayerRole.DAEMON, build_id=BUILD)
    daemon.receive_data(layer.hello(session="s", pid=1))
    drain(daemon)
    layer.receive_data(daemon.welcome(process=1))
    drain(layer)
    return layer, daemon
