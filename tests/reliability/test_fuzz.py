"""Fuzz of the three sockets a session exposes, each beside a healthy session that must keep
working throughout, with the daemon's and the agent's memory bounded:

- the daemon's control socket (`mirrordd.sock`, JSON lines): mutated valid requests and garbage
  lines, each answered;
- the daemon's layer socket (`layer.sock`, CBOR frames): without the handshake, and after a
  valid `LayerHello` into the healthy session;
- the agent's socket (CBOR frames): without the secret (no `Hello`, or a wrong secret), and
  after a valid `Hello` and `ChannelOpen`.

Frames are seeded random mutations of valid frames (`tests/protocol/test_fuzz.py`'s mutator and
seeds) and random bytes. A frame that decodes (with the same sans-IO decoder, fed the same
handshake) into a message that would change the pod or the network outside the pod — writes,
renames, subscriptions, connections beyond loopback — is drawn again: the fuzz checks the
decoder and the handlers' bad-input paths, not that a valid request does what it says.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import time
from collections.abc import Callable

import pytest

from mirrord.layer import build_id
from mirrord.protocol import (
    AgentConnection,
    AgentRole,
    LayerConnection,
    LayerRole,
    Message,
    ProtocolError,
    Received,
)
from mirrord.protocol import messages as m
from tests.protocol.helpers import agent_pair, drain, layer_pair
from tests.protocol.test_fuzz import _AGENT_SEEDS, _LAYER_SEEDS, _mutate, _random_frame
from tests.reliability._session import Scene, assert_healthy, healthy_scene
from tests.reliability.conftest import Size, record_figures, rss_kib

pytestmark = pytest.mark.netns

RSS_GROWTH_LIMIT_KIB = 64 * 1024  # the daemon's or agent's RSS may grow this much, no more
CHECK_EVERY = 250  # frames between two checks of the healthy session
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGES_THE_POD = (
    m.FileWrite,
    m.Mkdir,
    m.Rmdir,
    m.Unlink,
    m.Rename,
    m.Ftruncate,
    m.Fchmod,
    m.Utimens,
    m.Chown,
    m.Symlink,
    m.Link,
    m.Subscribe,
    m.Unsubscribe,
    m.LayerListen,
    m.LayerUnlisten,
)


def harmless(msg: Message) -> bool:
    """False for a request that would change the pod's files or traffic, or reach beyond
    loopback (tests only target addresses of namespaces they made)."""
    if isinstance(msg, _CHANGES_THE_POD):
        return False
    if isinstance(msg, m.FileOpen) and msg.flags & _WRITE_FLAGS:
        return False
    if isinstance(msg, m.Connect | m.LayerConnect):
        return msg.address in ("127.0.0.1", "::1", "localhost")
    return True


class Verdict:
    SEND = "send"  # decodes to harmless messages: the connection stays open
    SEND_AND_CLOSE = "send-and-close"  # malformed or incomplete: the peer drops (or waits)
    REDRAW = "redraw"


def _verdict(conn: AgentConnection | LayerConnection, frame: bytes) -> str:
    try:
        conn.receive_data(frame)
        events = drain(conn)
    except ProtocolError:
        return Verdict.SEND_AND_CLOSE
    if conn._decoder.buffered:
        return Verdict.SEND_AND_CLOSE  # incomplete: never let the next frame complete it
    for event in events:
        if isinstance(event, Received) and not harmless(event.message):
            return Verdict.REDRAW
    return Verdict.SEND


def agent_verdict(frame: bytes) -> str:
    daemon, agent = agent_pair()
    agent.receive_data(daemon.send(m.ChannelOpen(pid=1, label="fuzz"), 1))  # as sent for real
    drain(agent)
    return _verdict(agent, frame)


def layer_verdict(frame: bytes) -> str:
    daemon = LayerConnection(LayerRole.DAEMON, build_id="b")
    layer = LayerConnection(LayerRole.LAYER, build_id="b")
    daemon.receive_data(layer.hello(session="s", pid=1))
    drain(daemon)
    daemon.welcome(process=1)
    return _verdict(daemon, frame)


def drain_socket(sock: socket.socket) -> bool:
    """Reads whatever the peer sent (so its replies never pile up); False once it closed."""
    timeout = sock.gettimeout()
    sock.settimeout(0)  # with a timeout set, Python would wait for data first
    try:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
    finally:
        sock.settimeout(timeout)


class Fuzzer:
    """Sends `count` frames to a unix socket, reconnecting (and re-opening with `opening`) after
    each frame the peer drops the connection for; the healthy session is checked every
    CHECK_EVERY frames."""

    def __init__(
        self,
        path: str,
        opening: Callable[[], bytes],
        verdict: Callable[[bytes], str],
        seeds: list[bytes],
        seed: int,
    ) -> None:
        self.path = path
        self.opening = opening
        self.verdict = verdict
        self.seeds = seeds
        self.rng = random.Random(seed)
        self.sock: socket.socket | None = None
        self.connections = 0
        self.refused_writes = 0

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            try:
                sock.connect(self.path)
                break
            except BlockingIOError:
                # the listen backlog is full (we connect faster than the peer accepts)
                sock.close()
                assert time.monotonic() < deadline, "the peer accepted nothing for 10 s"
                time.sleep(0.01)
            except BaseException:
                sock.close()
                raise
        self.connections += 1
        opening = self.opening()
        if opening:
            sock.sendall(opening)
        return sock

    def draw(self) -> tuple[bytes, str]:
        for _ in range(1000):
            if self.rng.random() < 0.3:
                frame = _random_frame(self.rng)
            else:
                frame = _mutate(self.rng, self.rng.choice(self.seeds))
            verdict = self.verdict(frame)
            if verdict != Verdict.REDRAW:
                return frame, verdict
        raise AssertionError("no harmless frame in 1000 draws")

    def send_one(self) -> None:
        frame, verdict = self.draw()
        if self.sock is None:
            self.sock = self._connect()
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            # the peer already dropped us (after the previous frame): that is allowed
            assert exc.errno in (errno.EPIPE, errno.ECONNRESET), exc
            self.refused_writes += 1
        alive = drain_socket(self.sock)
        if verdict == Verdict.SEND_AND_CLOSE or not alive:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def fuzz(
    scene: Scene, fuzzers: list[Fuzzer], frames: int, watched: dict[str, int]
) -> dict[str, object]:
    """Sends `frames` frames, spread over `fuzzers`, checking the healthy session; returns the
    figures (RSS of the watched processes before/after in KiB, connections, time)."""
    before = {name: rss_kib(pid) for name, pid in watched.items()}
    started = time.monotonic()
    checked = time.monotonic()
    try:
        for i in range(frames):
            fuzzers[i % len(fuzzers)].send_one()
            if (i + 1) % CHECK_EVERY == 0:
                assert_healthy(scene, checked)
                checked = time.monotonic()
    finally:
        for fuzzer in fuzzers:
            fuzzer.close()
    assert_healthy(scene, checked)
    after = {name: rss_kib(pid) for name, pid in watched.items()}
    figures: dict[str, object] = {
        "frames": frames,
        "seconds": round(time.monotonic() - started, 1),
        "connections": sum(f.connections for f in fuzzers),
    }
    for name in watched:
        figures[f"{name}_rss_kib_before"] = before[name]
        figures[f"{name}_rss_kib_after"] = after[name]
    for name in watched:
        assert after[name] - before[name] < RSS_GROWTH_LIMIT_KIB, figures
    return figures


# -- the control socket ---------------------------------------------------------------------------

_CONTROL_SEEDS = [
    {"id": 1, "op": "status"},
    {"id": 2, "op": "list_sessions"},
    {"id": 3, "op": "session", "session": "0123456789abcdef"},
    {"id": 4, "op": "close_session", "session": "fedcba9876543210", "reason": "fuzz"},
    {"id": 5, "op": "nonsense", "x": [1, 2, {"y": None}]},
]
# A control request that would end the healthy session, the daemon, or start agents.
_CONTROL_DENIED = {"shutdown", "create_session", "wait_session"}


def _mutate_line(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(8)
        if choice == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif choice == 2:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        elif choice == 3:
            depth = rng.randint(1, 100_000)
            data = bytearray(b"[" * depth + b"]" * rng.choice([0, depth]))
        elif choice == 4:
            data = bytearray(
                json.dumps({"id": rng.randint(-(2**70), 2**70), "op": "status"}), "utf-8"
            )
        elif choice == 5:
            data = bytearray(b'{"id": 1, "op": "' + b"\xff\xfe" * rng.randint(1, 4) + b'"}')
        elif choice == 6:
            data = bytearray(
                json.dumps(rng.choice([[], "x", 1.5, None, True, {"op": None}])), "utf-8"
            )
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(data).replace(b"\n", b" ")


def _control_denied(line: bytes) -> bool:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(request, dict) and request.get("op") in _CONTROL_DENIED


def test_fuzz_control_socket(scene_factory: Callable[[str], Scene], size: Size) -> None:
    scene, daemon, agent = healthy_scene(scene_factory)
    rng = random.Random(20)
    seeds = [json.dumps(seed).encode() for seed in _CONTROL_SEEDS]
    path = str(scene.cli.runtime / "mirrordd.sock")
    codes: dict[str, int] = {}
    before = rss_kib(daemon)
    started = checked = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    reader = sock.makefile("rb")
    connections = 1
    try:
        for i in range(size.fuzz_frames):
            line = _mutate_line(rng, rng.choice(seeds))
            while not line.strip() or _control_denied(line):
                line = _mutate_line(rng, rng.choice(seeds))
            sock.sendall(line + b"\n")
            reply_line = reader.readline()
            if not reply_line:  # the daemon closed this connection (a reason was sent first)
                sock.close()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(20)
                sock.connect(path)
                reader = sock.makefile("rb")
                connections += 1
                codes["closed"] = codes.get("closed", 0) + 1
                continue
            reply = json.loads(reply_line)
            assert isinstance(reply, dict) and "ok" in reply, reply
            code = "ok" if reply["ok"] else str(reply["error"]["code"])
            codes[code] = codes.get(code, 0) + 1
            if (i + 1) % CHECK_EVERY == 0:
                assert_healthy(scene, checked)
                checked = time.monotonic()
    finally:
        reader.close()
        sock.close()
    assert_healthy(scene, checked)
    after = rss_kib(daemon)
    figures = {
        "frames": size.fuzz_frames,
        "seconds": round(time.monotonic() - started, 1),
        "connections": connections,
        "replies": codes,
        "daemon_rss_kib_before": before,
        "daemon_rss_kib_after": after,
    }
    record_figures("test_fuzz_control_socket", figures)
    assert after - before < RSS_GROWTH_LIMIT_KIB, figures
    del agent


# -- the layer socket -----------------------------------------------------------------------------


def test_fuzz_layer_socket(scene_factory: Callable[[str], Scene], size: Size) -> None:
    scene, daemon, agent = healthy_scene(scene_factory)
    path = str(scene.cli.runtime / "layer.sock")
    session = scene.session_id()
    build = build_id()
    encoder, _ = layer_pair()
    seeds = [encoder.send(msg) for msg in _LAYER_SEEDS if harmless(msg)]

    def hello() -> bytes:
        return LayerConnection(LayerRole.LAYER, build_id=build).hello(
            session=session, pid=os.getpid()
        )

    fuzzers = [
        Fuzzer(path, lambda: b"", layer_verdict_without_handshake, seeds, seed=21),
        Fuzzer(path, hello, layer_verdict, seeds, seed=22),
    ]
    figures = fuzz(scene, fuzzers, size.fuzz_frames, {"daemon": daemon, "agent": agent})
    record_figures("test_fuzz_layer_socket", figures)


def layer_verdict_without_handshake(frame: bytes) -> str:
    daemon = LayerConnection(LayerRole.DAEMON, build_id="b")
    verdict = _verdict(daemon, frame)
    # the first frame must be LayerHello: whatever else decodes, the daemon drops the connection
    return Verdict.SEND_AND_CLOSE if verdict == Verdict.SEND else verdict


# -- the agent socket -----------------------------------------------------------------------------


def test_fuzz_agent_socket(scene_factory: Callable[[str], Scene], size: Size) -> None:
    scene, daemon, agent = healthy_scene(scene_factory)
    (sock_path,) = scene.cli.runtime.glob("agent-*.sock")
    secret = sock_path.with_suffix(".secret").read_text().strip()
    encoder, _ = agent_pair()
    seeds = [
        encoder.send(msg, 1)
        for msg in _AGENT_SEEDS
        if harmless(msg) and not isinstance(msg, m.Data)  # Data needs an open connection
    ]

    def with_secret() -> bytes:
        conn = AgentConnection(AgentRole.DAEMON, secret=secret)
        opening = conn.hello(client="fuzz")
        # a channel of our own, as the daemon opens one per layer process
        helper, _ = agent_pair()
        return opening + helper.send(m.ChannelOpen(pid=os.getpid(), label="fuzz"), 1)

    def wrong_secret() -> bytes:
        return AgentConnection(AgentRole.DAEMON, secret="not-the-secret").hello(client="fuzz")

    fuzzers = [
        Fuzzer(str(sock_path), with_secret, agent_verdict, seeds, seed=23),
        Fuzzer(str(sock_path), wrong_secret, agent_verdict_unauthenticated, seeds, seed=24),
        Fuzzer(str(sock_path), lambda: b"", agent_verdict_unauthenticated, seeds, seed=25),
    ]
    figures = fuzz(scene, fuzzers, size.fuzz_frames, {"daemon": daemon, "agent": agent})
    record_figures("test_fuzz_agent_socket", figures)


def agent_verdict_unauthenticated(frame: bytes) -> str:
    # Without a valid Hello the agent answers nothing and drops the connection.
    verdict = agent_verdict(frame)
    return Verdict.SEND_AND_CLOSE if verdict == Verdict.SEND else verdict


def test_bad_control_lines_are_the_senders_error(
    scene_factory: Callable[[str], Scene],
) -> None:
    scene, _, _ = healthy_scene(scene_factory)
    lines = [b"\xff\xfe\x00", b"[" * 100_000, b'{"id": 1, "op": "\xff"}', b"{" * 5000]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(scene.cli.runtime / "mirrordd.sock"))
        reader = sock.makefile("rb")
        codes = []
        for line in lines:
            sock.sendall(line + b"\n")
            codes.append(json.loads(reader.readline())["error"]["code"])
        reader.close()
    assert codes == ["bad_request"] * len(lines)
    log = (scene.cli.runtime / "mirrordd.log").read_text(errors="replace")
    assert "Traceback" not in log
