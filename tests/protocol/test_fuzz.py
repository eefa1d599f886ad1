"""Fuzzing both decoders: random and mutated frames give protocol errors only, in bounded memory."""

from __future__ import annotations

import random
import struct
import tracemalloc

import cbor2

from mirrord.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    AgentConnection,
    LayerConnection,
    Message,
    ProtocolError,
    State,
    messages,
)
from tests.protocol.helpers import agent_pair, layer_pair

FRAMES_PER_DECODER = 100_000
_SEED_MESSAGES: list[Message] = [
    messages.FileOpen(request_id=1, path=b"/app/test.txt", flags=0, mode=0o644),
    messages.FileData(request_id=2, data=b"hello" * 20),
    messages.StatReply(request_id=3, stat=list(range(13))),
    messages.DirEntries(request_id=4, entries=[(b"a", 1, 8), (b"bb", 2, 4)]),
    messages.DnsReply(request_id=5, addresses=[(2, 1, 6, "10.0.0.1", 80)], canonname="x"),
    messages.EnvReply(request_id=6, env={"A": "1", "B": "2"}),
    messages.ErrorReply(request_id=7, errno=2, message="No such file"),
    messages.Fatal(code="x", message="y"),
]
_AGENT_SEEDS: list[Message] = [
    *_SEED_MESSAGES,
    messages.Connect(request_id=8, conn_id=2, protocol="tcp", address="10.1.2.3", port=80),
    messages.Data(conn_id=2, data=b"GET / HTTP/1.1\r\n\r\n"),
    messages.Subscribe(request_id=9, port=80, mode="steal", http_filter={"header_filter": "a"}),
    messages.ChannelOpen(pid=10, parent=1, label="python3"),
]
_LAYER_SEEDS: list[Message] = [
    *_SEED_MESSAGES,
    messages.LayerConnect(request_id=8, protocol="udp", address="1.2.3.4", port=53),
    messages.LayerListen(request_id=9, port=80, bound_address="0.0.0.0", bound_port=8080),
    messages.PeerReply(request_id=10, address="10.0.0.9", port=4444),
]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        if choice == 0 and data:  # flip a bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and data:  # truncate
            del data[rng.randrange(len(data)) :]
        elif choice == 2:  # insert random bytes
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        elif choice == 3 and len(data) >= 4:  # lie about the length
            data[:4] = struct.pack(">I", rng.choice([0, 1, len(data), 2**31, MAX_FRAME_SIZE + 1]))
        elif choice == 4 and len(data) > 5:  # replace a CBOR byte with a random major type
            data[rng.randrange(4, len(data))] = rng.randrange(256)
        elif choice == 5:  # deep nesting
            depth = rng.randint(1, 5000)
            payload = b"\x81" * depth + b"\x00"
            data = bytearray(struct.pack(">I", len(payload)) + payload)
        else:  # a random CBOR item of the wrong shape
            item: object = rng.choice(
                [[], {}, "x", 1.5, None, [rng.randint(-5, 400)] * rng.randint(0, 9)]
            )
            payload = cbor2.dumps(item)
            data = bytearray(struct.pack(">I", len(payload)) + payload)
    return bytes(data)


def _random_frame(rng: random.Random) -> bytes:
    payload = rng.randbytes(rng.randint(0, 64))
    return struct.pack(">I", len(payload)) + payload


def _feed(conn: AgentConnection | LayerConnection, frame: bytes) -> None:
    try:
        conn.receive_data(frame)
        for _ in range(64):
            if conn.next_event() is NEED_DATA:
                break
    except ProtocolError:
        pass  # the only kind of error allowed


def _fuzz(make_conn: object, seeds: list[bytes], seed: int) -> None:
    rng = random.Random(seed)
    tracemalloc.start()
    try:
        conn = make_conn()  # type: ignore[operator]
        for i in range(FRAMES_PER_DECODER):
            if conn.state is not State.OPEN:
                conn = make_conn()  # type: ignore[operator]
            frame = _random_frame(rng) if i % 3 == 0 else _mutate(rng, rng.choice(seeds))
            _feed(conn, frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One frame is at most MAX_FRAME_SIZE; nothing may accumulate across frames.
    assert peak < 4 * MAX_FRAME_SIZE


def test_fuzz_agent_decoder() -> None:
    daemon, _ = agent_pair()
    seeds = [daemon.send(m, 1) for m in _AGENT_SEEDS if not isinstance(m, messages.Data)]
    _fuzz(lambda: agent_pair()[1], seeds, seed=1)


def test_fuzz_layer_decoder() -> None:
    layer, _ = layer_pair()
    seeds = [layer.send(m) for m in _LAYER_SEEDS]
    _fuzz(lambda: layer_pair()[1], seeds, seed=2)


def test_one_long_garbage_stream_stays_bounded() -> None:
    rng = random.Random(3)
    _, agent = agent_pair()
    for _ in range(2000):
        _feed(agent, rng.randbytes(4096))
    assert agent._decoder.buffered <= MAX_FRAME_SIZE + 4096
