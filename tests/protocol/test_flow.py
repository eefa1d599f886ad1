"""The relay flow object (`mirrord.protocol.Flow`), sans-IO: one test per behaviour of the
daemon's and the agent's relays (docs/relay.md maps each of their flags to these)."""

from __future__ import annotations

import errno

import pytest

from mirrord.protocol import (
    WRITE_EOF,
    Flow,
    FlowEvent,
    FlowState,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
)
from mirrord.protocol import messages as m
from mirrord.protocol._flow import _TRANSITIONS, CREDIT_BATCH

C = 7


def _state(flow: Flow) -> FlowState:
    """The state, read through a call (mypy would keep an earlier `is` narrowing)."""
    return flow.state


def _write_all(flow: Flow) -> tuple[bytes, bool, list[Message]]:
    """Write everything queued as a socket that takes it all: (bytes, EOF written, messages)."""
    out = bytearray()
    eof = False
    sent: list[Message] = []
    for _ in range(1000):
        item = flow.take_write()
        if item is None:
            return bytes(out), eof, sent
        if item is WRITE_EOF:
            eof = True
            sent += flow.wrote_eof()
        else:
            assert isinstance(item, bytes)
            out += item
            sent += flow.wrote(len(item))
    raise AssertionError("unbounded queue")


def test_socket_data_spends_the_window_and_credit_restores_it() -> None:
    flow = Flow(C, window=10, max_chunk=8)
    assert flow.read_size() == 8
    assert flow.socket_data(b"12345678") == [m.Data(conn_id=C, data=b"12345678")]
    assert flow.read_size() == 2
    flow.socket_data(b"90")
    assert flow.read_size() == 0  # the shell waits for Credit
    assert flow.peer_credit(5) == []
    assert flow.read_size() == 5


def test_reading_beyond_the_window_is_our_bug() -> None:
    flow = Flow(C, window=4)
    with pytest.raises(LocalProtocolError, match="beyond the send window"):
        flow.socket_data(b"12345")
    assert _state(flow) is FlowState.ERROR
    assert flow.reset_socket


def test_credit_is_capped() -> None:
    flow = Flow(C, window=1)
    flow.peer_credit(2**40)
    assert flow.send_window == 2**31


def test_peer_data_beyond_the_window_is_the_peers_error() -> None:
    flow = Flow(C, window=4)
    flow.peer_data(b"123")
    with pytest.raises(RemoteProtocolError, match="exceeds the credit window"):
        flow.peer_data(b"45")
    assert _state(flow) is FlowState.ERROR
    assert flow.take_write() is None  # nothing is written after an error


def test_credit_only_for_bytes_the_socket_took() -> None:
    flow = Flow(C, window=10)
    flow.peer_data(b"abcdef")
    assert flow.recv_window == 4
    item = flow.take_write()
    assert item == b"abcdef"
    # a partial write: 2 bytes taken, the rest first in line
    assert flow.wrote(2, b"cdef") == [m.Credit(conn_id=C, amount=2)]
    assert flow.recv_window == 6
    assert flow.queued == 4
    assert flow.take_write() == b"cdef"
    assert flow.wrote(4) == [m.Credit(conn_id=C, amount=4)]
    assert flow.recv_window == 10


def test_the_rest_of_a_partial_write_may_be_a_view() -> None:
    """What a socket did not take goes back as a memoryview of the item (no copy of it) and is
    counted as queued like bytes."""
    flow = Flow(C, window=10)
    flow.peer_data(b"abcdef")
    item = flow.take_write()
    assert item == b"abcdef"
    flow.wrote(2, memoryview(b"abcdef")[2:])
    assert flow.queued == 4
    rest = flow.take_write()
    assert isinstance(rest, memoryview) and rest.tobytes() == b"cdef"
    assert flow.queued == 0
    flow.wrote(4)
    assert flow.write_idle


def test_write_idle_allows_the_direct_write_only_when_nothing_is_ahead() -> None:
    flow = Flow(C)
    assert flow.write_idle
    flow.peer_data(b"x")
    assert not flow.write_idle
    assert flow.take_write() == b"x"
    assert not flow.write_idle  # being written
    flow.wrote(1)
    assert flow.write_idle


def test_take_write_twice_is_our_bug() -> None:
    flow = Flow(C)
    flow.peer_data(b"a")
    flow.peer_data(b"b")
    flow.take_write()
    with pytest.raises(LocalProtocolError, match="twice"):
        flow.take_write()
    with pytest.raises(LocalProtocolError, match="without take_write"):
        Flow(C).wrote(1)


def test_peer_shutdown_then_socket_eof_closes_cleanly_after_the_data() -> None:
    flow = Flow(C)
    flow.peer_data(b"hello")
    assert flow.peer_shutdown() == []
    assert _state(flow) is FlowState.IN_DONE
    assert flow.reading  # our direction is still open
    data, eof, sent = _write_all(flow)
    assert (data, eof) == (b"hello", True)
    assert sent == [m.Credit(conn_id=C, amount=5)]
    assert flow.socket_eof() == [m.Shutdown(conn_id=C), m.ConnClose(conn_id=C, errno=0)]
    assert _state(flow) is FlowState.CLOSED
    assert not flow.reset_socket
    assert flow.close_errno == 0


def test_socket_eof_then_peer_shutdown_waits_for_the_queue() -> None:
    flow = Flow(C)
    assert flow.socket_eof() == [m.Shutdown(conn_id=C)]
    assert _state(flow) is FlowState.OUT_DONE
    assert not flow.reading
    flow.peer_data(b"late")
    assert flow.peer_shutdown() == []
    assert _state(flow) is FlowState.BOTH_DONE  # "late" and the EOF are still to be written
    data, eof, sent = _write_all(flow)
    assert (data, eof) == (b"late", True)
    assert sent == [m.Credit(conn_id=C, amount=4), m.ConnClose(conn_id=C, errno=0)]
    assert _state(flow) is FlowState.CLOSED


def test_clean_peer_close_writes_queued_data_and_eof_first() -> None:
    # The regression fixed in the agent's relay: a ConnClose(0) right behind Data and
    # Shutdown must not drop them (the daemon closes once its side is done both ways).
    flow = Flow(C)
    flow.peer_data(b"part one, ")
    flow.peer_data(b"part two")
    flow.peer_shutdown()
    assert flow.peer_close(0) == []
    assert _state(flow) is FlowState.DRAINING
    assert not flow.reading and flow.read_size() == 0  # reading stops at once
    data, eof, sent = _write_all(flow)
    assert (data, eof) == (b"part one, part two", True)
    assert sent == []  # no Credit and no ConnClose: the peer is gone
    assert _state(flow) is FlowState.CLOSED
    assert not flow.reset_socket


def test_clean_peer_close_without_shutdown_still_ends_with_eof() -> None:
    flow = Flow(C)
    flow.peer_data(b"abc")
    flow.peer_close(0)
    assert _write_all(flow)[:2] == (b"abc", True)
    assert _state(flow) is FlowState.CLOSED


def test_a_read_finishing_during_the_drain_is_dropped() -> None:
    flow = Flow(C)
    flow.peer_data(b"q")
    flow.peer_close(0)
    assert flow.socket_data(b"answer") == []
    assert flow.socket_eof() == []
    assert _state(flow) is FlowState.DRAINING


def test_drain_timeout_aborts() -> None:
    flow = Flow(C)
    flow.peer_data(b"never read by the target")
    flow.peer_close(0)
    flow.abort()
    assert _state(flow) is FlowState.RESET
    assert flow.reset_socket
    assert flow.take_write() is None


def test_peer_reset_drops_the_queue_and_resets_the_socket() -> None:
    flow = Flow(C)
    flow.peer_data(b"dropped")
    assert flow.peer_close(errno.ECONNRESET) == []  # nothing goes back
    assert _state(flow) is FlowState.RESET
    assert flow.close_errno == errno.ECONNRESET
    assert flow.reset_socket
    assert flow.take_write() is None
    assert not flow.reading


def test_socket_error_tells_the_peer() -> None:
    flow = Flow(C)
    assert flow.socket_error(errno.EPIPE) == [m.ConnClose(conn_id=C, errno=errno.EPIPE)]
    assert flow.reset_socket


def test_fail_tells_the_peer_its_errno() -> None:
    flow = Flow(C)
    flow.peer_data(b"behind")
    assert flow.fail(errno.ENOBUFS) == [m.ConnClose(conn_id=C, errno=errno.ENOBUFS)]
    assert _state(flow) is FlowState.RESET
    assert flow.queued == 0


def test_fail_during_the_drain_sends_nothing() -> None:
    flow = Flow(C)
    flow.peer_data(b"x")
    flow.peer_close(0)
    assert flow.socket_error(errno.EPIPE) == []
    assert _state(flow) is FlowState.RESET


def test_abort_says_refused_when_the_peer_never_credited() -> None:
    assert Flow(C).abort() == errno.ECONNREFUSED
    flow = Flow(C)
    flow.socket_data(b"x")
    flow.peer_credit(1)
    assert flow.abort() == errno.ECONNRESET
    assert _state(flow) is FlowState.RESET


def test_incoming_never_accepted_is_refused() -> None:
    flow = Flow(C, incoming=True)
    assert flow.socket_error(errno.ECONNRESET) == [m.ConnClose(conn_id=C, errno=errno.ECONNREFUSED)]


def test_incoming_accepted_or_answered_is_reset() -> None:
    accepted = Flow(C, incoming=True)
    accepted.accepted()
    assert accepted.fail(errno.ECONNRESET)[0] == m.ConnClose(conn_id=C, errno=errno.ECONNRESET)
    answered = Flow(C, incoming=True)
    answered.socket_data(b"HTTP/1.1 200 OK\r\n")
    assert answered.fail(errno.ECONNRESET)[0] == m.ConnClose(conn_id=C, errno=errno.ECONNRESET)


def test_incoming_clean_close_is_not_refused() -> None:
    flow = Flow(C, incoming=True)
    flow.peer_shutdown()
    _write_all(flow)
    assert flow.socket_eof()[-1] == m.ConnClose(conn_id=C, errno=0)


def test_mirror_reads_without_window_and_sends_nothing() -> None:
    flow = Flow(C, window=1, max_chunk=100, mirror=True)
    assert flow.read_size() == 100
    assert flow.socket_data(b"the user app's answer") == []
    assert flow.send_window == 1
    assert flow.socket_eof() == []  # no Shutdown either
    flow.peer_data(b"x")
    flow.peer_shutdown()
    _, _, sent = _write_all(flow)
    assert sent == [m.Credit(conn_id=C, amount=1), m.ConnClose(conn_id=C, errno=0)]


def test_datagram_needs_its_whole_size_in_the_window() -> None:
    flow = Flow(C, window=10, datagram=True)
    assert flow.can_send(10)
    flow.socket_data(b"12345678")
    assert not flow.can_send(3)


def test_datagram_shutdown_ends_after_the_queued_datagrams() -> None:
    flow = Flow(C, datagram=True)
    flow.peer_data(b"d1")
    assert flow.peer_shutdown() == []
    assert _state(flow) is FlowState.BOTH_DONE
    data, eof, sent = _write_all(flow)
    assert (data, eof) == (b"d1", False)  # no half-close on UDP
    assert sent == [m.Credit(conn_id=C, amount=2), m.ConnClose(conn_id=C, errno=0)]


def test_datagram_socket_end_closes_at_once() -> None:
    flow = Flow(C, datagram=True)
    flow.peer_data(b"lost")
    assert flow.socket_eof() == [m.ConnClose(conn_id=C, errno=0)]
    assert _state(flow) is FlowState.CLOSED
    assert flow.take_write() is None


def test_datagram_peer_close_drops_the_queue() -> None:
    flow = Flow(C, datagram=True)
    flow.peer_data(b"lost")
    assert flow.peer_close(0) == []
    assert _state(flow) is FlowState.CLOSED
    assert flow.take_write() is None


def test_peer_data_after_its_shutdown_names_state_and_event() -> None:
    flow = Flow(C)
    flow.peer_shutdown()
    with pytest.raises(RemoteProtocolError, match=r"conn 7: peer Data in state IN_DONE"):
        flow.peer_data(b"x")
    assert _state(flow) is FlowState.ERROR


def test_reading_after_our_eof_is_our_bug() -> None:
    flow = Flow(C)
    flow.socket_eof()
    with pytest.raises(LocalProtocolError, match=r"socket data in state OUT_DONE"):
        flow.socket_data(b"x")


def test_anything_after_the_peers_close_is_illegal() -> None:
    flow = Flow(C)
    flow.peer_data(b"x")
    flow.peer_close(0)
    with pytest.raises(RemoteProtocolError, match="peer Shutdown in state DRAINING"):
        flow.peer_shutdown()


def test_terminal_states_absorb_what_crossed_on_the_wire() -> None:
    flow = Flow(C)
    flow.fail(errno.EIO)
    assert flow.peer_data(b"crossed") == []
    assert flow.peer_credit(3) == []
    assert flow.peer_shutdown() == []
    assert flow.peer_close(0) == []
    assert flow.socket_eof() == []
    assert _state(flow) is FlowState.RESET
    assert flow.close_errno == errno.EIO


def test_receive_dispatches_connection_messages() -> None:
    flow = Flow(C)
    flow.receive(m.Data(conn_id=C, data=b"a"))
    flow.receive(m.Credit(conn_id=C, amount=1))
    flow.receive(m.Shutdown(conn_id=C))
    assert _state(flow) is FlowState.IN_DONE
    flow.receive(m.ConnClose(conn_id=C, errno=errno.ECONNRESET))
    assert _state(flow) is FlowState.RESET
    with pytest.raises(LocalProtocolError, match="not a connection message"):
        flow.receive(m.Ping(nonce=1))
    with pytest.raises(LocalProtocolError, match="routed to"):
        Flow(C).receive(m.Shutdown(conn_id=C + 2))


def test_every_open_state_can_be_aborted_reset_and_failed() -> None:
    for state, row in _TRANSITIONS.items():
        for event in (FlowEvent.ABORT, FlowEvent.FAIL, FlowEvent.SOCKET_ERROR):
            assert event in row, (state, event)
    # the peer may not speak after it closed; only terminal states absorb it
    assert FlowEvent.PEER_DATA not in _TRANSITIONS[FlowState.DRAINING]


def test_repr_and_statistics_show_the_state() -> None:
    flow = Flow(C)
    flow.peer_data(b"abc")
    assert "OPEN" in repr(flow) and "queued=3" in repr(flow)
    assert flow.statistics()["queued"] == 3


def test_max_chunk_is_bounded_by_the_data_limit() -> None:
    with pytest.raises(ValueError, match="max_chunk"):
        Flow(C, max_chunk=m.MAX_DATA_CHUNK + 1)


def test_credit_is_held_back_until_a_batch_after_the_first() -> None:
    # A small exchange (a stolen HTTP request, its answer) is one Data each way: Credit goes
    # back only once CREDIT_BATCH bytes were written (the first at once: the peer learns the
    # socket took a byte).
    flow = Flow(C, window=1024 * 1024)
    sent: list[Message] = []
    for _ in range(3):
        flow.peer_data(b"x" * 100)
        assert flow.take_write() is not None
        sent += flow.wrote(100)
    assert sent == [m.Credit(conn_id=C, amount=100)]
    assert flow.credit_owed == 200
    assert flow.recv_window == 1024 * 1024 - 200
    flow.peer_data(b"y" * CREDIT_BATCH)
    assert flow.take_write() is not None
    assert flow.wrote(CREDIT_BATCH) == [m.Credit(conn_id=C, amount=CREDIT_BATCH + 200)]
    assert flow.credit_owed == 0 and flow.recv_window == 1024 * 1024


def test_a_small_window_is_credited_by_its_quarter_and_datagrams_at_once() -> None:
    flow = Flow(C, window=16)
    flow.peer_data(b"abcdefgh")
    flow.take_write()
    assert flow.wrote(1, b"bcdefgh") == [m.Credit(conn_id=C, amount=1)]
    flow.take_write()
    assert flow.wrote(3, b"efgh") == []  # 3 < 16 // 4
    flow.take_write()
    assert flow.wrote(4) == [m.Credit(conn_id=C, amount=7)]
    udp = Flow(C, window=1024 * 1024, datagram=True)
    for _ in range(2):
        udp.peer_data(b"d" * 10)
        udp.take_write()
        assert udp.wrote(10) == [m.Credit(conn_id=C, amount=10)]
