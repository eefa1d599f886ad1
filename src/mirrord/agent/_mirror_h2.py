"""The mirror of a sniffed HTTP/2 connection (h2c, prior knowledge), stream by stream.

Owns: `MirrorH2Flow`, which `IncomingMirror` (`_incoming_mirror.py`) feeds with the client's
bytes of a sniffed flow that starts with the HTTP/2 preface, for the flow's mirroring channels
that have an HTTP filter. It parses them as the pod's app does (h2, server side, sans-IO) and
copies each stream a channel's filter matches on a mirrored connection of its own: a new
HTTP/2 connection with prior knowledge carrying that one stream (headers, body, trailers, a
reset), as a filtered steal gives a matched stream to the user app. Each copy reads the user
app's answer (its SETTINGS, WINDOW_UPDATEs, the response) only to move the request on within
the app's flow-control windows and to close once the app answered (GOAWAY, then EOF); the
answer itself is discarded.
Does not own: the sniffer, TCP reassembly, the HTTP/1 splitter, channels without a filter
(they get the client's connection whole, as one byte stream).

The sniffed bytes follow the pod's app's SETTINGS, which the agent does not see: the parser
grants the client every window and frame size HTTP/2 allows, so nothing the pod's app accepts
is refused here. A flow whose bytes break HTTP/2 stops being mirrored (its copies are reset);
the pod's app answers the client as always.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import SettingsFrame

from mirrord.agent._http2_detect import H2_PREFACE, head_from_headers, is_h2_preface
from mirrord.agent._http_filter import RequestHead
from mirrord.agent._incoming_pipe import PipeEnd

__all__ = ["MirrorH2Flow"]

log = logging.getLogger("mirrord.agent.incoming")

Headers = list[tuple[bytes, bytes]]
# What a sniffed stream's head opens: one new connection per channel whose filter matches.
OpenCopies = Callable[[RequestHead], list[PipeEnd]]
Spawn = Callable[[Callable[[], Awaitable[None]]], None]

_MAX_WINDOW = 2**31 - 1
_READ = 65536


def _sniff_settings() -> dict[h2.settings.SettingCodes, int]:
    codes = h2.settings.SettingCodes
    return {
        codes.INITIAL_WINDOW_SIZE: _MAX_WINDOW,
        codes.MAX_FRAME_SIZE: 2**24 - 1,
        codes.MAX_CONCURRENT_STREAMS: 2**31 - 1,
        codes.HEADER_TABLE_SIZE: 1 << 20,
        codes.MAX_HEADER_LIST_SIZE: 1 << 24,
    }


class _StreamCopy:
    """One sniffed stream copied to one mirroring connection, as HTTP/2 with prior knowledge,
    stream 1 of its own connection."""

    def __init__(self, end: PipeEnd, headers: Headers, ended: bool, limit: int) -> None:
        self.end = end
        self.limit = limit
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        self.h2.send_headers(1, headers, end_stream=ended)
        self.body = bytearray()
        self.trailers: Headers | None = None
        self.ended = ended  # the client sent all of the request
        self.sent_end = ended
        self.done = False
        self._flush()

    def data(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.limit:
            log.warning("a mirrored HTTP/2 stream's user app fell behind: its copy is dropped")
            self._stop(errno.ENOBUFS)
            return
        self.pump()

    def end_request(self, trailers: Headers | None) -> None:
        self.ended = True
        self.trailers = trailers
        self.pump()

    def reset(self) -> None:
        """The client reset the stream (or the flow ended inside it): so does the copy."""
        if self.done:
            return
        try:
            self.h2.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            self.h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self._flush()
        self._stop()

    def pump(self) -> None:
        """Send what the user app's windows allow; the end of the request after the body."""
        if self.done:
            return
        try:
            while self.body:
                n = min(
                    len(self.body),
                    self.h2.local_flow_control_window(1),
                    self.h2.max_outbound_frame_size,
                )
                if n <= 0:
                    break
                self.h2.send_data(1, bytes(self.body[:n]))
                del self.body[:n]
            if self.ended and not self.body and not self.sent_end:
                self.sent_end = True
                if self.trailers:
                    self.h2.send_headers(1, self.trailers, end_stream=True)
                else:
                    self.h2.end_stream(1)
        except h2.exceptions.ProtocolError:
            self._stop()
            return
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if not data or self.done:
            return
        try:
            fits = self.end.send_nowait(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._stop()
            return
        if not fits:
            self._stop(errno.ENOBUFS)

    def _stop(self, errno_: int = 0) -> None:
        if self.done:
            return
        self.done = True
        if errno_:
            self.end.abort(errno_)
        else:
            self.end.send_eof_nowait()

    async def run(self) -> None:
        """Read the user app's side until its answer to the stream is complete (or it closes,
        or the mirror ends): what it sends moves the request on, and is discarded."""
        try:
            while not self.done:
                data = await self.end.receive(_READ)
                for ev in self.h2.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived) and ev.stream_id:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, 1)
                    elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                        self.h2.close_connection()
                        self._flush()
                        self._stop()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        self._stop()
                self.pump()
                self._flush()
        except (
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            h2.exceptions.ProtocolError,
        ):
            pass
        finally:
            self.done = True
            self.end.close_nowait()


class MirrorH2Flow:
    """The client's half of one sniffed HTTP/2 connection, cut into streams. `open_copies`
    opens the mirrored connections a stream's head matches; `spawn` runs each copy's reader
    in the mirror's task group; `limit`: request bytes a copy may hold for a slow user app."""

    def __init__(self, open_copies: OpenCopies, spawn: Spawn, limit: int) -> None:
        self._open = open_copies
        self._spawn = spawn
        self._limit = limit
        self._buf = bytearray()  # until the preface is complete
        self._h2: h2.connection.H2Connection | None = None
        self.failed = False
        self.copies: dict[int, list[_StreamCopy]] = {}  # streams whose request goes on
        self._live: list[_StreamCopy] = []  # every copy whose user app may still answer

    def __repr__(self) -> str:
        return f"<MirrorH2Flow streams={sorted(self.copies)} failed={self.failed}>"

    def receive(self, data: bytes) -> None:
        if self.failed or not data:
            return
        if self._h2 is None:
            self._buf += data
            if len(self._buf) < len(H2_PREFACE):
                return
            if not is_h2_preface(self._buf):
                self.failed = True
                return
            data = self._start(bytes(self._buf[len(H2_PREFACE) :]))
            self._buf.clear()
        assert self._h2 is not None
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("a mirrored HTTP/2 flow broke the protocol (%s): no longer mirrored", exc)
            self.close(reset=True)
            self.failed = True
            return
        self._h2.clear_outbound_data_buffer()  # the pod's app answers the client, not us
        for ev in events:
            self._event(ev)

    def _start(self, rest: bytes) -> bytes:
        """A server-side parser that grants the client everything: its SETTINGS are taken as
        acknowledged at once (an ACK fed in after the preface)."""
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
            )
        )
        conn.local_settings = h2.settings.Settings(client=False, initial_values=_sniff_settings())
        conn.initiate_connection()
        conn.increment_flow_control_window(_MAX_WINDOW - 65535)
        conn.clear_outbound_data_buffer()
        self._h2 = conn
        return H2_PREFACE + SettingsFrame(0, flags=["ACK"]).serialize() + rest

    def _event(self, ev: h2.events.Event) -> None:
        assert self._h2 is not None
        sid = getattr(ev, "stream_id", None) or 0
        if isinstance(ev, h2.events.RequestReceived):
            self._new_stream(sid, list(ev.headers or []), ev.stream_ended is not None)
        elif isinstance(ev, h2.events.DataReceived):
            if ev.flow_controlled_length:
                self._h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            for copy in self.copies.get(sid, []):
                copy.data(ev.data or b"")
        elif isinstance(ev, h2.events.TrailersReceived):
            for copy in self.copies.pop(sid, []):
                copy.end_request(list(ev.headers or []))
        elif isinstance(ev, h2.events.StreamEnded):
            for copy in self.copies.pop(sid, []):
                copy.end_request(None)
        elif isinstance(ev, h2.events.StreamReset):
            for copy in self.copies.pop(sid, []):
                copy.reset()

    def _new_stream(self, sid: int, headers: Headers, ended: bool) -> None:
        ends = self._open(head_from_headers(headers))
        copies = [_StreamCopy(end, headers, ended, self._limit) for end in ends]
        self._live = [c for c in self._live if not c.done] + copies
        for copy in copies:
            self._spawn(copy.run)
        if copies and not ended:
            self.copies[sid] = copies

    def close(self, *, reset: bool) -> None:
        """The flow ended: copies of streams still in progress are reset toward the user app
        (their request is incomplete); finished ones wait for the app's answer. `reset` (the
        mirror ends): every copy closes now."""
        for copies in self.copies.values():
            for copy in copies:
                copy.reset()
        self.copies.clear()
        if reset:
            self.failed = True
            for copy in self._live:
                copy.done = True
                copy.end.close_nowait()
            self._live.clear()
