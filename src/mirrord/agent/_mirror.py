"""Mirror: sniffing a target's incoming TCP traffic and turning it back into byte streams.

Owns: the `AF_PACKET` socket (created in the target's network namespace) with a kernel BPF
filter for the mirrored ports, the fast-path frame parser (`struct`, no scapy per packet), the
per-flow TCP reassembly (`Reassembler`, sans-IO: out of order, retransmits, FIN/RST), and the
kernel drop counters (`PACKET_STATISTICS`). Does not own delivering flows to channels
(`_incoming.py`).

Why not scapy's sniffer: dissecting one packet with scapy costs ~125 µs and its default socket
buffer drops from ~5k packets/s (notes/linux.md). scapy is used where it is good: compiling the
BPF filter (libpcap through ctypes) and its socket structures.

Only client -> server bytes are mirrored (the session's replies are discarded), so the filter
selects `tcp dst port P`, without the client's pure ACKs over IPv4 (no payload, no SYN, FIN or
RST). A flow is mirrored from its SYN: connections that were open before the subscription are
not picked up mid-stream (there is no way to know where their requests start). A flow silent
for FLOW_IDLE_TIMEOUT is ended unless the target still has its connection
(`live_connections`: the namespace's /proc TCP tables).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "FlowClosed",
    "FlowData",
    "FlowOpened",
    "PacketSniffer",
    "Reassembler",
    "bpf_expression",
    "live_connections",
    "parse_frame",
]

ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263
PACKET_STATISTICS: Final = 6
PACKET_OUTGOING: Final = 4
SO_RCVBUFFORCE: Final = 33
SO_ATTACH_FILTER: Final = 26
RCVBUF: Final = 64 * 1024 * 1024  # MIRRORD_AGENT_SNIFFER_BUFFER (bytes) overrides it
# veth GRO hands us frames up to ~64 KiB (and more with BIG TCP): one recv must hold one.
RECV_SIZE: Final = 256 * 1024
MAX_BATCH: Final = 512  # frames drained per wake-up before handing events over
MAX_OUT_OF_ORDER: Final = 4 * 1024 * 1024  # bytes buffered ahead of a gap, per flow
FLOW_IDLE_TIMEOUT: Final = 600.0  # seconds without a packet before a flow is forgotten
EXPIRE_EVERY: Final = 30.0  # seconds between two looks for idle flows

FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
ACK: Final = 0x10

_ETH = struct.Struct("!12xH")
_IPV4 = struct.Struct("!BxH5xB2x4s4s")
_IPV6 = struct.Struct("!4xHBx16s16s")
_TCP = struct.Struct("!HHIIBB")

FlowKey = tuple[str, int, str, int]


# A segment with neither payload nor SYN, FIN or RST (a pure ACK: about one per request and
# answer) says nothing the reassembly needs: the kernel drops it, so that it neither wakes the
# agent nor costs a read. (A flow that only acknowledges for a long time, a download, is kept
# by `expire`'s look at the target's connections, not by its ACKs.) pcap's `tcp[...]` reads
# IPv4 only, so IPv6 is read by offsets: the TCP header right after the 40-byte fixed header
# (next header 6); a segment behind extension headers passes, as `parse_frame` skips it anyway.
_NOT_PURE_ACK = (
    "((ip and (tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0"
    " or ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2) != 0))"
    " or (ip6 and (ip6[6] != 6 or ip6[53] & 0x07 != 0"
    " or ip6[4:2] - ((ip6[52] & 0xf0) >> 2) != 0)))"
)


def bpf_expression(ports: set[int] | frozenset[int]) -> str:
    """pcap filter text for the mirrored ports (server side: segments *to* the port that
    carry bytes or open or close the flow)."""
    if not ports:
        return "less 1"  # matches nothing: a frame is never shorter than 1 byte
    dst = " or ".join(f"dst port {p}" for p in sorted(ports))
    return f"tcp and ({dst}) and {_NOT_PURE_ACK}"


def parse_frame(frame: memoryview | bytes) -> tuple[FlowKey, int, int, bytes] | None:
    """An Ethernet frame -> ((src, sport, dst, dport), seq, flags, payload), or None when it is
    not a TCP segment we understand (IPv4 or IPv6 without extension headers)."""
    n = len(frame)
    if n < 14:
        return None
    (ethertype,) = _ETH.unpack_from(frame, 0)
    off = 14
    if ethertype == 0x8100 and n >= 18:  # one VLAN tag
        (ethertype,) = struct.unpack_from("!H", frame, 16)
        off = 18
    if ethertype == 0x0800:
        if n < off + 20:
            return None
        vihl, total, proto, src_raw, dst_raw = _IPV4.unpack_from(frame, off)
        if proto != 6 or vihl >> 4 != 4:
            return None
        ihl = (vihl & 0x0F) * 4
        # total 0: a GSO super-frame bigger than 64 KiB; the frame length is the truth.
        end = off + total if total else n
        tcp = off + ihl
        src, dst = (
            socket.inet_ntop(socket.AF_INET, src_raw),
            socket.inet_ntop(socket.AF_INET, dst_raw),
        )
    elif ethertype == 0x86DD:
        if n < off + 40:
            return None
        plen, nxt, src_raw, dst_raw = _IPV6.unpack_from(frame, off)
        if nxt != 6:
            return None
        tcp = off + 40
        end = tcp + plen if plen else n
        src, dst = (
            socket.inet_ntop(socket.AF_INET6, src_raw),
            socket.inet_ntop(socket.AF_INET6, dst_raw),
        )
    else:
        return None
    end = min(end, n)
    if end < tcp + 20:
        return None
    sport, dport, seq, _ack, doff, flags = _TCP.unpack_from(frame, tcp)
    data_off = tcp + (doff >> 4) * 4
    payload = bytes(frame[data_off:end]) if end > data_off else b""
    return (src, sport, dst, dport), seq, flags, payload


# ---------------------------------------------------------------- reassembly


@dataclass(frozen=True, slots=True)
class FlowOpened:
    flow: int
    key: FlowKey


@dataclass(frozen=True, slots=True)
class FlowData:
    flow: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FlowClosed:
    """`reset`: the client reset the connection, or we lost bytes (a gap we could not fill)."""

    flow: int
    reset: bool


FlowEvent = FlowOpened | FlowData | FlowClosed


def _after(a: int, b: int) -> int:
    """Signed distance a - b in sequence space."""
    d = (a - b) & 0xFFFFFFFF
    return d - 0x100000000 if d >= 0x80000000 else d


class _Flow:
    __slots__ = ("fin_seq", "id", "isn", "last_seen", "next_seq", "ooo", "ooo_bytes")

    def __init__(self, flow_id: int, isn: int, now: float) -> None:
        self.id = flow_id
        self.isn = isn
        self.next_seq = (isn + 1) & 0xFFFFFFFF
        self.ooo: dict[int, bytes] = {}
        self.ooo_bytes = 0
        self.fin_seq: int | None = None
        self.last_seen = now


class Reassembler:
    """Per-flow TCP reassembly of one direction (client -> server). Sans-IO: `feed()` one
    parsed segment, get the events it completes."""

    def __init__(self) -> None:
        self._flows: dict[FlowKey, _Flow] = {}
        self._next_id = 1
        self.segments = 0

    def __repr__(self) -> str:
        return f"<Reassembler flows={len(self._flows)} segments={self.segments}>"

    @property
    def flows(self) -> int:
        return len(self._flows)

    def feed(
        self, key: FlowKey, seq: int, flags: int, payload: bytes, now: float = 0.0
    ) -> list[FlowEvent]:
        self.segments += 1
        out: list[FlowEvent] = []
        flow = self._flows.get(key)
        if flags & SYN:
            if flow is not None and flow.isn == seq:
                flow.last_seen = now
                return out  # a retransmitted SYN
            if flow is not None:  # the port pair was reused: the old flow is over
                out.append(FlowClosed(flow.id, reset=True))
            flow = _Flow(self._next_id, seq, now)
            self._next_id += 1
            self._flows[key] = flow
            out.append(FlowOpened(flow.id, key))
            if payload:  # TCP Fast Open data rides on the SYN
                self._segment(flow, flow.next_seq, payload, out)
            return out
        if flow is None:
            return out  # began before we listened: not mirrored
        flow.last_seen = now
        if flags & RST:
            del self._flows[key]
            out.append(FlowClosed(flow.id, reset=True))
            return out
        if payload:
            self._segment(flow, seq, payload, out)
        if flags & FIN:
            flow.fin_seq = (seq + len(payload)) & 0xFFFFFFFF
        if flow.ooo_bytes > MAX_OUT_OF_ORDER:
            del self._flows[key]
            out.append(FlowClosed(flow.id, reset=True))
            return out
        if flow.fin_seq is not None and flow.next_seq == flow.fin_seq:
            del self._flows[key]
            out.append(FlowClosed(flow.id, reset=False))
        return out

    def _segment(self, flow: _Flow, seq: int, payload: bytes, out: list[FlowEvent]) -> None:
        ahead = _after(seq, flow.next_seq)
        if ahead > 0:
            # A gap before it: keep it (the longest copy of a segment wins) until filled.
            old = flow.ooo.get(seq)
            if old is None or len(old) < len(payload):
                flow.ooo_bytes += len(payload) - (len(old) if old else 0)
                flow.ooo[seq] = payload
            return
        if -ahead >= len(payload):
            return  # all of it was delivered already (a retransmit)
        data = payload[-ahead:]
        flow.next_seq = (flow.next_seq + len(data)) & 0xFFFFFFFF
        out.append(FlowData(flow.id, data))
        while flow.ooo:
            progressed = False
            for s in list(flow.ooo):
                d = _after(s, flow.next_seq)
                if d > 0:
                    continue
                chunk = flow.ooo.pop(s)
                flow.ooo_bytes -= len(chunk)
                if -d < len(chunk):
                    tail = chunk[-d:]
                    flow.next_seq = (flow.next_seq + len(tail)) & 0xFFFFFFFF
                    out.append(FlowData(flow.id, tail))
                progressed = True
            if not progressed:
                break

    def has_idle(self, now: float, idle: float = FLOW_IDLE_TIMEOUT) -> bool:
        """Whether some flow has been silent for `idle` seconds."""
        return any(now - flow.last_seen > idle for flow in self._flows.values())

    def expire(
        self,
        now: float,
        idle: float = FLOW_IDLE_TIMEOUT,
        live: Container[FlowKey] = (),
    ) -> list[FlowEvent]:
        """Forget flows silent for `idle` seconds (their FIN/RST was lost to us), but those
        in `live` (the target still has the connection: a client that only acknowledges, or
        says nothing for a while, as a pooled connection does), which start a new silence."""
        out: list[FlowEvent] = []
        for key, flow in list(self._flows.items()):
            if now - flow.last_seen > idle:
                if key in live:
                    flow.last_seen = now
                    continue
                del self._flows[key]
                out.append(FlowClosed(flow.id, reset=True))
        return out


# The TCP states (include/net/tcp_states.h) of a connection that goes on: ESTABLISHED,
# SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING.
_LIVE_STATES: Final = frozenset({"01", "03", "04", "05", "08", "09", "0B"})


def _hex_address(text: str) -> tuple[str, int]:
    """`/proc/net/tcp{,6}`'s "ADDR:PORT": the address in 32-bit words of host order."""
    addr, port = text.split(":")
    raw = b"".join(int(addr[i : i + 8], 16).to_bytes(4, "little") for i in range(0, len(addr), 8))
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        raw = raw[12:]
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def live_connections(net: str = "/proc/thread-self/net") -> set[FlowKey]:
    """The TCP connections of the calling thread's network namespace that go on, as the
    sniffer keys them: (remote address, remote port, local address, local port)."""
    live: set[FlowKey] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{net}/{name}") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] in _LIVE_STATES:
                        local, remote = _hex_address(fields[1]), _hex_address(fields[2])
                        live.add((remote[0], remote[1], local[0], local[1]))
        except (OSError, ValueError):
            continue  # no IPv6 in the namespace, or a line we do not understand
    return live


# ---------------------------------------------------------------- the socket


def sniffer_buffer() -> int:
    """The sniffer's receive buffer: `MIRRORD_AGENT_SNIFFER_BUFFER` bytes (a node short of
    memory may want less; the kernel doubles it and keeps a small minimum), else RCVBUF."""
    raw = os.environ.get("MIRRORD_AGENT_SNIFFER_BUFFER", "").strip()
    try:
        value = int(raw) if raw else RCVBUF
    except ValueError:
        return RCVBUF
    return value if value > 0 else RCVBUF


# Classic BPF (linux/filter.h): `ld [SKF_AD_OFF + SKF_AD_MARK]` loads skb->mark.
_BPF_LD_W_ABS: Final = 0x20
_BPF_JEQ_K: Final = 0x15
_BPF_RET_K: Final = 0x06
_SKF_AD_MARK: Final = -0x1000 + 20  # SKF_AD_OFF + SKF_AD_MARK


def _attach_bpf(sock: socket.socket, expression: str, exclude_mark: int | None = None) -> None:
    import ctypes

    from scapy.arch.common import compile_filter
    from scapy.arch.linux import free_filter  # type: ignore[attr-defined]
    from scapy.libs.structures import bpf_insn, sock_fprog

    bp = compile_filter(expression, linktype=1)  # DLT_EN10MB: veth and lo both carry Ethernet
    try:
        if exclude_mark is None:
            prog = sock_fprog(bp.bf_len, bp.bf_insns)
        else:
            # Packets carrying `exclude_mark` (the agent's own connections to the target's
            # app: unmatched filtered requests) are dropped first: they repeat a client's
            # request that the sniffer already saw arrive. The mark survives the loopback
            # device, which is where those connections go. Jumps of the compiled program
            # are relative, so prepending keeps them right.
            head = [
                (_BPF_LD_W_ABS, 0, 0, _SKF_AD_MARK),
                (_BPF_JEQ_K, 0, 1, exclude_mark),
                (_BPF_RET_K, 0, 0, 0),
            ]
            insns = (bpf_insn * (len(head) + bp.bf_len))()
            for i, (code, jt, jf, k) in enumerate(head):
                insns[i] = bpf_insn(code, jt, jf, k)
            for i in range(bp.bf_len):
                insns[len(head) + i] = bp.bf_insns[i]
            prog = sock_fprog(len(insns), ctypes.cast(insns, ctypes.POINTER(bpf_insn)))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
    finally:
        free_filter(bp)


class PacketSniffer:
    """The AF_PACKET socket of the mirror. `open` runs `make_socket` (which must create the
    socket in the target's network namespace, and is its runner there). On an event loop:
    wait until `fileno()` is readable, then `drain()` (never blocks); now and then, when
    `expiry_due()`, `live_connections()` (blocking) then `expire_idle()`.

    Counters: `packets` (TCP segments parsed), `per_port` (segments per destination port),
    `drops` (kernel drops since open: `PACKET_STATISTICS`, which resets on every read)."""

    def __init__(
        self,
        make_socket: Callable[[Callable[[], Any]], Any],
        *,
        exclude_mark: int | None = None,
    ) -> None:
        self.exclude_mark = exclude_mark
        self._in_netns = make_socket  # runs a callable in the target's network namespace

        def create() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                _attach_bpf(s, bpf_expression(set()))
                size = sniffer_buffer()
                try:
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                except PermissionError:  # no CAP_NET_ADMIN: the best the sysctl allows
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            return s

        self._sock: socket.socket = make_socket(create)
        # Frames queued before the first filter was attached could be anything: drain them.
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv(RECV_SIZE)
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self.reassembler = Reassembler()
        self.ports: frozenset[int] = frozenset()
        self.packets = 0
        self.kernel_packets = 0
        self.drops = 0
        self.per_port: dict[int, int] = {}
        self._last_expire = time.monotonic()
        self.full = False  # the last drain() stopped at MAX_BATCH
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<PacketSniffer ports={sorted(self.ports)} packets={self.packets} "
            f"drops={self.drops} {self.reassembler!r}>"
        )

    def set_ports(self, ports: set[int] | frozenset[int]) -> None:
        """Replace the kernel filter (atomic in the kernel: no packet sees no filter)."""
        _attach_bpf(self._sock, bpf_expression(ports), self.exclude_mark)
        self.ports = frozenset(ports)

    def statistics(self) -> dict[str, int]:
        """Reads (and so resets) the kernel counters, accumulating them here."""
        if not self.closed:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            packets, drops = struct.unpack("II", raw)
            self.kernel_packets += packets
            self.drops += drops
        return {"packets": self.packets, "kernel_packets": self.kernel_packets, "drops": self.drops}

    def fileno(self) -> int:
        """The packet socket's fd: wait for it to be readable, then `drain()`."""
        return self._sock.fileno()

    def drain(self) -> list[Any]:
        """Read what is queued, up to MAX_BATCH frames, without waiting; return the flow
        events. `full` says afterwards whether the batch stopped at MAX_BATCH (more may be
        queued)."""
        events: list[Any] = []
        self.full = False
        if self.closed:
            return events
        now = time.monotonic()
        recv = self._sock.recvfrom_into
        view = self._view
        for _ in range(MAX_BATCH):
            try:
                n, addr = recv(self._buf)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    return events
                raise
            if addr[2] == PACKET_OUTGOING:
                continue  # pod -> itself on lo is seen twice: keep the arriving copy
            parsed = parse_frame(view[:n])
            if parsed is None:
                continue
            key, seq, flags, payload = parsed
            if key[3] not in self.ports:
                continue  # queued under an older filter
            self.packets += 1
            self.per_port[key[3]] = self.per_port.get(key[3], 0) + 1
            events += self.reassembler.feed(key, seq, flags, payload, now)
        self.full = True
        return events

    def expiry_due(self, now: float | None = None) -> bool:
        """Whether a look for idle flows is due (once per EXPIRE_EVERY) and some flow has
        been silent for FLOW_IDLE_TIMEOUT: `live_connections()`, then `expire_idle()`."""
        now = time.monotonic() if now is None else now
        if self.closed or now - self._last_expire < EXPIRE_EVERY:
            return False
        self._last_expire = now
        return self.reassembler.has_idle(now)

    def live_connections(self) -> set[FlowKey]:
        """The target's TCP connections that go on (blocking: its network namespace's
        thread reads its `/proc` tables)."""
        result: set[FlowKey] = self._in_netns(live_connections)
        return result

    def expire_idle(self, now: float | None = None, live: Container[FlowKey] = ()) -> list[Any]:
        """End the flows silent for FLOW_IDLE_TIMEOUT that are not among the target's `live`
        connections (their FIN or RST was lost to us)."""
        if self.closed:
            return []
        return list(self.reassembler.expire(time.monotonic() if now is None else now, live=live))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
