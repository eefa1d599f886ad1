"""Conformance of every byte stream of our own, in the style of anyio's stream tests: each
`anyio.abc.ByteStream` we implement behaves like anyio's streams on send/receive, `max_bytes`,
half-close, end of stream, closing (also while a receive waits) and large payloads, so the
relays written against anyio's contract (daemon and agent) can use any of them.

The streams: the agent's in-memory pipe (`pipe_pair`, incoming traffic to a channel's relay),
the relays' `RawSocketStream` (the daemon's sockets to user apps), and the Kubernetes `PortForwardStream`
(the daemon's stream to an agent pod, over the in-process API server to a namespace pod).
Each is paired with a peer: the pipe's other end, anyio's own socket stream, and a TCP socket
accepted inside the pod. Pipes and raw sockets run under both backends (the agent is trio,
the daemon asyncio); the port-forward under asyncio (kubernetes_asyncio needs it).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from mirrord._relay import RawSocketStream
from mirrord.agent import NetnsRunner
from mirrord.agent._incoming_pipe import pipe_pair
from mirrord.kube import load_context, open_port_forward
from mirrord.localpod import LocalPod, PodSpec
from tests.kube._cluster import add_deployment
from tests.kube.apiserver import FakeApiServer

pytestmark = pytest.mark.anyio

_LARGE = 5 * 1024 * 1024 + 7  # past the pipe's limit, the socket buffers and a ws message
_TIMEOUT = 30


@dataclass
class Pair:
    """`stream` (the one under test) and `peer`, connected; `half_close`: after
    `stream.send_eof()` the stream still receives (the port-forward has no half-close: its
    send_eof closes)."""

    stream: anyio.abc.ByteStream
    peer: anyio.abc.ByteStream
    half_close: bool


CASES = [
    pytest.param(("pipe", "trio"), id="pipe-trio"),
    pytest.param(("pipe", "asyncio"), id="pipe-asyncio"),
    pytest.param(("raw-socket", "asyncio"), id="raw-socket-asyncio"),
    pytest.param(("raw-socket", "trio"), id="raw-socket-trio"),
    pytest.param(("port-forward", "asyncio"), id="port-forward", marks=pytest.mark.netns),
]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    kind_backend: tuple[str, str] = request.param
    return kind_backend


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    return case[1]


async def _raw_socket_pair(stack: AsyncExitStack) -> Pair:
    ours, theirs = socket.socketpair()
    stream = RawSocketStream(ours)
    stack.push_async_callback(stream.aclose)
    peer = await anyio.abc.SocketStream.from_socket(theirs)
    stack.push_async_callback(peer.aclose)
    return Pair(stream, peer, half_close=True)


async def _port_forward_pair(
    stack: AsyncExitStack, tmp_path: Path, make_pod: Callable[..., LocalPod]
) -> Pair:
    server = await stack.enter_async_context(FakeApiServer(workdir=tmp_path))
    pod = make_pod(PodSpec(name="streams"))
    (pod_name,) = add_deployment(server, "streams", pods=[pod])
    runner = NetnsRunner(pod.pid)
    stack.callback(runner.close)
    listener = runner.run_sync(socket.create_server, ("127.0.0.1", 0))
    stack.callback(listener.close)
    listener.settimeout(_TIMEOUT)
    kube = await load_context(kubeconfig=str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    stream = await open_port_forward(
        kube.configuration, "default", pod_name, listener.getsockname()[1]
    )
    stack.push_async_callback(stream.aclose)
    accepted, _ = await anyio.to_thread.run_sync(listener.accept)
    peer = await anyio.abc.SocketStream.from_socket(accepted)
    stack.push_async_callback(peer.aclose)
    return Pair(stream, peer, half_close=False)


@pytest.fixture
async def pair(
    case: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Pair]:
    async with AsyncExitStack() as stack:
        if case[0] == "pipe":
            stream, peer = pipe_pair(names=("stream", "peer"))
            yield Pair(stream, peer, half_close=True)
        elif case[0] == "raw-socket":
            yield await _raw_socket_pair(stack)
        else:
            yield await _port_forward_pair(stack, tmp_path, request.getfixturevalue("make_pod"))


async def _receive_exactly(stream: anyio.abc.ByteStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive()
    return bytes(out)


async def _receive_all(stream: anyio.abc.ByteStream) -> bytes:
    out = bytearray()
    try:
        while True:
            out += await stream.receive()
    except anyio.EndOfStream:
        return bytes(out)


async def test_send_and_receive_both_ways(pair: Pair) -> None:
    with anyio.fail_after(_TIMEOUT):
        await pair.stream.send(b"hello peer")
        assert await _receive_exactly(pair.peer, 10) == b"hello peer"
        await pair.peer.send(b"hello stream")
        assert await _receive_exactly(pair.stream, 12) == b"hello stream"


async def test_receive_returns_at_most_max_bytes_in_order(pair: Pair) -> None:
    data = bytes(range(256)) * 4
    with anyio.fail_after(_TIMEOUT):
        await pair.peer.send(data)
        got = bytearray()
        while len(got) < len(data):
            chunk = await pair.stream.receive(max_bytes=100)
            assert 0 < len(chunk) <= 100
            got += chunk
    assert bytes(got) == data


async def test_large_payloads_both_ways_at_once(pair: Pair) -> None:
    out = bytes(i % 251 for i in range(_LARGE))
    back = out[::-1]
    received: dict[str, bytes] = {}

    async def read(name: str, stream: anyio.abc.ByteStream, n: int) -> None:
        received[name] = await _receive_exactly(stream, n)

    with anyio.fail_after(_TIMEOUT * 2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read, "peer", pair.peer, len(out))
            tg.start_soon(read, "stream", pair.stream, len(back))
            tg.start_soon(pair.stream.send, out)
            tg.start_soon(pair.peer.send, back)
    assert received["peer"] == out
    assert received["stream"] == back


async def test_send_eof_ends_the_peers_stream_after_the_data(pair: Pair) -> None:
    with anyio.fail_after(_TIMEOUT):
        await pair.stream.send(b"last words")
        await pair.stream.send_eof()
        assert await _receive_all(pair.peer) == b"last words"
        with pytest.raises(anyio.EndOfStream):  # and again: the end stays
            await pair.peer.receive()


async def test_half_close_leaves_the_other_direction_open(pair: Pair) -> None:
    with anyio.fail_after(_TIMEOUT):
        await pair.stream.send_eof()
        if not pair.half_close:  # documented: send_eof closes the stream, both ways
            with pytest.raises(anyio.ClosedResourceError):
                await pair.stream.receive()
            assert await _receive_all(pair.peer) == b""
            return
        assert await _receive_all(pair.peer) == b""
        await pair.peer.send(b"still talking")
        await pair.peer.send_eof()
        assert await _receive_all(pair.stream) == b"still talking"


async def test_the_peers_close_is_an_end_of_stream_every_time(pair: Pair) -> None:
    with anyio.fail_after(_TIMEOUT):
        await pair.peer.send(b"bye")
        await pair.peer.aclose()
        assert await _receive_all(pair.stream) == b"bye"
        with pytest.raises(anyio.EndOfStream):
            await pair.stream.receive()


async def test_closing_while_a_receive_waits_wakes_it(pair: Pair) -> None:
    ended: list[BaseException] = []

    async def receive() -> None:
        try:
            await pair.stream.receive()
        except (anyio.ClosedResourceError, anyio.EndOfStream) as exc:
            ended.append(exc)

    with anyio.fail_after(_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            await pair.stream.aclose()
    assert len(ended) == 1
    assert isinstance(ended[0], anyio.ClosedResourceError), ended


async def test_a_closed_stream_refuses_send_and_receive(pair: Pair) -> None:
    await pair.stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await pair.stream.send(b"x")
    with pytest.raises(anyio.ClosedResourceError):
        await pair.stream.receive()


async def test_aclose_is_idempotent(pair: Pair) -> None:
    with anyio.fail_after(_TIMEOUT):
        await pair.stream.aclose()
        await pair.stream.aclose()
        with pytest.raises(anyio.EndOfStream):  # the peer saw one end, cleanly
            await pair.peer.receive()
