"""Forwarding undecoded (issue 18 item 3): the frame head (channel, kind, request id) read
without decoding the body, and a request and its reply carried between the layer protocol and
the agent protocol by rewriting the head only. Sans-IO: connection pairs in memory."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrord.protocol import (
    AgentConnection,
    AgentRole,
    InvalidRequest,
    LayerConnection,
    LayerRole,
    LocalProtocolError,
    Received,
    Undecoded,
    encode_frame,
    frame_with_head,
    read_head,
)
from mirrord.protocol import messages as m
from tests.protocol.helpers import BUILD, SECRET, drain

_FORWARDED = [m.FileRead, m.FileFetch, m.FileStat, m.EnvRequest, m.DnsLookup]
_REPLIES = [m.FileData, m.FileFetched, m.StatReply, m.ErrorReply, m.EnvReply, m.DnsReply]


def _daemon_sides() -> tuple[LayerConnection, LayerConnection, AgentConnection, AgentConnection]:
    """layer, daemon's layer side (undecoded requests), daemon's agent side (undecoded
    replies), agent (answers undecodable requests): all handshakes done."""
    layer = LayerConnection(LayerRole.LAYER, build_id=BUILD)
    from_layer = LayerConnection(LayerRole.DAEMON, build_id=BUILD, undecoded=_FORWARDED)
    from_layer.receive_data(layer.hello(session="s", pid=1))
    drain(from_layer)
    layer.receive_data(from_layer.welcome(process=1))
    drain(layer)
    to_agent = AgentConnection(AgentRole.DAEMON, secret=SECRET, undecoded=_REPLIES)
    agent = AgentConnection(AgentRole.AGENT, secret=SECRET, invalid_requests_as_events=True)
    agent.receive_data(to_agent.hello("test"))
    drain(agent)
    to_agent.receive_data(agent.welcome(agent_version="t", target="pid/1"))
    drain(to_agent)
    return layer, from_layer, to_agent, agent


def _frame(out: bytes | list[bytes | memoryview]) -> bytes:
    """A forwarded frame as one buffer (a large one comes as parts)."""
    return out if isinstance(out, bytes) else b"".join(out)


def _one(conn: LayerConnection | AgentConnection) -> object:
    event = conn.next_event()
    assert not isinstance(event, type(None))
    return event


@given(
    head=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=3),
    rest=st.lists(st.one_of(st.integers(), st.binary(max_size=300), st.text(max_size=30))),
)
def test_head_read_and_rewritten_without_touching_the_body(
    head: list[int], rest: list[object]
) -> None:
    frame = encode_frame([*head, *rest])
    read = read_head(frame[4:], len(head))
    assert read is not None
    ints, items, body = read
    assert ints == head
    assert items == len(head) + len(rest)
    # the body is the rest of the items, exactly as they were encoded
    assert cbor2.loads(frame_with_head([], len(rest), frame[4 + body :])[4:]) == rest
    # the same head written again gives the same frame (both write the shortest form)
    assert frame_with_head(head, items, frame[4 + body :]) == frame
    new = frame_with_head([2**40, *head[1:]], items, frame[4 + body :])
    assert cbor2.loads(new[4:]) == [2**40, *head[1:], *rest]


@pytest.mark.parametrize(
    "item",
    [
        [-1, 5],  # a negative kind
        ["x", 5],
        [5],  # fewer items than the head
        {"kind": 5},
        3,
    ],
)
def test_a_frame_that_does_not_start_with_a_head_is_not_read(item: object) -> None:
    assert read_head(encode_frame(item)[4:], 2) is None


def test_an_indefinite_array_or_a_cut_head_is_not_read() -> None:
    assert read_head(b"\x9f\x01\x02\xff", 2) is None
    assert read_head(b"\x83\x01\x1b\x00\x00", 2) is None  # an 8-byte integer cut short


def test_a_request_and_its_reply_cross_the_daemon_undecoded() -> None:
    layer, from_layer, to_agent, agent = _daemon_sides()
    request = m.FileRead(request_id=7, handle=3, size=4096, offset=8192)
    from_layer.receive_data(layer.send(request))
    event = _one(from_layer)
    assert isinstance(event, Undecoded)
    assert (event.channel, event.kind, event.request_id) == (0, m.FileRead.KIND, 7)

    agent.receive_data(_frame(to_agent.forward(event, 1_000_000, channel=5)))
    got = _one(agent)
    assert got == Received(
        channel=5, message=m.FileRead(request_id=1_000_000, handle=3, size=4096, offset=8192)
    )

    data = bytes(range(256)) * 4096  # 1 MiB: the body is copied once, never decoded
    to_agent.receive_data(agent.send(m.FileData(request_id=1_000_000, data=data), 5))
    reply = _one(to_agent)
    assert isinstance(reply, Undecoded)
    assert (reply.channel, reply.kind, reply.request_id) == (5, m.FileData.KIND, 1_000_000)
    out = from_layer.forward(reply, 7)
    # large: the new head, then the body where the decoder received it (not copied again)
    assert isinstance(out, list) and len(out) == 2
    assert isinstance(out[1], memoryview) and out[1].obj is reply.payload
    layer.receive_data(_frame(out))
    assert _one(layer) == Received(channel=0, message=m.FileData(request_id=7, data=data))


def test_kinds_not_asked_for_are_decoded_as_before() -> None:
    layer, from_layer, to_agent, agent = _daemon_sides()
    from_layer.receive_data(layer.send(m.FileClose(request_id=1, handle=2)))
    assert _one(from_layer) == Received(channel=0, message=m.FileClose(request_id=1, handle=2))
    to_agent.receive_data(agent.send(m.Ok(request_id=9), 5))
    assert _one(to_agent) == Received(channel=5, message=m.Ok(request_id=9))
    # an undecoded frame that is not forwarded after all: decode() gives its ordinary event
    to_agent.receive_data(agent.send(m.StatReply(request_id=4, stat=[0] * 13), 5))
    reply = _one(to_agent)
    assert isinstance(reply, Undecoded)
    assert to_agent.decode(reply) == Received(
        channel=5, message=m.StatReply(request_id=4, stat=[0] * 13)
    )


def test_a_forwarded_request_with_a_broken_body_costs_that_request_only() -> None:
    layer, from_layer, to_agent, agent = _daemon_sides()
    # a layer that lies: FileRead's head, then bytes that are no CBOR
    broken = frame_with_head([m.FileRead.KIND, 11], 5, b"\xff\xff\xff")
    from_layer.receive_data(broken + layer.send(m.FileStat(request_id=12, handle=1)))
    first = _one(from_layer)
    second = _one(from_layer)
    assert isinstance(first, Undecoded) and isinstance(second, Undecoded)
    agent.receive_data(
        _frame(to_agent.forward(first, 100, channel=3))
        + _frame(to_agent.forward(second, 101, channel=3))
    )
    invalid = _one(agent)
    assert isinstance(invalid, InvalidRequest)
    assert (invalid.channel, invalid.kind, invalid.request_id) == (3, m.FileRead.KIND, 100)
    assert _one(agent) == Received(channel=3, message=m.FileStat(request_id=101, handle=1))


def test_a_broken_frame_is_still_fatal_where_requests_are_not_answered() -> None:
    _, from_layer, _, _ = _daemon_sides()
    from_layer.receive_data(frame_with_head([m.FileRead.KIND, 11], 5, b"\xff"))
    first = _one(from_layer)
    assert isinstance(first, Undecoded)
    with pytest.raises(Exception, match="invalid CBOR"):
        from_layer.decode(first)


def test_forward_checks_what_it_may_send() -> None:
    layer, from_layer, to_agent, _ = _daemon_sides()
    from_layer.receive_data(layer.send(m.FileRead(request_id=1, handle=1, size=10)))
    event = _one(from_layer)
    assert isinstance(event, Undecoded)
    fresh = AgentConnection(AgentRole.DAEMON, secret=SECRET)
    with pytest.raises(LocalProtocolError, match="HANDSHAKE"):
        fresh.forward(event, 1, channel=1)
    tight = AgentConnection(AgentRole.DAEMON, secret=SECRET, max_frame_size=4)
    tight.state = to_agent.state
    with pytest.raises(LocalProtocolError, match="too big"):
        tight.forward(event, 1, channel=1)


def test_only_requests_and_replies_of_the_protocol_may_be_left_undecoded() -> None:
    with pytest.raises(TypeError):
        LayerConnection(LayerRole.DAEMON, build_id=BUILD, undecoded=[m.Data])
    with pytest.raises(TypeError):
        AgentConnection(AgentRole.DAEMON, secret=SECRET, undecoded=[m.LayerConnect])


def test_an_undecoded_frame_never_shows_its_body() -> None:
    _, _, to_agent, agent = _daemon_sides()
    to_agent.receive_data(
        agent.send(m.EnvReply(request_id=2, env={"DB_PASSWORD": "hunter2-secret"}), 4)
    )
    reply = _one(to_agent)
    assert isinstance(reply, Undecoded)
    assert "hunter2" not in repr(reply) and "hunter2" not in str(reply)
