"""One relayed connection's flow control, sans-IO: events in, messages and writes out.

Owns: the per-connection state of a relayed TCP connection or UDP association as one end of
the agent protocol sees it (the daemon's relay and the agent's relay are the two ends): the
credit window each way, half-close each way, reset, and a clean close that drains what was
queued before it. Does not own: sockets, tasks, waiting, or the channel tables (the I/O
shell that drives a `Flow` does those), nor the per-stream framing (`AgentConnection`).

Theory of operation
-------------------
Two byte paths meet here. *Inbound*: the peer's `Data` / `Shutdown` are queued (`peer_data`,
`peer_shutdown`) and the shell writes them to its socket (`take_write` then `wrote` /
`wrote_eof`); `wrote` returns the `Credit` for what the socket took, so the peer may have at
most the window of bytes not yet written here. *Outbound*: the shell reads at most
`read_size()` bytes from its socket and hands them to `socket_data`, which returns the `Data`
to send; `socket_eof` returns the `Shutdown`. Every method returns the messages to send to
the peer, in order ("decide synchronously, then act").

States (one table, `_TRANSITIONS`, keyed by state and event as in h11's `_state.py`):

    OPEN --peer Shutdown--> IN_DONE --socket EOF--> BOTH_DONE --queue written--> CLOSED
    OPEN --socket EOF--> OUT_DONE --peer Shutdown--> BOTH_DONE          (sends ConnClose(0))
    any open state --peer ConnClose(0)--> DRAINING --queue + EOF written--> CLOSED
    any open state --peer ConnClose(errno) / socket error / fail / abort--> RESET

A clean `ConnClose(0)` from the peer never drops the `Data` and `Shutdown` it sent before:
they are written first (DRAINING), as a kernel still sends what an app wrote before
`close()`; only reading stops at once. The shell bounds the drain in time and then calls
`abort()`. An event the table does not allow raises `RemoteProtocolError` (the peer's) or
`LocalProtocolError` (ours), naming the state and the event, and the flow goes to ERROR.
In CLOSED, RESET and ERROR every event is absorbed: messages that crossed ours on the wire are
dropped, as are the last reads of a task being cancelled.

Datagram flows (UDP) have no half-close: the peer's `Shutdown` ends the association once the
queued datagrams are written, the socket's end (`socket_eof`: the user app closed it) ends it
at once, and a `ConnClose(0)` drops what is queued (a datagram may be lost on any network).
"""

from __future__ import annotations

import enum
import errno as errno_mod
from collections import deque
from typing import Final

from mirrord.protocol._base import Message
from mirrord.protocol._exceptions import LocalProtocolError, RemoteProtocolError
from mirrord.protocol.messages import CONN_CLOSE_NORMAL, MAX_DATA_CHUNK, ConnClose, Credit, Data
from mirrord.protocol.messages import Shutdown as ShutdownMsg

__all__ = ["MAX_WINDOW", "WRITE_EOF", "Flow", "FlowEvent", "FlowState"]

# The credit window's ceiling (as `AgentConnection` caps it): a peer crediting without end
# cannot overflow the counter.
MAX_WINDOW: Final = 2**31
_INITIAL_WINDOW: Final = 1024 * 1024  # = mirrord.protocol.INITIAL_WINDOW (no import cycle)
# Credit is sent back once this much was written to the socket (see `Flow.wrote`).
CREDIT_BATCH: Final = 64 * 1024


class _Eof:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EOF"


WRITE_EOF: Final = _Eof()
"""`take_write()`'s answer when the socket's write side is to be shut down (`send_eof`)."""


class FlowState(enum.Enum):
    # Every step looks a state and an event up in the tables: Enum's __hash__ is a Python
    # call (the name's hash); members are singletons compared by identity, so identity's
    # hash (in C) is as right. One relayed round trip's Flow work: 4.9 -> 3.9 us.
    __hash__ = object.__hash__

    OPEN = "OPEN"
    IN_DONE = "IN_DONE"  # the peer sent Shutdown: its EOF is queued behind its Data
    OUT_DONE = "OUT_DONE"  # our socket ended: Shutdown sent, the peer may still send
    BOTH_DONE = "BOTH_DONE"  # both half-closed: write what is queued, then ConnClose(0)
    DRAINING = "DRAINING"  # the peer's ConnClose(0): write what is queued, send nothing
    CLOSED = "CLOSED"  # ended cleanly
    RESET = "RESET"  # ended with an errno (either side), or aborted
    ERROR = "ERROR"  # a protocol violation was raised


class FlowEvent(enum.Enum):
    __hash__ = object.__hash__  # as FlowState's

    PEER_DATA = "peer Data"
    PEER_CREDIT = "peer Credit"
    PEER_SHUTDOWN = "peer Shutdown"
    PEER_CLOSE = "peer ConnClose(0)"
    PEER_RESET = "peer ConnClose(errno)"
    SOCKET_DATA = "socket data"
    SOCKET_EOF = "socket EOF"
    SOCKET_ERROR = "socket error"
    WROTE = "wrote"
    WROTE_EOF = "wrote EOF"
    FAIL = "fail"
    ABORT = "abort"


_S = FlowState
_E = FlowEvent
_PEER_EVENTS: Final = frozenset(
    {_E.PEER_DATA, _E.PEER_CREDIT, _E.PEER_SHUTDOWN, _E.PEER_CLOSE, _E.PEER_RESET}
)
_ENDING: Final = {_E.PEER_RESET: _S.RESET, _E.SOCKET_ERROR: _S.RESET, _E.FAIL: _S.RESET}


def _open_state(
    state: FlowState, *, peer_may_send: bool, we_may_send: bool
) -> dict[FlowEvent, FlowState]:
    row: dict[FlowEvent, FlowState] = {
        _E.PEER_CREDIT: state,
        _E.PEER_CLOSE: _S.DRAINING,
        _E.WROTE: state,
        _E.WROTE_EOF: state,
        _E.ABORT: _S.RESET,
        **_ENDING,
    }
    if peer_may_send:
        row[_E.PEER_DATA] = state
        row[_E.PEER_SHUTDOWN] = _S.IN_DONE if state is _S.OPEN else _S.BOTH_DONE
    if we_may_send:
        row[_E.SOCKET_DATA] = state
        row[_E.SOCKET_EOF] = _S.OUT_DONE if state is _S.OPEN else _S.BOTH_DONE
    return row


# Rule 1: every state change goes through this table; a missing (state, event) is illegal.
_TRANSITIONS: Final[dict[FlowState, dict[FlowEvent, FlowState]]] = {
    _S.OPEN: _open_state(_S.OPEN, peer_may_send=True, we_may_send=True),
    _S.IN_DONE: _open_state(_S.IN_DONE, peer_may_send=False, we_may_send=True),
    _S.OUT_DONE: _open_state(_S.OUT_DONE, peer_may_send=True, we_may_send=False),
    _S.BOTH_DONE: _open_state(_S.BOTH_DONE, peer_may_send=False, we_may_send=False),
    _S.DRAINING: {
        # a read that completed as reading was stopped: dropped, the peer is gone
        _E.SOCKET_DATA: _S.DRAINING,
        _E.SOCKET_EOF: _S.DRAINING,
        _E.WROTE: _S.DRAINING,
        _E.WROTE_EOF: _S.DRAINING,
        _E.SOCKET_ERROR: _S.RESET,
        _E.FAIL: _S.RESET,
        _E.ABORT: _S.RESET,
    },
    # terminal: absorb what crossed on the wire and the last reports of cancelled tasks
    _S.CLOSED: dict.fromkeys(FlowEvent, _S.CLOSED),
    _S.RESET: dict.fromkeys(FlowEvent, _S.RESET),
    _S.ERROR: dict.fromkeys(FlowEvent, _S.ERROR),
}
# Datagram flows differ in three places (no half-close; see the module docstring).
_DATAGRAM_TRANSITIONS: Final = {
    (_S.OPEN, _E.PEER_SHUTDOWN): _S.BOTH_DONE,
    (_S.OPEN, _E.SOCKET_EOF): _S.CLOSED,
    (_S.OPEN, _E.PEER_CLOSE): _S.CLOSED,
}
_TERMINAL: Final = frozenset({_S.CLOSED, _S.RESET, _S.ERROR})
_READING: Final = frozenset({_S.OPEN, _S.IN_DONE})


class Flow:
    """The flow control of connection `conn_id`, at one end (daemon or agent).

    `mirror`: the socket's bytes go nowhere (the user app's replies to mirrored traffic): they
    are read without window and dropped, and its EOF sends no Shutdown. `datagram`: a UDP
    association (one Data per datagram, no half-close). `incoming`: a connection the peer
    offered that the user app may never have accepted (`accepted()`); ended from our side
    before the app accepted it or sent a byte, it is closed with ECONNREFUSED so the peer
    (the target's app) may answer instead. `max_chunk`: the largest Data this end sends.
    """

    __slots__ = (
        "_accepted",
        "_close_errno",
        "_credit_batch",
        "_credit_owed",
        "_credit_sent",
        "_inbox",
        "_peer_credited",
        "_queued",
        "_recv_window",
        "_send_window",
        "_socket_sent",
        "_state",
        "_writing",
        "conn_id",
        "datagram",
        "incoming",
        "max_chunk",
        "mirror",
    )

    def __init__(
        self,
        conn_id: int,
        *,
        window: int = _INITIAL_WINDOW,
        max_chunk: int = 64 * 1024,
        mirror: bool = False,
        datagram: bool = False,
        incoming: bool = False,
    ) -> None:
        if not 0 < max_chunk <= MAX_DATA_CHUNK:
            raise ValueError(f"max_chunk must be in 1..{MAX_DATA_CHUNK}, got {max_chunk}")
        self.conn_id = conn_id
        self.max_chunk = max_chunk
        self.mirror = mirror
        self.datagram = datagram
        self.incoming = incoming
        self._state = FlowState.OPEN
        self._send_window = window  # bytes we may still send the peer
        self._recv_window = window  # bytes the peer may still send us
        # Bytes written to the socket and not yet credited to the peer. Credit goes back once
        # this reaches `_credit_batch` (a quarter of the window at most, so the peer's window
        # never runs dry for it), not after every write: a small request/answer exchange is
        # then one Data each way instead of a Data and a Credit each way (half the frames,
        # wake-ups and decodes per stolen HTTP request). The first Credit goes at once (the
        # peer learns that the user app took a byte: `abort`'s ECONNRESET vs ECONNREFUSED);
        # a datagram's at once (a whole datagram must fit the peer's window).
        self._credit_owed = 0
        self._credit_sent = False
        self._credit_batch = 0 if datagram else min(CREDIT_BATCH, window // 4)
        # peer --Data--> _inbox --take_write()--> socket (EOF last, after the peer's Shutdown)
        self._inbox: deque[bytes | memoryview | _Eof] = deque()
        self._queued = 0  # bytes in _inbox
        self._writing = False  # a take_write() not yet answered by wrote()/wrote_eof()
        self._close_errno: int | None = None  # set once terminal
        self._peer_credited = False  # the peer wrote some of our bytes to its socket
        self._socket_sent = False  # our socket gave us at least one byte
        self._accepted = False

    def __repr__(self) -> str:
        return (
            f"<Flow conn={self.conn_id} {self._state.value} send_window={self._send_window} "
            f"recv_window={self._recv_window} queued={self._queued}>"
        )

    # -- what the shell asks ---------------------------------------------------------------

    @property
    def state(self) -> FlowState:
        return self._state

    @property
    def finished(self) -> bool:
        """The flow is over: close the socket (`reset_socket` says how) and forget it."""
        return self._state in _TERMINAL

    @property
    def reading(self) -> bool:
        """The shell should (still) read its socket; when False, stop the reading task."""
        return self._state in _READING

    @property
    def reset_socket(self) -> bool:
        """Close the socket with a reset (SO_LINGER 0): the flow ended with an error, so the
        socket's peer sees what it would see from a broken connection, not a clean end."""
        return self._state in (FlowState.RESET, FlowState.ERROR)

    @property
    def close_errno(self) -> int | None:
        """Why the flow ended (0 clean, else the errno), None while it runs."""
        return self._close_errno

    @property
    def send_window(self) -> int:
        return self._send_window

    @property
    def recv_window(self) -> int:
        return self._recv_window

    @property
    def credit_owed(self) -> int:
        """Bytes written to the socket whose Credit is held back (see `wrote`)."""
        return self._credit_owed

    @property
    def queued(self) -> int:
        """Bytes of the peer's Data not yet written to the socket."""
        return self._queued

    @property
    def write_idle(self) -> bool:
        """Nothing queued nor being written: a write now would not overtake anything (the
        shell may then try a non-blocking write at once and report it with `wrote`)."""
        return not self._inbox and not self._writing

    def read_size(self) -> int:
        """How many bytes the shell may read from its socket now (0: wait for `Credit`, or
        stop reading if `reading` is False). A datagram needs its whole size in the window:
        see `can_send`."""
        if not self.reading:
            return 0
        if self.mirror:
            return self.max_chunk
        return min(self._send_window, self.max_chunk)

    def can_send(self, size: int) -> bool:
        """Whether a datagram of `size` bytes fits the window now."""
        return self.mirror or self._send_window >= size

    def statistics(self) -> dict[str, int | str]:
        return {
            "state": self._state.value,
            "send_window": self._send_window,
            "recv_window": self._recv_window,
            "queued": self._queued,
        }

    # -- the peer's messages ---------------------------------------------------------------

    def receive(self, msg: Message) -> list[Message]:
        """Dispatch one of the peer's connection messages for this `conn_id`."""
        conn_id = getattr(msg, "conn_id", self.conn_id)
        if conn_id != self.conn_id:
            raise LocalProtocolError(f"conn {conn_id}'s {type(msg).__name__} routed to {self!r}")
        if isinstance(msg, Data):
            return self.peer_data(msg.data)
        if isinstance(msg, Credit):
            return self.peer_credit(msg.amount)
        if isinstance(msg, ShutdownMsg):
            return self.peer_shutdown()
        if isinstance(msg, ConnClose):
            return self.peer_close(msg.errno)
        raise LocalProtocolError(f"{type(msg).__name__} is not a connection message")

    def peer_data(self, data: bytes) -> list[Message]:
        if not self._step(FlowEvent.PEER_DATA) or not data:
            return []
        if len(data) > self._recv_window:
            self._error(
                RemoteProtocolError(
                    f"conn {self.conn_id}: Data of {len(data)} bytes exceeds the credit window "
                    f"({self._recv_window} bytes left)"
                )
            )
        self._recv_window -= len(data)
        self._inbox.append(data)
        self._queued += len(data)
        return []

    def peer_credit(self, amount: int) -> list[Message]:
        if self._step(FlowEvent.PEER_CREDIT):
            self._peer_credited = True
            self._send_window = min(self._send_window + amount, MAX_WINDOW)
        return []

    def peer_shutdown(self) -> list[Message]:
        if self._step(FlowEvent.PEER_SHUTDOWN) and not self.datagram:
            self._inbox.append(WRITE_EOF)
        return self._settle()

    def peer_close(self, errno: int = CONN_CLOSE_NORMAL) -> list[Message]:
        if errno != CONN_CLOSE_NORMAL:
            if self._step(FlowEvent.PEER_RESET):
                self._end(errno)
            return []
        before = self._state
        if self._step(FlowEvent.PEER_CLOSE):
            if self._state is FlowState.CLOSED:
                self._end(CONN_CLOSE_NORMAL)  # a datagram flow: nothing to drain
            elif not self.datagram and before in (FlowState.OPEN, FlowState.OUT_DONE):
                self._inbox.append(WRITE_EOF)  # its side is done both ways: EOF after its Data
        return self._settle()

    # -- our socket ------------------------------------------------------------------------

    def socket_data(self, data: bytes) -> list[Message]:
        """Bytes read from the socket (at most `read_size()`): the Data to send."""
        if not self._step(FlowEvent.SOCKET_DATA) or not data:
            return []
        self._socket_sent = True
        if self.mirror or not self.reading:
            return []  # mirrored: the user app's answer goes nowhere
        if len(data) > self._send_window or len(data) > MAX_DATA_CHUNK:
            self._error(
                LocalProtocolError(
                    f"conn {self.conn_id}: {len(data)} bytes read beyond the send window "
                    f"({self._send_window}) or the Data limit"
                )
            )
        self._send_window -= len(data)
        return [Data(conn_id=self.conn_id, data=data)]

    def socket_eof(self) -> list[Message]:
        """The socket's read side ended (a datagram socket: the user app closed it)."""
        before = self._state
        if not self._step(FlowEvent.SOCKET_EOF) or before is FlowState.DRAINING:
            return []
        if self._state is FlowState.CLOSED:  # a datagram flow: no half-close
            self._inbox.clear()
            self._queued = 0
            self._end(CONN_CLOSE_NORMAL)
            return [ConnClose(conn_id=self.conn_id, errno=CONN_CLOSE_NORMAL)]
        out: list[Message] = [] if self.mirror else [ShutdownMsg(conn_id=self.conn_id)]
        return out + self._settle()

    def socket_error(self, errno: int = errno_mod.ECONNRESET) -> list[Message]:
        """Reading or writing the socket failed: the flow is reset (the peer is told)."""
        return self._fail(FlowEvent.SOCKET_ERROR, errno)

    def take_write(self) -> bytes | memoryview | _Eof | None:
        """The next thing to write to the socket (bytes, or `WRITE_EOF` to shut its write side),
        None when there is nothing now. Answer it with `wrote(n)` or `wrote_eof()`."""
        if self._writing:
            raise LocalProtocolError(f"conn {self.conn_id}: take_write() twice without wrote()")
        if not self._inbox or self.finished:
            return None
        self._writing = True
        item = self._inbox.popleft()
        if not isinstance(item, _Eof):
            self._queued -= len(item)
        return item

    def wrote(self, sent: int, rest: bytes | memoryview = b"") -> list[Message]:
        """`sent` bytes of what `take_write()` gave went into the socket; `rest` (what it did
        not take: a memoryview of it spares a copy) is written next. Returns the Credit for them (none once the peer closed)."""
        if not self._writing:
            raise LocalProtocolError(f"conn {self.conn_id}: wrote() without take_write()")
        self._writing = False
        if not self._step(FlowEvent.WROTE):
            return []
        if rest:
            self._inbox.appendleft(rest)
            self._queued += len(rest)
        out: list[Message] = []
        if sent and self._state is not FlowState.DRAINING:
            owed = self._credit_owed + sent
            if owed >= self._credit_batch or not self._credit_sent:
                self._credit_owed = 0
                self._credit_sent = True
                self._recv_window += owed
                out.append(Credit(conn_id=self.conn_id, amount=owed))
            else:
                self._credit_owed = owed
        return out + self._settle()

    def wrote_eof(self) -> list[Message]:
        """The socket's write side was shut down (or could not be: the peer left already)."""
        if not self._writing:
            raise LocalProtocolError(f"conn {self.conn_id}: wrote_eof() without take_write()")
        self._writing = False
        self._step(FlowEvent.WROTE_EOF)
        return self._settle()

    # -- our side's decisions --------------------------------------------------------------

    def accepted(self) -> None:
        """The user app accepted this incoming connection (see `incoming`)."""
        self._accepted = True

    def fail(self, errno: int) -> list[Message]:
        """Give the connection up (e.g. ENOBUFS: a mirrored flow fell too far behind): the
        peer is told `ConnClose(errno)`, the socket is reset."""
        return self._fail(FlowEvent.FAIL, errno)

    def abort(self) -> int:
        """End now without telling the peer (its channel or link is gone, or a drain ran out
        of time). Returns the errno the socket's side should learn: ECONNREFUSED when the peer
        never credited a byte (its user app never saw this connection), else ECONNRESET."""
        before = self._state
        self._step(FlowEvent.ABORT)
        if before not in _TERMINAL:
            self._end(errno_mod.ECONNRESET)
        return errno_mod.ECONNRESET if self._peer_credited else errno_mod.ECONNREFUSED

    # -- internals -------------------------------------------------------------------------

    def _step(self, event: FlowEvent) -> bool:
        """Apply `event` through the table; False when a terminal state absorbed it."""
        state = self._state
        target = _TRANSITIONS[state].get(event)
        if self.datagram:
            target = _DATAGRAM_TRANSITIONS.get((state, event), target)
        if target is None:
            exc_type = RemoteProtocolError if event in _PEER_EVENTS else LocalProtocolError
            self._error(exc_type(f"conn {self.conn_id}: {event.value} in state {state.value}"))
        assert target is not None
        self._state = target
        return state not in _TERMINAL

    def _error(self, exc: LocalProtocolError | RemoteProtocolError) -> None:
        self._state = FlowState.ERROR
        self._inbox.clear()
        self._queued = 0
        if self._close_errno is None:
            self._close_errno = errno_mod.EPROTO
        raise exc

    def _fail(self, event: FlowEvent, errno: int) -> list[Message]:
        before = self._state
        if not self._step(event):
            return []
        self._end(self._refused(errno))
        if before is FlowState.DRAINING:
            return []  # the peer closed already
        return [ConnClose(conn_id=self.conn_id, errno=self._close_errno or errno)]

    def _refused(self, errno: int) -> int:
        if self.incoming and not self._accepted and not self._socket_sent:
            return errno_mod.ECONNREFUSED  # the user app never saw it (see the class doc)
        return errno

    def _end(self, errno: int) -> None:
        self._close_errno = errno
        self._inbox.clear()
        self._queued = 0

    def _settle(self) -> list[Message]:
        """Finish a BOTH_DONE or DRAINING flow once everything queued was written."""
        if self._state not in (FlowState.BOTH_DONE, FlowState.DRAINING):
            return []
        if self._inbox or self._writing:
            return []
        clean = self._state is FlowState.BOTH_DONE
        self._state = FlowState.CLOSED
        self._end(CONN_CLOSE_NORMAL)
        if clean:
            return [ConnClose(conn_id=self.conn_id, errno=CONN_CLOSE_NORMAL)]
        return []
