"""The mirror of an HTTP/2 flow, stream by stream (`_mirror_h2.MirrorH2Flow`): a real h2 client's
bytes, cut at every size hypothesis picks, go in as the sniffer would deliver them; each stream
a filter matches comes out on a connection of its own, served by a real h2 server that records
what it got and answers (windows, SETTINGS and all)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrord.agent._http2_detect import H2_PREFACE
from mirrord.agent._http_filter import HttpFilter, RequestHead
from mirrord.agent._incoming_pipe import PipeEnd, pipe_pair
from mirrord.agent._mirror_h2 import MirrorH2Flow

pytestmark = pytest.mark.anyio

ALICE = HttpFilter.from_config({"header_filter": "^x-user: alice$"})
BIG = 300_000  # past the user app's 64 KiB window: the copy waits for its WINDOW_UPDATEs


@dataclass
class Seen:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: bool = False


async def user_app(end: PipeEnd, seen: list[Seen]) -> None:
    """An h2 server on one mirrored connection: records its stream and answers it."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.initiate_connection()
    await end.send(conn.data_to_send())
    got = Seen()
    seen.append(got)
    with anyio.fail_after(10):
        while True:
            try:
                data = await end.receive()
            except anyio.EndOfStream:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    got.headers = dict(ev.headers or [])
                elif isinstance(ev, h2.events.DataReceived):
                    got.body += ev.data or b""
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, 1)
                elif isinstance(ev, h2.events.TrailersReceived):
                    got.trailers = dict(ev.headers or [])
                elif isinstance(ev, h2.events.StreamReset):
                    got.reset = True
                elif isinstance(ev, h2.events.StreamEnded):
                    got.ended = True
                    conn.send_headers(1, [(b":status", b"200")], end_stream=True)
            await end.send(conn.data_to_send())


def client_bytes() -> bytes:
    """Three streams, interleaved: alice's GET, bob's POST, alice's big POST with trailers;
    then a fourth of alice's that the client resets half-way."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    # the pod's app granted big windows (the mirror never sees its SETTINGS)
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
    conn.local_settings.acknowledge()
    conn.remote_settings.update({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
    conn.remote_settings.acknowledge()
    conn.increment_flow_control_window(2**30)
    conn.outbound_flow_control_window = 2**30
    base = [(":scheme", "http"), (":authority", "pod")]
    conn.send_headers(1, [(":method", "GET"), (":path", "/a"), *base, ("x-user", "alice")], True)
    conn.send_headers(3, [(":method", "POST"), (":path", "/b"), *base, ("x-user", "bob")])
    conn.send_headers(5, [(":method", "POST"), (":path", "/c"), *base, ("x-user", "alice")])
    conn.send_data(3, b"b" * 1000, end_stream=True)
    for i in range(0, BIG, 16384):
        conn.send_data(5, b"c" * min(16384, BIG - i))
    conn.send_headers(5, [("grpc-status", "0")], end_stream=True)
    conn.send_headers(7, [(":method", "POST"), (":path", "/d"), *base, ("x-user", "alice")])
    conn.send_data(7, b"d" * 10)
    conn.reset_stream(7)
    return conn.data_to_send()


async def mirror(data: bytes, cuts: list[int]) -> list[Seen]:
    seen: list[Seen] = []
    async with anyio.create_task_group() as tg:

        def open_copies(head: RequestHead) -> list[PipeEnd]:
            if not ALICE.matches(head):
                return []
            ours, theirs = pipe_pair(1 << 25)
            tg.start_soon(user_app, theirs, seen)
            return [ours]

        def spawn(run: Any) -> None:
            tg.start_soon(run)

        flow = MirrorH2Flow(open_copies, spawn, 1 << 25)
        pos = 0
        for cut in [*cuts, len(data)]:
            flow.receive(data[pos : pos + cut])
            pos += cut
            await anyio.sleep(0)
        flow.receive(data[pos:])
        assert not flow.failed
        with anyio.fail_after(10):
            while len([s for s in seen if s.ended or s.reset]) < 3:
                await anyio.sleep(0.01)
        flow.close(reset=True)
    return sorted(seen, key=lambda s: s.headers[b":path"])


def check(seen: list[Seen]) -> None:
    assert [s.headers[b":path"] for s in seen] == [b"/a", b"/c", b"/d"]
    a, c, d = seen
    assert a.ended and a.body == b"" and a.headers[b"x-user"] == b"alice"
    assert c.ended and c.body == b"c" * BIG and c.trailers == {b"grpc-status": b"0"}
    assert d.reset and not d.ended


async def test_matching_streams_are_copied_each_on_its_own_connection() -> None:
    check(await mirror(client_bytes(), []))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=1, max_value=40_000), max_size=30))
def test_any_split_of_the_flow(cuts: list[int]) -> None:
    check(anyio.run(mirror, client_bytes(), cuts))


async def test_bytes_that_are_not_http2_stop_nothing_and_copy_nothing() -> None:
    opened: list[RequestHead] = []

    def open_copies(head: RequestHead) -> list[PipeEnd]:
        opened.append(head)
        return []

    flow = MirrorH2Flow(open_copies, lambda run: None, 1 << 20)
    flow.receive(H2_PREFACE[:10] + b"garbage that is not the preface")
    assert flow.failed
    flow = MirrorH2Flow(open_copies, lambda run: None, 1 << 20)
    flow.receive(H2_PREFACE)
    assert not flow.failed
    flow.receive(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0: broken
    assert flow.failed
    flow.receive(client_bytes())  # nothing more is parsed
    assert opened == []
