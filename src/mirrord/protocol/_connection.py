"""Sans-IO connection objects for both protocols: bytes in, events out, events to bytes.

Theory of operation
-------------------
A connection object owns one byte stream's protocol state and nothing else: no sockets, no
event loop. Its user feeds received bytes with `receive_data()`, pulls events with
`next_event()` until it returns `NEED_DATA`, and turns messages into bytes with `send()`.

State machine (one table, `_TRANSITIONS`): HANDSHAKE -> OPEN -> CLOSED, and any state -> ERROR
when the peer violates the protocol. In ERROR and CLOSED, `receive_data` discards input so a
broken peer cannot grow our memory; `next_event` keeps raising the original error / returns
`CLOSED`.

Agent protocol (daemon <-> agent): every frame is `[channel, kind, *fields]`. Channel 0 is the
control channel (handshake, Ping, Fatal); every other channel is one layer process. The daemon
opens channels with `ChannelOpen` and picks even connection ids; the agent picks odd ones.
Connection data is flow-controlled by a credit window per (channel, conn_id): a sender may have
at most the window's worth of `Data` bytes not yet credited back with `Credit`. That window is
each connection's own `Flow` (`_flow.py`), not this object's: a peer overrunning it breaks
that connection only, never the stream; this object only carries `initial_window`.

Layer protocol (layer <-> daemon): every frame is `[kind, *fields]`, no channels and no credit
(the connections it hands off are real local sockets).

Forwarding undecoded: a connection built with `undecoded=` some kinds returns their frames
(once OPEN) as `Undecoded` events, with only the frame's head read (`_framing.read_head`:
channel, kind, request id); `decode()` turns one into its ordinary event when it is not
forwarded after all, and the other protocol's connection `forward()`s it under a new head,
passing its body through as bytes. The daemon forwards file, env and DNS requests (kinds 1-99,
the same message in both protocols) and their replies this way; whoever receives such a
frame decodes it in full (the agent, the layer), so the daemon's not decoding it trusts the
layer no more than before: the agent answers a forwarded request it cannot decode with an
`InvalidRequest` event (`invalid_requests_as_events`), costing that request only.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Final

from mirrord.protocol._base import INT64_MAX, Message, Registry
from mirrord.protocol._exceptions import (
    BuildMismatch,
    LocalProtocolError,
    MalformedFrame,
    ProtocolError,
    RemoteProtocolError,
    Unauthenticated,
    VersionMismatch,
)
from mirrord.protocol._framing import (
    MAX_FRAME_SIZE,
    FrameDecoder,
    bytes_frame_head,
    bytes_frame_parts,
    decode_payload,
    encode_frame,
    frame_parts_with_head,
    read_head,
)
from mirrord.protocol.messages import (
    AGENT_KINDS,
    LAYER_KINDS,
    SHARED_KINDS,
    ChannelClose,
    ChannelOpen,
    Data,
    Fatal,
    FileData,
    Hello,
    LayerHello,
    LayerWelcome,
    Reply,
    Request,
    Welcome,
)

__all__ = [
    "AGENT_PROTOCOL_VERSION",
    "AGENT_REGISTRY",
    "CLOSED",
    "CONTROL_CHANNEL",
    "INITIAL_WINDOW",
    "LAYER_REGISTRY",
    "MIN_AGENT_PROTOCOL_VERSION",
    "NEED_DATA",
    "AgentConnection",
    "AgentRole",
    "InvalidRequest",
    "LayerConnection",
    "LayerRole",
    "Received",
    "State",
    "Undecoded",
    "UnknownMessage",
]

AGENT_PROTOCOL_VERSION: Final = 1
MIN_AGENT_PROTOCOL_VERSION: Final = 1
CONTROL_CHANNEL: Final = 0
INITIAL_WINDOW: Final = 1024 * 1024

AGENT_REGISTRY = Registry("agent protocol", [*SHARED_KINDS, *AGENT_KINDS])
LAYER_REGISTRY = Registry("layer protocol", [*SHARED_KINDS, *LAYER_KINDS])
_ALL_KNOWN = Registry("any protocol", [*SHARED_KINDS, *AGENT_KINDS, *LAYER_KINDS])


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
CLOSED: Final = _Sentinel("CLOSED")


class State(enum.Enum):
    HANDSHAKE = "HANDSHAKE"
    OPEN = "OPEN"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


# Rule 1: every state change goes through this table.
_TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.HANDSHAKE: frozenset({State.OPEN, State.CLOSED, State.ERROR}),
    State.OPEN: frozenset({State.CLOSED, State.ERROR}),
    State.CLOSED: frozenset({State.CLOSED, State.ERROR}),
    State.ERROR: frozenset({State.ERROR}),
}


class AgentRole(enum.Enum):
    DAEMON = "daemon"
    AGENT = "agent"


class LayerRole(enum.Enum):
    LAYER = "layer"
    DAEMON = "daemon"


@dataclass(frozen=True, slots=True)
class Received:
    """A message from the peer; `channel` is 0 in the layer protocol."""

    channel: int
    message: Message


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message kind this build does not know (a newer peer). If it looks like a request
    (`request_id` set), answer it with `ErrorReply(errno=ENOSYS)`; otherwise ignore it."""

    channel: int
    kind: int
    request_id: int | None


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """A request of a known kind whose fields are invalid (a NUL-free check is the agent's;
    this is the wire: a wrong type, an integer beyond 64 bits, a size out of its range).
    Only a connection built with `invalid_requests_as_events=True` returns it, and only when
    the frame carries a usable request id: answer it with `ErrorReply(errno=EINVAL or
    EOVERFLOW)`; the connection goes on. Otherwise such a frame is `MalformedFrame`."""

    channel: int
    kind: int
    request_id: int
    reason: str

    @property
    def errno(self) -> int:
        return _EOVERFLOW if "out of range" in self.reason else _EINVAL


_EINVAL: Final = 22
_EOVERFLOW: Final = 75


@dataclass(frozen=True, slots=True)
class Undecoded:
    """A frame of one of the kinds the connection was told to leave undecoded (`undecoded=`),
    with its head read: channel (0 in the layer protocol), kind, request id. `payload` is the
    whole frame after its length; its items after the head (`head_items` of `items`) start at
    `body`. Forward it with the other connection's `forward()`, or `decode()` it."""

    channel: int
    kind: int
    request_id: int
    items: int
    head_items: int
    # never in a repr: an EnvReply's body holds the target's environment, a FileData a file
    payload: bytes = field(repr=False)
    body: int


Event = Received | UnknownMessage | InvalidRequest | Undecoded


def _bytes_item(msg: Message) -> tuple[list[int], bytes] | None:
    """(the unsigned integers before it, the byte string) of a message that is those and one
    byte string, framed by `bytes_frame_parts`: a relay's `Data`, a `FileData`. None for any
    other message: the CBOR encoder frames it."""
    if type(msg) is Data and msg.conn_id >= 0:
        return [Data.KIND, msg.conn_id], msg.data
    if type(msg) is FileData and msg.request_id >= 0:
        return [FileData.KIND, msg.request_id], msg.data
    return None


class _Connection:
    """What both protocols share: framing, the state table, error latching."""

    _registry: Registry
    _has_channels: bool

    def __init__(
        self, role: enum.Enum, max_frame_size: int, undecoded: Iterable[type[Message]] = ()
    ) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self._decoder = FrameDecoder(max_frame_size)
        self._error: ProtocolError | None = None
        self._invalid_requests_as_events = False
        self._undecoded = frozenset(cls.KIND for cls in undecoded)
        for cls in undecoded:
            if cls not in self._registry or not issubclass(cls, Request | Reply):
                raise TypeError(f"{cls.__name__}: not a {self._registry.name} request or reply")
        self._head_items = 3 if self._has_channels else 2

    def __repr__(self) -> str:
        return f"<{type(self).__name__} role={self.role.value} state={self.state.value}>"

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise LocalProtocolError(
                f"{type(self).__name__} ({self.role.value}): illegal transition "
                f"{self.state.value} -> {new.value}"
            )
        self.state = new

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._error = exc
        self._set_state(State.ERROR)
        return exc

    def receive_data(self, data: bytes | memoryview) -> None:
        """Bytes from the peer. `b""` is the end of the stream. A slice of `receive_buffer()`
        counts as received where it is (no copy)."""
        if self.state in (State.ERROR, State.CLOSED):
            return  # nothing more is read: a broken peer cannot grow our memory
        if not data:
            self._set_state(State.CLOSED)
            return
        self._decoder.receive_data(data)

    def large_prefix(self) -> tuple[bytes, int] | None:
        """The large frame being received, while it is incomplete: (its first bytes, the
        bytes still to come); see `FrameDecoder.large_prefix`."""
        return self._decoder.large_prefix()

    @property
    def large_frames(self) -> int:
        """Large frames begun so far (`large_prefix` of the next one is another frame)."""
        return self._decoder.large_frames

    def take_large(self) -> tuple[bytes, int]:
        """Give up the incomplete large frame (`FrameDecoder.take_large`): its payload so
        far and the bytes still to come, which the caller takes from the stream itself."""
        return self._decoder.take_large()

    def receive_buffer(self) -> memoryview | None:
        """Where the next received bytes may go directly, when a large frame is being
        collected (`FrameDecoder.free_space`): a reader receives into it and passes the filled
        slice to `receive_data`. None: pass what was read."""
        if self.state in (State.ERROR, State.CLOSED):
            return None
        return self._decoder.free_space()

    def next_event(self) -> Event | _Sentinel:
        """The next event, `NEED_DATA`, or `CLOSED`. Raises `RemoteProtocolError` (and stays in
        ERROR) when the peer broke the protocol."""
        if self._error is not None:
            raise self._error
        if self.state is State.CLOSED and self._decoder.buffered == 0:
            return CLOSED
        try:
            payload = self._decoder.next_payload()
            if payload is None:
                if self.state is State.CLOSED:
                    raise RemoteProtocolError(
                        f"stream ended inside a frame ({self._decoder.buffered} bytes left)"
                    )
                return NEED_DATA
            if self._undecoded and self.state is State.OPEN:
                undecoded = self._undecoded_frame(payload)
                if undecoded is not None:
                    return undecoded
            return self._event_of(payload)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None

    def decode(self, frame: Undecoded) -> Event:
        """The ordinary event of an `Undecoded` frame (one that is not forwarded after all)."""
        if self._error is not None:
            raise self._error
        try:
            return self._event_of(frame.payload)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from None

    def forward(
        self,
        frame: Undecoded,
        request_id: int,
        channel: int = CONTROL_CHANNEL,
        tail: Sequence[Sized] = (),
    ) -> bytes | list[Any]:
        """`frame` (undecoded by the other protocol's connection) as a frame of this one, under
        `request_id` (and `channel`, agent protocol): its body goes through as bytes, uncopied
        when it is large (then the frame is a list of parts: `frame_parts_with_head`).
        `tail`: the body's last bytes, held elsewhere (`frame.payload` has only the ones
        before them: a large frame taken from the stream with `take_large`), parts of their
        own.
        `LocalProtocolError` if it may not be sent now or does not fit in a frame."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"forward() in state {self.state.value}")
        if not self._registry.knows(frame.kind):
            raise LocalProtocolError(f"kind {frame.kind} is not a {self._registry.name} message")
        head = [channel, frame.kind, request_id] if self._has_channels else [frame.kind, request_id]
        body = memoryview(frame.payload)[frame.body :]
        out = frame_parts_with_head(head, frame.items - frame.head_items + len(head), body, tail)
        size = len(out) if isinstance(out, bytes) else sum(len(part) for part in out)
        if size - 4 > self._decoder_limit:
            raise LocalProtocolError(f"kind {frame.kind}: frame of {size} bytes too big")
        return out

    def _undecoded_frame(self, payload: bytes) -> Undecoded | None:
        head = read_head(payload, self._head_items)
        if head is None:
            return None
        ints, items, body = head
        if self._has_channels:
            channel, kind, rid = ints
            if channel == CONTROL_CHANNEL or channel >= 2**32:
                return None
        else:
            channel, (kind, rid) = 0, ints
        if kind not in self._undecoded:
            return None
        return Undecoded(
            channel=channel,
            kind=kind,
            request_id=rid,
            items=items,
            head_items=self._head_items,
            payload=payload,
            body=body,
        )

    def _event_of(self, payload: bytes) -> Event:
        try:
            item = decode_payload(payload)
        except MalformedFrame as exc:
            invalid = self._invalid_body(payload, exc)
            if invalid is None:
                raise
            return invalid
        return self._event_from(item)

    def _invalid_body(self, payload: bytes, exc: MalformedFrame) -> InvalidRequest | None:
        """A request whose head is sound but whose body is not CBOR (forwarded undecoded by the
        daemon): an `InvalidRequest` for that request, when this connection answers those."""
        if not self._invalid_requests_as_events or self.state is not State.OPEN:
            return None
        head = read_head(payload, self._head_items)
        if head is None:
            return None
        ints = head[0]
        channel, kind, rid = ints if self._has_channels else (0, *ints)
        if (
            channel >= 2**32
            or not self._registry.knows(kind)
            or not issubclass(self._registry.message_class(kind), Request)
        ):
            return None
        return InvalidRequest(channel=channel, kind=kind, request_id=rid, reason=exc.message)

    def _event_from(self, item: Any) -> Event:
        if not isinstance(item, list) or not item:
            raise MalformedFrame(f"a frame must hold a non-empty array, got {type(item).__name__}")
        if self._has_channels:
            if len(item) < 2:
                raise MalformedFrame("an agent frame must hold [channel, kind, ...]")
            channel, kind, fields = item[0], item[1], item[2:]
            if (
                isinstance(channel, bool)
                or not isinstance(channel, int)
                or not 0 <= channel < 2**32
            ):
                raise MalformedFrame(f"bad channel {channel!r}")
        else:
            channel, kind, fields = 0, item[0], item[1:]
        if isinstance(kind, bool) or not isinstance(kind, int):
            raise MalformedFrame(f"bad message kind {kind!r}")
        if not self._registry.knows(kind):
            if _ALL_KNOWN.knows(kind):
                raise MalformedFrame(
                    f"{_ALL_KNOWN.decode_name(kind)} (kind {kind}) is not a {self._registry.name} "
                    "message"
                )
            rid = fields[0] if fields and type(fields[0]) is int else None
            if self.state is not State.OPEN:
                raise MalformedFrame(f"unknown message kind {kind} during the handshake")
            return UnknownMessage(channel=channel, kind=kind, request_id=rid)
        try:
            msg = self._registry.decode(kind, fields)
        except MalformedFrame as exc:
            rid = fields[0] if fields and type(fields[0]) is int else None
            if (
                self._invalid_requests_as_events
                and self.state is State.OPEN
                and rid is not None
                and 0 <= rid <= INT64_MAX
                and issubclass(self._registry.message_class(kind), Request)
            ):
                return InvalidRequest(
                    channel=channel, kind=kind, request_id=rid, reason=exc.message
                )
            raise
        self._check_received(channel, msg)
        return Received(channel=channel, message=msg)

    def _check_received(self, channel: int, msg: Message) -> None:
        raise NotImplementedError

    def _frame(self, channel: int, msg: Message) -> bytes:
        frame = self._frame_parts(channel, msg)
        return frame if isinstance(frame, bytes) else b"".join(frame)

    def _frame_parts(self, channel: int, msg: Message) -> bytes | list[bytes | memoryview]:
        if type(msg) not in self._registry:
            raise LocalProtocolError(f"{type(msg).__name__} is not a {self._registry.name} message")
        frame: bytes | list[bytes | memoryview]
        bulk = _bytes_item(msg)
        if bulk is not None:
            # a relay's or a large read's bytes: a part of their own when large (not copied:
            # os.pread's bytes go to the daemon as they are), else copied once
            head, data = bulk
            frame = bytes_frame_parts([channel, *head] if self._has_channels else head, data)
            size = len(frame) if isinstance(frame, bytes) else sum(map(len, frame))
        else:
            wire = msg.to_wire()
            frame = encode_frame([channel, *wire] if self._has_channels else wire)
            size = len(frame)
        if size - 4 > self._decoder_limit:
            raise LocalProtocolError(f"{type(msg).__name__} frame of {size} bytes too big")
        return frame

    @property
    def _decoder_limit(self) -> int:
        return self._decoder._max_frame_size

    def fatal_frame(self, code: str, message: str, channel: int = CONTROL_CHANNEL) -> bytes:
        """A Fatal frame to send before closing; allowed in any state. On the control channel
        (or in the layer protocol) the connection is CLOSED afterwards."""
        frame = self._frame(channel, Fatal(code=code, message=message))
        if channel == CONTROL_CHANNEL and self.state is not State.ERROR:
            self._set_state(State.CLOSED)
        return frame

    def error_frame(self, exc: ProtocolError) -> bytes:
        """The Fatal frame that tells the peer why we are closing after `exc`."""
        return self._frame(CONTROL_CHANNEL, Fatal(code=exc.code, message=exc.message))


class AgentConnection(_Connection):
    """One daemon <-> agent stream.

    The daemon calls `hello()` first and waits for `Welcome`; the agent receives `Hello`
    (secret and versions are checked here), then calls `welcome()`.
    """

    _registry = AGENT_REGISTRY
    _has_channels = True

    def __init__(
        self,
        role: AgentRole,
        *,
        secret: str,
        version: int = AGENT_PROTOCOL_VERSION,
        min_version: int = MIN_AGENT_PROTOCOL_VERSION,
        features: list[str] | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
        initial_window: int = INITIAL_WINDOW,
        invalid_requests_as_events: bool = False,
        undecoded: Iterable[type[Message]] = (),
    ) -> None:
        super().__init__(role, max_frame_size, undecoded)
        # The agent answers a request with invalid fields (`InvalidRequest`) instead of
        # closing the whole daemon connection: the daemon forwards layer requests undecoded,
        # so one process's bad request would otherwise cost every session on it.
        self._invalid_requests_as_events = invalid_requests_as_events
        self._secret = secret
        self.version = version
        self.min_version = min_version
        self.features = list(features or [])
        self.negotiated_version: int | None = None
        self.peer_features: list[str] = []
        # each connection's credit window at both ends starts here (its `Flow` keeps it)
        self.initial_window = initial_window

    def __repr__(self) -> str:
        return (
            f"<AgentConnection role={self.role.value} state={self.state.value} "
            f"version={self.negotiated_version}>"
        )

    # -- handshake

    def hello(self, client: str = "") -> bytes:
        if self.role is not AgentRole.DAEMON or self.state is not State.HANDSHAKE:
            raise LocalProtocolError(f"hello() by the {self.role.value} in {self.state.value}")
        return self._frame(
            CONTROL_CHANNEL,
            Hello(
                version=self.version,
                min_version=self.min_version,
                secret=self._secret,
                client=client,
                features=self.features,
            ),
        )

    def welcome(self, *, agent_version: str, target: str) -> bytes:
        if self.role is not AgentRole.AGENT or self.negotiated_version is None:
            raise LocalProtocolError("welcome() before a valid Hello was received")
        return self._frame(
            CONTROL_CHANNEL,
            Welcome(
                version=self.negotiated_version,
                agent_version=agent_version,
                target=target,
                features=self.features,
            ),
        )

    def _check_received(self, channel: int, msg: Message) -> None:
        if self.state is State.HANDSHAKE:
            self._check_handshake(channel, msg)
            return
        if isinstance(msg, Hello | Welcome):
            raise RemoteProtocolError(f"{type(msg).__name__} after the handshake")
        if isinstance(msg, ChannelOpen | ChannelClose) and channel == CONTROL_CHANNEL:
            raise RemoteProtocolError(f"{type(msg).__name__} on the control channel")
        if isinstance(msg, Fatal) and channel == CONTROL_CHANNEL:
            self._set_state(State.CLOSED)

    def _check_handshake(self, channel: int, msg: Message) -> None:
        if isinstance(msg, Fatal):
            raise RemoteProtocolError(f"peer refused the handshake: {msg.code}: {msg.message}")
        if channel != CONTROL_CHANNEL:
            raise RemoteProtocolError(f"{type(msg).__name__} on channel {channel} before handshake")
        if self.role is AgentRole.AGENT:
            if not isinstance(msg, Hello):
                raise RemoteProtocolError(f"expected Hello first, got {type(msg).__name__}")
            if not hmac.compare_digest(msg.secret.encode(), self._secret.encode()):
                raise Unauthenticated
            version = min(msg.version, self.version)
            if version < max(msg.min_version, self.min_version):
                raise VersionMismatch(
                    f"no common protocol version: peer speaks {msg.min_version}..{msg.version}, "
                    f"we speak {self.min_version}..{self.version}"
                )
            self.negotiated_version = version
            self.peer_features = list(msg.features)
        else:
            if not isinstance(msg, Welcome):
                raise RemoteProtocolError(f"expected Welcome first, got {type(msg).__name__}")
            if not self.min_version <= msg.version <= self.version:
                raise RemoteProtocolError(
                    f"agent chose protocol version {msg.version}, outside our "
                    f"{self.min_version}..{self.version}"
                )
            self.negotiated_version = msg.version
            self.peer_features = list(msg.features)
        self._set_state(State.OPEN)

    def statistics(self) -> dict[str, int]:
        return {"buffered": self._decoder.buffered}

    # -- sending

    def send(self, msg: Message, channel: int = CONTROL_CHANNEL) -> bytes:
        frame = self.send_parts(msg, channel)
        return frame if isinstance(frame, bytes) else b"".join(frame)

    def file_data_parts(self, request_id: int, data: list[Any], channel: int) -> list[Any]:
        """The frame of a `FileData` on `channel` whose data is the parts `data` (any sized
        parts a writer takes: bytes, a `mirrord._splice.PipePart`), as its head then them."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"send(FileData) in state {self.state.value}")
        size = sum(len(part) for part in data)
        if size + 64 > self._decoder_limit:
            raise LocalProtocolError(f"FileData of {size} bytes too big")
        return [bytes_frame_head([channel, FileData.KIND, request_id], size), *data]

    def send_parts(
        self, msg: Message, channel: int = CONTROL_CHANNEL
    ) -> bytes | list[bytes | memoryview]:
        """`send()`'s frame, as parts when it carries a large `Data` (its bytes uncopied, for a
        writer that takes a list of parts: `mirrord._frames.FrameWriter`)."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(
                f"send({type(msg).__name__}) in state {self.state.value}; handshake first"
            )
        if isinstance(msg, Hello | Welcome):
            raise LocalProtocolError(f"{type(msg).__name__} is sent by hello()/welcome()")
        return self._frame_parts(channel, msg)


class LayerConnection(_Connection):
    """One layer <-> daemon unix-socket stream. The layer sends `LayerHello` (via `hello()`);
    the daemon checks the build id on receipt and answers with `welcome()`."""

    _registry = LAYER_REGISTRY
    _has_channels = False

    def __init__(
        self,
        role: LayerRole,
        *,
        build_id: str,
        max_frame_size: int = MAX_FRAME_SIZE,
        undecoded: Iterable[type[Message]] = (),
    ) -> None:
        super().__init__(role, max_frame_size, undecoded)
        self.build_id = build_id
        self.peer_hello: LayerHello | None = None

    def hello(
        self, *, session: str, pid: int, parent_pid: int | None = None, exe: bytes = b""
    ) -> bytes:
        if self.role is not LayerRole.LAYER or self.state is not State.HANDSHAKE:
            raise LocalProtocolError(f"hello() by the {self.role.value} in {self.state.value}")
        return self._frame(
            0,
            LayerHello(
                build_id=self.build_id, session=session, pid=pid, parent_pid=parent_pid, exe=exe
            ),
        )

    def welcome(self, process: int) -> bytes:
        if self.role is not LayerRole.DAEMON or self.peer_hello is None:
            raise LocalProtocolError("welcome() before a valid LayerHello")
        frame = self._frame(0, LayerWelcome(process=process))
        self._set_state(State.OPEN)
        return frame

    def _check_received(self, channel: int, msg: Message) -> None:
        del channel
        if isinstance(msg, Fatal):
            if self.state is State.HANDSHAKE:
                raise RemoteProtocolError(f"peer refused the handshake: {msg.code}: {msg.message}")
            self._set_state(State.CLOSED)
            return
        if self.state is State.HANDSHAKE:
            if self.role is LayerRole.DAEMON:
                if not isinstance(msg, LayerHello) or self.peer_hello is not None:
                    raise RemoteProtocolError(
                        f"expected LayerHello first, got {type(msg).__name__}"
                    )
                if msg.build_id != self.build_id:
                    raise BuildMismatch(
                        f"layer build {msg.build_id} does not match daemon build {self.build_id}: "
                        "the layer library and mirrordd come from different installs"
                    )
                self.peer_hello = msg
            else:
                if not isinstance(msg, LayerWelcome):
                    raise RemoteProtocolError(f"expected LayerWelcome, got {type(msg).__name__}")
                self._set_state(State.OPEN)
            return
        if isinstance(msg, LayerHello | LayerWelcome):
            raise RemoteProtocolError(f"{type(msg).__name__} after the handshake")

    def send(self, msg: Message) -> bytes:
        if self.state is not State.OPEN and not isinstance(msg, Fatal):
            raise LocalProtocolError(
                f"send({type(msg).__name__}) in state {self.state.value}; handshake first"
            )
        if isinstance(msg, LayerHello | LayerWelcome):
            raise LocalProtocolError(f"{type(msg).__name__} is sent by hello()/welcome()")
        return self._frame(0, msg)
