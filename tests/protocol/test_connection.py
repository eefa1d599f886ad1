"""Handshake, version negotiation and state rules (connection windows are each `Flow`'s)."""

from __future__ import annotations

import pytest

from mirrord.protocol import (
    CLOSED,
    NEED_DATA,
    AgentConnection,
    AgentRole,
    FrameTooLarge,
    InvalidRequest,
    LayerConnection,
    LayerRole,
    LocalProtocolError,
    MalformedFrame,
    Received,
    RemoteProtocolError,
    State,
    UnknownMessage,
    messages,
)
from mirrord.protocol._framing import bytes_frame, encode_frame
from tests.protocol.helpers import BUILD, SECRET, agent_pair, drain, layer_pair


@pytest.mark.parametrize(
    ("daemon_range", "agent_range", "expected"),
    [((1, 1), (1, 1), 1), ((1, 3), (1, 2), 2), ((1, 2), (1, 5), 2), ((2, 4), (1, 3), 3)],
)
def test_negotiation_picks_the_lower_version(
    daemon_range: tuple[int, int], agent_range: tuple[int, int], expected: int
) -> None:
    daemon = AgentConnection(
        AgentRole.DAEMON, secret=SECRET, min_version=daemon_range[0], version=daemon_range[1]
    )
    agent = AgentConnection(
        AgentRole.AGENT, secret=SECRET, min_version=agent_range[0], version=agent_range[1]
    )
    agent.receive_data(daemon.hello())
    drain(agent)
    daemon.receive_data(agent.welcome(agent_version="x", target="pid/1"))
    drain(daemon)
    assert daemon.negotiated_version == agent.negotiated_version == expected
    assert daemon.state is agent.state is State.OPEN


def test_no_common_version_is_refused_with_a_reason() -> None:
    daemon = AgentConnection(AgentRole.DAEMON, secret=SECRET, min_version=3, version=4)
    agent = AgentConnection(AgentRole.AGENT, secret=SECRET, min_version=1, version=2)
    agent.receive_data(daemon.hello())
    with pytest.raises(RemoteProtocolError, match="no common protocol version") as info:
        agent.next_event()
    assert info.value.code == "version_mismatch"
    assert agent.state is State.ERROR
    daemon.receive_data(agent.error_frame(info.value))
    with pytest.raises(RemoteProtocolError, match="refused the handshake: version_mismatch"):
        daemon.next_event()


def test_wrong_secret_gets_nothing() -> None:
    daemon = AgentConnection(AgentRole.DAEMON, secret="wrong")
    agent = AgentConnection(AgentRole.AGENT, secret=SECRET)
    agent.receive_data(daemon.hello())
    with pytest.raises(RemoteProtocolError, match="not authenticated") as info:
        agent.next_event()
    assert info.value.code == "unauthenticated"
    with pytest.raises(LocalProtocolError):
        agent.welcome(agent_version="x", target="y")
    with pytest.raises(LocalProtocolError):
        agent.send(messages.Ok(request_id=1), 1)


def test_requests_before_the_handshake_are_refused() -> None:
    agent = AgentConnection(AgentRole.AGENT, secret=SECRET)
    agent.receive_data(encode_frame([1, messages.FileOpen.KIND, 1, b"/etc/shadow", 0, 0]))
    with pytest.raises(RemoteProtocolError, match="before handshake"):
        agent.next_event()


def test_send_before_handshake_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError, match="handshake first"):
        AgentConnection(AgentRole.DAEMON, secret=SECRET).send(messages.Ping(nonce=1))


def test_layer_build_mismatch_is_refused() -> None:
    layer = LayerConnection(LayerRole.LAYER, build_id="other")
    daemon = LayerConnection(LayerRole.DAEMON, build_id=BUILD)
    daemon.receive_data(layer.hello(session="s", pid=3))
    with pytest.raises(RemoteProtocolError, match="different installs") as info:
        daemon.next_event()
    assert info.value.code == "build_mismatch"


def test_unknown_kind_from_a_newer_peer_is_an_event() -> None:
    _daemon, agent = agent_pair()
    agent.receive_data(encode_frame([4, 99, 17, "new field"]) + encode_frame([4, 150, 18]))
    assert drain(agent) == [
        UnknownMessage(channel=4, kind=99, request_id=17),
        UnknownMessage(channel=4, kind=150, request_id=18),
    ]
    assert agent.state is State.OPEN
    _layer, ldaemon = layer_pair()
    ldaemon.receive_data(encode_frame([299]))
    assert drain(ldaemon) == [UnknownMessage(channel=0, kind=299, request_id=None)]


def test_a_message_of_the_other_protocol_is_malformed() -> None:
    _, agent = agent_pair()
    agent.receive_data(encode_frame([1, messages.LayerConnect.KIND, 1, "tcp", "x", 1]))
    with pytest.raises(MalformedFrame, match="LayerConnect"):
        agent.next_event()


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"a": 1}, "non-empty array"),
        ([], "non-empty array"),
        ([1], r"\[channel, kind"),
        (["x", 2], "bad channel"),
        ([-1, 2], "bad channel"),
        ([1, "kind"], "bad message kind"),
        ([1, True], "bad message kind"),
        ([1, messages.FileOpen.KIND, 1], "needs"),
        ([1, messages.FileOpen.KIND, 1, "/str-not-bytes", 0, 0], "FileOpen.path"),
        ([1, messages.Ok.KIND, 2**70], "FileOpen|Ok|out of range|int"),
        ([1, messages.Connect.KIND, 1, 2, "sctp", "a", 1], "sctp"),
        ([1, messages.FileRead.KIND, 1, 2, 10**9], "size"),
    ],
)
def test_malformed_frames_are_protocol_errors(item: object, match: str) -> None:
    _, agent = agent_pair()
    agent.receive_data(encode_frame(item))
    with pytest.raises(MalformedFrame, match=match):
        agent.next_event()
    assert agent.state is State.ERROR
    # An errored connection reads nothing more and keeps reporting the error.
    agent.receive_data(b"\x00" * 10_000_000)
    assert agent._decoder.buffered < 100
    with pytest.raises(MalformedFrame):
        agent.next_event()


def test_invalid_cbor_is_malformed() -> None:
    _, agent = agent_pair()
    agent.receive_data(b"\x00\x00\x00\x02\xff\xff")
    with pytest.raises(MalformedFrame, match="invalid CBOR"):
        agent.next_event()


@pytest.mark.parametrize("size", [16, 70_000])  # cbor2's path, the large flat arrays' path
def test_bytes_after_the_frames_item_are_malformed(size: int) -> None:
    _, agent = agent_pair()
    item = encode_frame([1, messages.FileWrite.KIND, 7, 3, b"x" * size])[4:]
    agent.receive_data(len(item + b"junk").to_bytes(4, "big") + item + b"junk")
    with pytest.raises(MalformedFrame, match="4 bytes after the frame's item"):
        agent.next_event()
    assert agent.state is State.ERROR


def test_oversize_frame_refused_from_its_header() -> None:
    _, agent = agent_pair()
    agent.receive_data(b"\x7f\xff\xff\xff")
    with pytest.raises(FrameTooLarge, match="exceeds the limit"):
        agent.next_event()


def test_stream_ending_inside_a_frame() -> None:
    _, agent = agent_pair()
    agent.receive_data(b"\x00\x00\x00\x10abc")
    assert agent.next_event() is NEED_DATA
    agent.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        agent.next_event()


def test_clean_end_of_stream() -> None:
    layer, _ = layer_pair()
    layer.receive_data(b"")
    assert layer.next_event() is CLOSED
    assert layer.state is State.CLOSED


def test_fatal_on_the_control_channel_closes() -> None:
    daemon, agent = agent_pair()
    daemon.receive_data(agent.fatal_frame("target_gone", "the target process exited"))
    event = daemon.next_event()
    assert isinstance(event, Received)
    assert event.message == messages.Fatal(code="target_gone", message="the target process exited")
    assert daemon.state is State.CLOSED


def test_the_stream_leaves_connection_windows_to_each_flow() -> None:
    """Data beyond a connection's window is delivered, as is Data for a connection nobody
    opened: each connection's `Flow` polices its own window, so a peer's overrun costs that
    connection, never the whole stream (docs/relay.md, step 6)."""
    daemon, agent = agent_pair(initial_window=100)
    connect = messages.Connect(request_id=1, conn_id=2, protocol="tcp", address="a", port=1)
    agent.receive_data(daemon.send(connect, 1))
    drain(agent)
    agent.receive_data(daemon.send(messages.Data(conn_id=2, data=b"y" * 101), 1))
    agent.receive_data(encode_frame([1, messages.Data.KIND, 4, b"late"]))
    assert len(drain(agent)) == 2
    assert agent.state is State.OPEN


def test_handshake_messages_only_once() -> None:
    daemon, agent = agent_pair()
    agent.receive_data(daemon._frame(0, messages.Hello(version=1, min_version=1, secret=SECRET)))
    with pytest.raises(RemoteProtocolError, match="after the handshake"):
        agent.next_event()
    with pytest.raises(LocalProtocolError):
        daemon.hello()


def test_channel_open_on_control_channel_is_refused() -> None:
    daemon, agent = agent_pair()
    agent.receive_data(daemon._frame(0, messages.ChannelOpen(pid=1)))
    with pytest.raises(RemoteProtocolError, match="control channel"):
        agent.next_event()


def test_a_request_with_invalid_fields_is_an_event_only_where_asked_for() -> None:
    daemon = AgentConnection(AgentRole.DAEMON, secret=SECRET)
    agent = AgentConnection(AgentRole.AGENT, secret=SECRET, invalid_requests_as_events=True)
    agent.receive_data(daemon.hello("test"))
    drain(agent)
    chown, seek, data = messages.Chown.KIND, messages.FileSeek.KIND, messages.Data.KIND
    agent.receive_data(
        encode_frame([3, chown, 7, None, 1, 2**64])  # uid beyond 64 bits
        + encode_frame([3, seek, 8, 1, "far", 0])  # an offset of the wrong type
    )
    first, second = agent.next_event(), agent.next_event()
    assert isinstance(first, InvalidRequest) and isinstance(second, InvalidRequest)
    assert agent.next_event() is NEED_DATA
    assert (first.channel, first.request_id, first.errno) == (3, 7, 75)  # EOVERFLOW
    assert (second.request_id, second.errno) == (8, 22)  # EINVAL
    assert "Chown" in first.reason and agent.state is State.OPEN
    # Not a request (no reply to give): the frame is malformed, as everywhere else.
    agent.receive_data(encode_frame([3, data, 5, "not bytes"]))
    with pytest.raises(MalformedFrame):
        agent.next_event()
    # Without the option (the daemon's side), any invalid frame is malformed.
    _daemon, plain = agent_pair()
    plain.receive_data(encode_frame([3, chown, 7, None, 1, 2**64]))
    with pytest.raises(MalformedFrame):
        plain.next_event()


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65535, 65536, 1024 * 1024])
@pytest.mark.parametrize("head", [[0, 0, 0], [23, 24, 255], [256, 65535, 65536], [2**32, 1, 7]])
def test_a_bytes_frame_is_what_the_cbor_encoder_makes(head: list[int], size: int) -> None:
    """`bytes_frame` (the one-copy encoding of connection `Data`) is byte for byte the
    encoder's, so the peer's full decoder reads it as any frame."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert bytes_frame(head, data) == encode_frame([*head, data])


def test_data_goes_out_as_the_encoder_would_frame_it() -> None:
    daemon, agent = agent_pair()
    msg = messages.Data(conn_id=6, data=b"z" * 70000)
    frame = daemon.send(msg, 3)
    assert frame == encode_frame([3, *msg.to_wire()])
    agent.receive_data(frame)
    assert drain(agent) == [Received(channel=3, message=msg)]


@pytest.mark.parametrize("size", [0, 1000, 64 * 1024 - 1, 64 * 1024, 256 * 1024])
def test_send_parts_is_send_with_a_large_datas_bytes_uncopied(size: int) -> None:
    daemon, agent = agent_pair()
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    msg = messages.Data(conn_id=3, data=data)
    parts = agent.send_parts(msg, 5)
    joined = parts if isinstance(parts, bytes) else b"".join(parts)
    assert joined == agent.send(msg, 5)
    if size >= 64 * 1024:
        assert isinstance(parts, list) and parts[-1] is data  # the relay's bytes, not a copy
    else:
        assert isinstance(parts, bytes)
    daemon.receive_data(joined)
    assert daemon.next_event() == Received(channel=5, message=msg)


@pytest.mark.parametrize("size", [0, 1000, 64 * 1024 - 1, 64 * 1024, 1024 * 1024 + 3])
def test_a_large_file_datas_bytes_go_out_uncopied_as_the_encoder_frames_them(size: int) -> None:
    """The agent's reply to a large read is sent as parts with its data uncopied, byte for byte
    the encoder's frame (a daemon's FileData to a layer is the encoder's frame too)."""
    data = bytes(range(256)) * (size // 256) + b"y" * (size % 256)
    msg = messages.FileData(request_id=77, data=data)
    daemon, agent = agent_pair()
    parts = agent.send_parts(msg, 5)
    joined = parts if isinstance(parts, bytes) else b"".join(parts)
    assert joined == encode_frame([5, *msg.to_wire()])
    if size >= 64 * 1024:
        assert isinstance(parts, list) and parts[-1] is data  # os.pread's bytes, no copy
    else:
        assert isinstance(parts, bytes)
    daemon.receive_data(joined)
    assert drain(daemon) == [Received(channel=5, message=msg)]
    layer, layer_daemon = layer_pair()
    frame = layer_daemon.send(msg)
    assert frame == encode_frame(msg.to_wire())
    layer.receive_data(frame)
    [event] = drain(layer)
    assert isinstance(event, Received) and event.message == msg
