"""A failed Connect leaves no flow-control state behind on either side (sans-IO)."""

from __future__ import annotations

import errno

from mirrord.protocol import AgentConnection, AgentRole, Received
from mirrord.protocol import messages as m


def _pair() -> tuple[AgentConnection, AgentConnection]:
    daemon = AgentConnection(AgentRole.DAEMON, secret="s")
    agent = AgentConnection(AgentRole.AGENT, secret="s")
    agent.receive_data(daemon.hello())
    assert isinstance(agent.next_event(), Received)
    daemon.receive_data(agent.welcome(agent_version="t", target="pid/1"))
    assert isinstance(daemon.next_event(), Received)
    return daemon, agent


def _deliver(frame: bytes, to: AgentConnection) -> None:
    to.receive_data(frame)
    assert isinstance(to.next_event(), Received)


def test_failed_connect_forgets_the_connection_on_both_sides() -> None:
    daemon, agent = _pair()
    connect = m.Connect(request_id=7, conn_id=2, protocol="tcp", address="10.0.0.1", port=1)
    _deliver(daemon.send(connect, 1), agent)
    assert daemon.send_window(1, 2) > 0 and agent.send_window(1, 2) > 0
    _deliver(agent.send(m.ErrorReply(request_id=7, errno=errno.ECONNREFUSED), 1), daemon)
    assert daemon.statistics()["connections"] == 0
    assert agent.statistics()["connections"] == 0


def test_successful_connect_keeps_the_connection_until_conn_close() -> None:
    daemon, agent = _pair()
    connect = m.Connect(request_id=7, conn_id=2, protocol="tcp", address="10.0.0.1", port=1)
    _deliver(daemon.send(connect, 1), agent)
    connected = m.Connected(request_id=7, conn_id=2, local_address="10.0.0.2", local_port=5)
    _deliver(agent.send(connected, 1), daemon)
    # A later error reply to another request with the same id does not touch the connection.
    _deliver(agent.send(m.ErrorReply(request_id=7, errno=errno.ENOENT), 1), daemon)
    assert daemon.send_window(1, 2) > 0 and agent.send_window(1, 2) > 0
    _deliver(daemon.send(m.ConnClose(conn_id=2), 1), agent)
    assert daemon.statistics()["connections"] == 0 and agent.statistics()["connections"] == 0
