"""Mirror: TCP reassembly sans-IO (out of order, retransmits, FIN/RST, fuzzed) and the real
AF_PACKET sniffer in a pod under an HTTP load with zero kernel drops."""

from __future__ import annotations

import http.client
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.agent._http_filter import CLOSED, RequestSplitter, RequestStarted
from mirrord.agent._incoming_netns import NetnsRunner
from mirrord.agent._mirror import (
    ACK,
    EXPIRE_EVERY,
    FIN,
    FLOW_IDLE_TIMEOUT,
    RST,
    SYN,
    FlowClosed,
    FlowData,
    FlowOpened,
    PacketSniffer,
    Reassembler,
    bpf_expression,
    live_connections,
    parse_frame,
)
from mirrord.localpod import LocalPod

KEY = ("10.213.0.1", 40000, "10.213.0.2", 8080)


def data_of(events: list[Any]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, FlowData))


def test_in_order_stream_with_fin() -> None:
    r = Reassembler()
    ev = r.feed(KEY, 1000, SYN, b"")
    assert ev == [FlowOpened(1, KEY)]
    ev = r.feed(KEY, 1001, ACK, b"hello ")
    ev += r.feed(KEY, 1007, ACK | FIN, b"world")
    assert data_of(ev) == b"hello world"
    assert ev[-1] == FlowClosed(1, reset=False)
    assert r.flows == 0


def test_out_of_order_and_retransmits_and_overlaps() -> None:
    r = Reassembler()
    r.feed(KEY, 0xFFFFFFF0, SYN, b"")  # sequence numbers wrap around inside the stream
    base = 0xFFFFFFF1
    ev = r.feed(KEY, (base + 10) & 0xFFFFFFFF, ACK, b"KLMNOPQRST")
    assert ev == []
    ev += r.feed(KEY, base, ACK, b"ABCDE")
    ev += r.feed(KEY, base, ACK, b"ABCDE")  # a retransmit
    ev += r.feed(KEY, (base + 3) & 0xFFFFFFFF, ACK, b"DEFGHIJ")  # overlaps the first
    ev += r.feed(KEY, (base + 20) & 0xFFFFFFFF, FIN | ACK, b"")
    assert data_of(ev) == b"ABCDEFGHIJKLMNOPQRST"
    assert ev[-1] == FlowClosed(1, reset=False)


def test_rst_closes_and_flows_before_the_subscription_are_ignored() -> None:
    r = Reassembler()
    assert r.feed(KEY, 5, ACK, b"mid-stream") == []
    r.feed(KEY, 100, SYN, b"")
    assert r.feed(KEY, 101, RST, b"") == [FlowClosed(1, reset=True)]


def test_reused_port_pair_closes_the_old_flow() -> None:
    r = Reassembler()
    r.feed(KEY, 100, SYN, b"")
    assert r.feed(KEY, 100, SYN, b"") == []  # SYN retransmit
    assert r.feed(KEY, 9000, SYN, b"") == [FlowClosed(1, reset=True), FlowOpened(2, KEY)]


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=400),
    isn=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_fuzz_any_segmentation_order_and_duplication(
    payload: bytes, isn: int, data: st.DataObject
) -> None:
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(payload)), max_size=20))))
    bounds = [0, *[c for c in cuts if c < len(payload)], len(payload)]
    segs = [(bounds[i], payload[bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)]
    dups = data.draw(st.lists(st.sampled_from(segs), max_size=5))
    order = data.draw(st.permutations([*segs, *dups]))
    r = Reassembler()
    events = r.feed(KEY, isn, SYN, b"")
    fin_at = data.draw(st.integers(0, len(order)))
    for i, (off, seg) in enumerate(order):
        if i == fin_at:
            events += r.feed(KEY, (isn + 1 + len(payload)) & 0xFFFFFFFF, FIN | ACK, b"")
        events += r.feed(KEY, (isn + 1 + off) & 0xFFFFFFFF, ACK, seg)
    if fin_at == len(order):
        events += r.feed(KEY, (isn + 1 + len(payload)) & 0xFFFFFFFF, FIN | ACK, b"")
    assert data_of(events) == payload
    assert events[-1] == FlowClosed(1, reset=False)


def test_parse_frame_ipv4_and_ipv6() -> None:
    tcp = struct.pack("!HHIIBBHHH", 40000, 8080, 7, 0, 5 << 4, SYN, 0, 0, 0)
    ip4 = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp) + 3,
        0,
        0,
        64,
        6,
        0,
        bytes([10, 213, 0, 1]),
        bytes([10, 213, 0, 2]),
    )
    frame = b"\0" * 12 + b"\x08\x00" + ip4 + tcp + b"abc" + b"\0" * 6  # padding ignored
    assert parse_frame(frame) == (KEY, 7, SYN, b"abc")
    ip6 = struct.pack(
        "!IHBB16s16s", 6 << 28, len(tcp) + 2, 6, 64, b"\0" * 15 + b"\1", b"\0" * 15 + b"\2"
    )
    frame6 = b"\0" * 12 + b"\x86\xdd" + ip6 + tcp + b"hi"
    assert parse_frame(frame6) == (("::1", 40000, "::2", 8080), 7, SYN, b"hi")
    assert parse_frame(b"\0" * 12 + b"\x08\x06" + b"\0" * 28) is None  # ARP


def test_bpf_expression() -> None:
    assert bpf_expression({80, 8080}).startswith("tcp and (dst port 80 or dst port 8080) and ")
    assert bpf_expression(set()) == "less 1"


@pytest.fixture
def sniffer(pod: LocalPod) -> Iterator[PacketSniffer]:
    runner = NetnsRunner(f"/proc/{pod.pid}/ns/net")
    sn = PacketSniffer(runner.run_sync)
    yield sn
    sn.close()
    runner.close()


@pytest.mark.netns
def test_1000_requests_on_20_keep_alive_connections_seen_in_order_without_drops(
    pod: LocalPod, pod_app: int, sniffer: PacketSniffer
) -> None:
    sniffer.set_ports({pod_app})
    stop = threading.Event()
    streams: dict[int, bytes] = {}
    keys: dict[int, tuple[str, int, str, int]] = {}
    closed: set[int] = set()

    def read() -> None:
        while not stop.is_set() or sniffer.reassembler.flows:
            select.select([sniffer.fileno()], [], [], 0.05)
            for ev in sniffer.drain():
                if isinstance(ev, FlowOpened):
                    keys[ev.flow] = ev.key
                    streams[ev.flow] = b""
                elif isinstance(ev, FlowData):
                    streams[ev.flow] += ev.data
                else:
                    closed.add(ev.flow)
            if stop.is_set() and len(closed) >= 20:
                return

    reader = threading.Thread(target=read)
    reader.start()
    answers: list[bytes] = []
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            conn = http.client.HTTPConnection(pod.ip, pod_app, timeout=10)
            for i in range(50):
                conn.request("POST", f"/c{n}/r{i}", body=f"body-{n}-{i}".encode())
                answers.append(conn.getresponse().read())
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=60)
    stop.set()
    reader.join(timeout=30)
    assert not errors
    assert len(answers) == 1000 and all(a.startswith(b"pod-app POST /c") for a in answers)
    assert len(streams) == 20 and closed == set(streams)
    for flow, stream in streams.items():
        splitter = RequestSplitter()
        splitter.receive_data(stream)
        splitter.receive_data(b"")
        paths: list[str] = []
        for _ in range(10_000):
            ev = splitter.next_event()
            if isinstance(ev, RequestStarted):
                paths.append(ev.head.target)
            elif ev is CLOSED:
                break
        n = paths[0].split("/")[1]
        assert paths == [f"/{n}/r{i}" for i in range(50)], keys[flow]
    assert sniffer.statistics()["drops"] == 0


@pytest.mark.netns
def test_drain_on_the_event_loop_pure_acks_filtered_and_live_idle_flows_kept(
    pod: LocalPod, pod_app: int, sniffer: PacketSniffer
) -> None:
    """The agent reads the sniffer on its trio loop: wait until readable, drain without
    blocking. The kernel filter passes the SYN and the request, not the client's pure ACKs.
    A flow silent for FLOW_IDLE_TIMEOUT is ended, unless the target still has its
    connection (`live_connections`, read from the pod's own /proc tables)."""
    sniffer.set_ports({pod_app})
    assert sniffer.drain() == [] and not sniffer.full  # nothing queued: returns at once
    events: list[Any] = []
    client = socket.create_connection((pod.ip, pod_app), timeout=10)
    try:
        client.sendall(b"GET /drained HTTP/1.1\r\nHost: pod\r\n\r\n")
        answer = b""
        while b"/drained" not in answer:  # the answer came, so the client acknowledged it
            answer += client.recv(4096)

        async def read() -> None:
            with anyio.fail_after(10):
                while b"/drained" not in data_of(events):
                    await anyio.wait_readable(sniffer.fileno())
                    events.extend(sniffer.drain())
            await anyio.sleep(0.3)  # the client's delayed ACKs, had they passed the filter
            events.extend(sniffer.drain())

        anyio.run(read, backend="trio")
        assert isinstance(events[0], FlowOpened) and events[0].key[3] == pod_app
        assert not sniffer.full
        assert sniffer.packets == 2  # the SYN and the request: no pure ACK
        key = events[0].key
        live = sniffer.live_connections()
        assert key in live
        assert not sniffer.expiry_due()  # looked at once per EXPIRE_EVERY, and none idle
        later = time.monotonic() + FLOW_IDLE_TIMEOUT + EXPIRE_EVERY + 1
        assert sniffer.expiry_due(now=later)
        assert sniffer.expire_idle(now=later, live=live) == []  # silent, but alive
        assert sniffer.reassembler.flows == 1
        even_later = later + FLOW_IDLE_TIMEOUT + 1
        closed = sniffer.expire_idle(now=even_later, live=set())
        assert closed == [FlowClosed(events[0].flow, reset=True)]  # silent and gone
        assert sniffer.reassembler.flows == 0
    finally:
        client.close()


@pytest.mark.netns
def test_the_kernel_filter_drops_pure_acks_over_ipv6_too(pod6: LocalPod) -> None:
    """A dual-stack pod's HTTP service, asked over IPv6 on one connection: the sniffer reads
    the SYN, each request and the FIN, none of the client's pure ACKs (its handshake ACK,
    the acknowledgements of the answers)."""
    port = pod6.spec.http_port
    assert port is not None
    runner = NetnsRunner(f"/proc/{pod6.pid}/ns/net")
    sniffer = PacketSniffer(runner.run_sync)
    events: list[Any] = []
    try:
        sniffer.set_ports({port})
        conn = http.client.HTTPConnection(pod6.ip6, port, timeout=10)
        for i in range(3):
            conn.request("GET", f"/v6-{i}")
            assert conn.getresponse().read()
        conn.close()

        async def read() -> None:
            with anyio.fail_after(10):
                while not any(isinstance(e, FlowClosed) for e in events):
                    await anyio.wait_readable(sniffer.fileno())
                    events.extend(sniffer.drain())
            await anyio.sleep(0.3)  # the client's last ACKs, had they passed the filter
            events.extend(sniffer.drain())

        anyio.run(read, backend="trio")
        assert isinstance(events[0], FlowOpened) and events[0].key[2] == pod6.ip6
        assert b"/v6-2" in data_of(events)
        assert sniffer.packets == 5  # the SYN, three requests, the FIN: no pure ACK
    finally:
        sniffer.close()
        runner.close()


def test_live_connections_reads_ipv4_ipv6_and_mapped_addresses(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt\n"
    (tmp_path / "tcp").write_text(
        header
        # 10.213.0.2:8080 <- 10.213.0.1:40000, ESTABLISHED
        + "   0: 0200D50A:1F90 0100D50A:9C40 01 00000000:00000000 00:00000000 00000000\n"
        # a listener and a TIME_WAIT: not connections that go on
        + "   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n"
        + "   2: 0200D50A:1F90 0100D50A:9C41 06 00000000:00000000 00:00000000 00000000\n"
    )
    (tmp_path / "tcp6").write_text(
        header
        # [::1]:8080 <- [::1]:40002, CLOSE_WAIT
        + "   0: 00000000000000000000000001000000:1F90 "
        "00000000000000000000000001000000:9C42 08 0:0 00:0 0\n"
        # a dual-stack socket's IPv4 client: ::ffff:10.213.0.1
         + "   1: 0000000000000000FFFF00000200D50A:1F90 "
        "0000000000000000FFFF00000100D50A:9C43 01 0:0 00:0 0\n"
    )
    assert live_connections(str(tmp_path)) == {
        ("10.213.0.1", 40000, "10.213.0.2", 8080),
        ("::1", 40002, "::1", 8080),
        ("10.213.0.1", 40003, "10.213.0.2", 8080),
    }
    assert live_connections(str(tmp_path / "absent")) == set()
