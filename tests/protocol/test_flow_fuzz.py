"""Two `Flow`s (the daemon's and the agent's end of one connection) joined by an in-order
wire, driven by hypothesis through random schedules: no illegal transition, no window below
zero, the window conserved, every byte delivered in order (and the EOF) before a clean close,
and both ends finished once the wire is quiet — also when either side fails or aborts."""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrord.protocol import WRITE_EOF, Flow, FlowState, Message
from mirrord.protocol import messages as m

WINDOW = 64
CONN = 4


@dataclass
class End:
    """One end: its flow, the user app's bytes still to send, what its socket received."""

    flow: Flow
    to_send: bytearray
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    got_eof: bool = False
    wire_out: deque[Message] = field(default_factory=deque)  # --msgs--> the other end

    def app_send(self, size: int) -> None:
        n = min(self.flow.read_size(), len(self.to_send), max(size, 1))
        if n <= 0:
            return
        chunk = bytes(self.to_send[:n])
        del self.to_send[:n]
        self.sent += chunk
        self.wire_out += self.flow.socket_data(chunk)

    def app_eof(self) -> None:
        if not self.to_send and self.flow.reading:
            self.wire_out += self.flow.socket_eof()

    def write_step(self, size: int) -> None:
        item = self.flow.take_write()
        if item is None:
            return
        if item is WRITE_EOF:
            assert not self.got_eof, "EOF written twice"
            self.got_eof = True
            self.wire_out += self.flow.wrote_eof()
            return
        assert isinstance(item, bytes)
        assert not self.got_eof, "bytes after the EOF"
        n = min(len(item), max(size, 0))  # a socket that takes part (or nothing) now
        self.received += item[:n]
        self.wire_out += self.flow.wrote(n, item[n:])


def deliver(src: End, dst: End) -> None:
    if src.wire_out:
        dst.wire_out += dst.flow.receive(src.wire_out.popleft())


def in_flight(wire: deque[Message]) -> tuple[int, int]:
    data = sum(len(x.data) for x in wire if isinstance(x, m.Data))
    credit = sum(x.amount for x in wire if isinstance(x, m.Credit))
    return data, credit


def check(a: End, b: End) -> None:
    for end in (a, b):
        assert end.flow.send_window >= 0
        assert end.flow.recv_window >= 0
    for src, dst in ((a, b), (b, a)):
        live = (FlowState.OPEN, FlowState.IN_DONE, FlowState.OUT_DONE, FlowState.BOTH_DONE)
        if src.flow.mirror or src.flow.state not in live or dst.flow.state not in live:
            continue
        data, _ = in_flight(src.wire_out)
        _, credit = in_flight(dst.wire_out)
        # every byte of the window is somewhere: unsent, on the wire, queued, written but held
        # back from Credit (`credit_owed`), or being credited
        assert src.flow.send_window + data + dst.flow.queued + dst.flow.credit_owed + credit == (
            WINDOW
        )


def step(a: End, b: End, action: int, size: int) -> None:
    which, what = divmod(action, 4)
    me, other = (a, b) if which == 0 else (b, a)
    if what == 0:
        me.app_send(size)
    elif what == 1:
        me.app_eof()
    elif what == 2:
        deliver(other, me)
    else:
        me.write_step(size)
    check(a, b)


def settle(a: End, b: End) -> None:
    """Run every end to completion, fairly (bounded)."""
    for _ in range(10_000):
        if a.flow.finished and b.flow.finished and not a.wire_out and not b.wire_out:
            return
        for action in range(8):
            step(a, b, action, WINDOW)
    raise AssertionError(f"never settled: {a.flow!r} {b.flow!r}")


schedules = st.lists(st.tuples(st.integers(0, 7), st.integers(0, WINDOW)), max_size=120)
payloads = st.binary(max_size=300)


def pair(a_bytes: bytes, b_bytes: bytes, *, mirror: bool = False) -> tuple[End, End]:
    a = End(Flow(CONN, window=WINDOW, max_chunk=16, mirror=mirror), bytearray(a_bytes))
    b = End(Flow(CONN, window=WINDOW, max_chunk=16), bytearray(b_bytes))
    return a, b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a_bytes=payloads, b_bytes=payloads, schedule=schedules, mirror=st.booleans())
def test_every_byte_arrives_before_a_clean_close(
    a_bytes: bytes, b_bytes: bytes, schedule: list[tuple[int, int]], mirror: bool
) -> None:
    a, b = pair(a_bytes, b_bytes, mirror=mirror)
    for action, size in schedule:
        step(a, b, action, size)
    settle(a, b)
    assert a.flow.state is FlowState.CLOSED
    assert b.flow.state is FlowState.CLOSED
    assert bytes(b.received) == (b"" if mirror else a_bytes)  # mirrored: answers go nowhere
    assert bytes(a.received) == b_bytes
    assert a.got_eof
    assert b.got_eof


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a_bytes=payloads,
    b_bytes=payloads,
    schedule=schedules,
    fault_at=st.integers(0, 120),
    fault=st.sampled_from(["fail_a", "fail_b", "error_a", "error_b", "abort"]),
)
def test_faults_end_both_sides_without_illegal_events(
    a_bytes: bytes,
    b_bytes: bytes,
    schedule: list[tuple[int, int]],
    fault_at: int,
    fault: str,
) -> None:
    a, b = pair(a_bytes, b_bytes)
    for i, (action, size) in enumerate(schedule):
        if i == fault_at:
            _inject(a, b, fault)
        step(a, b, action, size)
    if fault_at >= len(schedule):
        _inject(a, b, fault)
    settle(a, b)
    for end, peer in ((a, b), (b, a)):
        # what arrived is what was sent, in order, possibly cut short
        assert bytes(peer.sent).startswith(bytes(end.received))
        assert end.flow.close_errno is not None
    if a.flow.state is FlowState.CLOSED and b.flow.state is FlowState.CLOSED:
        assert bytes(a.received) == bytes(b.sent)
        assert bytes(b.received) == bytes(a.sent)


def _inject(a: End, b: End, fault: str) -> None:
    if fault == "abort":  # the link is gone: both ends abort, nothing crosses any more
        a.flow.abort()
        b.flow.abort()
        a.wire_out.clear()
        b.wire_out.clear()
        return
    end = a if fault.endswith("_a") else b
    if fault.startswith("fail"):
        end.wire_out += end.flow.fail(errno.ENOBUFS)
    else:
        end.wire_out += end.flow.socket_error(errno.EPIPE)
