"""Every message kind round-trips through both protocols' codecs, split at every byte."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.protocol import (
    AGENT_REGISTRY,
    LAYER_REGISTRY,
    AgentConnection,
    AgentRole,
    LayerConnection,
    LayerRole,
    LocalProtocolError,
    Message,
    Received,
    messages,
)
from mirrord.protocol._framing import encode_frame
from tests.protocol.helpers import agent_pair, drain, layer_pair
from tests.protocol.strategies import message_strategy

_HANDSHAKE = (messages.Hello, messages.Welcome, messages.LayerHello, messages.LayerWelcome)
AGENT_KINDS = [c for c in AGENT_REGISTRY.kinds() if c not in _HANDSHAKE]
LAYER_KINDS = [c for c in LAYER_REGISTRY.kinds() if c not in _HANDSHAKE]


def test_kind_ids_are_unique_and_grouped() -> None:
    kinds = [c.KIND for c in AGENT_REGISTRY.kinds()] + [
        c.KIND for c in LAYER_REGISTRY.kinds() if c.KIND >= 200
    ]
    assert len(kinds) == len(set(kinds))
    for cls in LAYER_REGISTRY.kinds():
        assert cls.KIND < 100 or cls.KIND >= 200
    for cls in AGENT_REGISTRY.kinds():
        assert cls.KIND < 200


def test_field_types_are_the_annotations_evaluated() -> None:
    # `message` evaluates each annotation text once per module instead of `get_type_hints`
    # per class: the types it validates against are still exactly those
    classes = set(AGENT_REGISTRY.kinds()) | set(LAYER_REGISTRY.kinds())
    assert len(classes) > 50
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields = dict(cls._FIELDS)
        assert fields == {name: hints[name] for name in fields}, cls.__name__
        assert [name for name, _ in cls._FIELDS] == [n for n in hints if n in fields]


@pytest.mark.parametrize("cls", AGENT_KINDS, ids=lambda c: c.__name__)
def test_agent_protocol_round_trip(cls: type[Message]) -> None:
    @settings(max_examples=40, deadline=None)
    @given(msg=message_strategy(cls), channel=st.integers(0, 2**32 - 1), daemon_sends=st.booleans())
    def check(msg: Message, channel: int, daemon_sends: bool) -> None:
        if isinstance(msg, messages.ChannelOpen | messages.ChannelClose) and channel == 0:
            channel = 1
        daemon, agent = agent_pair()
        sender, receiver = (daemon, agent) if daemon_sends else (agent, daemon)
        if isinstance(msg, messages.Data):
            # Data needs an open connection with credit on both ends.
            opener = messages.Connect(
                request_id=1, conn_id=msg.conn_id, protocol="tcp", address="x", port=1
            )
            agent.receive_data(daemon.send(opener, channel))
            drain(agent)
        if isinstance(msg, messages.Fatal) and channel == 0:
            frame = sender.fatal_frame(msg.code, msg.message)
        else:
            frame = sender.send(msg, channel)
        receiver.receive_data(frame)
        events = drain(receiver)
        assert events == [Received(channel=channel, message=msg)]

    check()


@pytest.mark.parametrize("cls", LAYER_KINDS, ids=lambda c: c.__name__)
def test_layer_protocol_round_trip(cls: type[Message]) -> None:
    @settings(max_examples=40, deadline=None)
    @given(msg=message_strategy(cls), layer_sends=st.booleans())
    def check(msg: Message, layer_sends: bool) -> None:
        layer, daemon = layer_pair()
        sender, receiver = (layer, daemon) if layer_sends else (daemon, layer)
        receiver.receive_data(sender.send(msg))
        assert drain(receiver) == [Received(channel=0, message=msg)]

    check()


@given(msgs=st.lists(st.sampled_from(AGENT_KINDS).flatmap(message_strategy), max_size=8))
@settings(max_examples=60, deadline=None)
def test_frames_split_at_every_byte_boundary(msgs: list[Message]) -> None:
    msgs = [m for m in msgs if not isinstance(m, messages.Data | messages.Fatal)]
    daemon, _agent = agent_pair()
    stream = b"".join(daemon.send(m, 7) for m in msgs)
    for cut in range(len(stream) + 1):
        _, receiver = agent_pair()
        # b"" means end of stream, so empty halves are not fed
        if stream[:cut]:
            receiver.receive_data(stream[:cut])
        first = drain(receiver)
        if stream[cut:]:
            receiver.receive_data(stream[cut:])
        rest = drain(receiver)
        assert [e.message for e in first + rest if isinstance(e, Received)] == msgs


def test_one_byte_at_a_time() -> None:
    layer, daemon = layer_pair()
    msg = messages.FileData(request_id=9, data=b"x" * 1000)
    frame = daemon.send(msg)
    for i in range(len(frame)):
        layer.receive_data(frame[i : i + 1])
    assert drain(layer) == [Received(channel=0, message=msg)]


def test_message_validates_when_built() -> None:
    with pytest.raises(LocalProtocolError, match=r"FileOpen\.flags"):
        messages.FileOpen(request_id=1, path=b"/x", flags="0")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="port"):
        messages.Connect(request_id=1, conn_id=2, protocol="tcp", address="x", port=70000)
    with pytest.raises(LocalProtocolError, match="exactly one of path and handle"):
        messages.FileStat(request_id=1)
    with pytest.raises(LocalProtocolError, match="bool"):
        messages.FileStat(request_id=1, path=b"/", follow=1)  # type: ignore[arg-type]


def test_secrets_never_in_repr() -> None:
    hello = messages.Hello(version=1, min_version=1, secret="hunter2")
    env = messages.EnvReply(request_id=1, env={"DB_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(hello)
    assert "hunter2" not in repr(env)
    assert "DB_PASSWORD" not in repr(env)


def test_extra_trailing_fields_from_a_newer_peer_are_ignored() -> None:
    layer, _daemon = layer_pair()
    layer.receive_data(encode_frame([messages.Ok.KIND, 5, "field added later"]))
    assert drain(layer) == [Received(channel=0, message=messages.Ok(request_id=5))]


def test_agent_messages_are_rejected_by_the_layer_codec() -> None:
    with pytest.raises(LocalProtocolError, match="not a layer protocol message"):
        layer_pair()[0].send(messages.Data(conn_id=1, data=b""))
    _ = AgentConnection(AgentRole.DAEMON, secret="s")
    _ = LayerConnection(LayerRole.LAYER, build_id="b")
