"""gRPC under a filtered steal, end to end: a grpcio client calls a pod whose app is a grpcio
server; `mirrord run` steals the port with a metadata (header) filter `x-user: alice`; alice's
calls (unary, bidirectional streaming, an error status) are answered by the user app (a
grpcio server run under mirrord), everyone else's by the pod's app, on one client channel."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest

from mirrord.localpod import LocalPod
from tests.cli.conftest import Mirrord
from tests.incoming.conftest import python_app_in_pod, run_filtered_steal
from tests.incoming.test_end_to_end import our_rules, stop_app, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GRPC_APP = str(Path(__file__).with_name("_grpc_app.py"))
PORT = 8095


@pytest.fixture
def grpc_pod(pod: LocalPod) -> Iterator[LocalPod]:
    """The pod with a gRPC app on PORT."""
    with python_app_in_pod(
        pod, GRPC_APP, PORT, os.path.dirname(os.path.dirname(grpc.__file__))
    ) as p:
        yield p


def say(channel: grpc.Channel, text: str, user: str | None) -> str:
    call = channel.unary_unary("/mirrord.Echo/Say")
    metadata = [("x-user", user)] if user else None
    answer: bytes = call(text.encode(), metadata=metadata, timeout=20)
    return answer.decode()


def chat(channel: grpc.Channel, texts: list[str], user: str) -> list[str]:
    call = channel.stream_stream("/mirrord.Echo/Chat")
    answers = call(iter(t.encode() for t in texts), metadata=[("x-user", user)], timeout=20)
    return [a.decode() for a in answers]


def fail(channel: grpc.Channel, user: str | None) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary("/mirrord.Echo/Fail")
    metadata = [("x-user", user)] if user else None
    with pytest.raises(grpc.RpcError) as info:
        call(b"x", metadata=metadata, timeout=20)
    err = info.value
    return err.code(), str(err.details())


def deadline(channel: grpc.Channel, user: str) -> str:
    call = channel.unary_unary("/mirrord.Echo/Deadline")
    answer: bytes = call(b"", metadata=[("x-user", user)], timeout=20)
    return answer.decode()


def test_grpc_calls_with_x_user_alice_reach_the_user_app_the_rest_the_pod(
    mirrord: Mirrord, grpc_pod: LocalPod, tmp_path: Path
) -> None:
    pod = grpc_pod
    http_filter = {"header_filter": "^x-user: alice$"}
    config = tmp_path / "mirrord.json"
    app = run_filtered_steal(
        mirrord, pod, config, app=GRPC_APP, name="user-app", port=PORT, http_filter=http_filter
    )
    try:
        with grpc.insecure_channel(f"{pod.ip}:{PORT}") as channel:
            # the subscription follows listen() asynchronously
            wait_for(lambda: say(channel, "probe", "alice").startswith("user-app"), 20)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                jobs: dict[str, concurrent.futures.Future[Any]] = {
                    "alice": pool.submit(say, channel, "hello", "alice"),
                    "bob": pool.submit(say, channel, "hello", "bob"),
                    "nobody": pool.submit(say, channel, "hello", None),
                    "alice-chat": pool.submit(chat, channel, ["a", "b", "c"], "alice"),
                    "bob-chat": pool.submit(chat, channel, ["d", "e"], "bob"),
                    "alice-fail": pool.submit(fail, channel, "alice"),
                    "bob-fail": pool.submit(fail, channel, "bob"),
                    "alice-deadline": pool.submit(deadline, channel, "alice"),
                }
                results = {k: v.result(timeout=60) for k, v in jobs.items()}
        assert results == {
            "alice": "user-app hello x-user=alice",
            "bob": "pod hello x-user=bob",
            "nobody": "pod hello x-user=",
            "alice-chat": [f"user-app {t} x-user=alice" for t in "abc"],
            "bob-chat": [f"pod {t} x-user=bob" for t in "de"],
            "alice-fail": (grpc.StatusCode.NOT_FOUND, "user-app says no"),  # trailers intact
            "bob-fail": (grpc.StatusCode.NOT_FOUND, "pod says no"),
            "alice-deadline": "user-app True",  # grpc-timeout reached the user app
        }
    finally:
        stop_app(app)
    wait_for(lambda: our_rules(pod) == [])


def _answered_by_own_app(channel: grpc.Channel, user: str) -> bool:
    return say(channel, "probe", user).startswith(f"{user}-app")


def test_two_sessions_with_alice_and_bob_filters_share_one_grpc_port(
    mirrord: Mirrord, grpc_pod: LocalPod, tmp_path: Path
) -> None:
    """Bidirectional streams of alice, bob and carol at once on one channel: alice's reach
    alice's session, bob's bob's, carol's the pod, none reset."""
    pod = grpc_pod
    apps = []
    try:
        for user in ("alice", "bob"):
            config = tmp_path / f"{user}.json"
            http_filter = {"header_filter": f"^x-user: {user}$"}
            apps.append(
                run_filtered_steal(
                    mirrord,
                    pod,
                    config,
                    app=GRPC_APP,
                    name=f"{user}-app",
                    port=PORT,
                    http_filter=http_filter,
                )
            )
        with grpc.insecure_channel(f"{pod.ip}:{PORT}") as channel:
            for user in ("alice", "bob"):
                wait_for(functools.partial(_answered_by_own_app, channel, user), 20)
            with concurrent.futures.ThreadPoolExecutor(9) as pool:
                jobs = [
                    (
                        user,
                        i,
                        pool.submit(chat, channel, [f"{user}{i}-{n}" for n in range(20)], user),
                    )
                    for i in range(3)
                    for user in ("alice", "bob", "carol")
                ]
                for user, i, job in jobs:
                    who = f"{user}-app" if user in ("alice", "bob") else "pod"
                    assert job.result(timeout=60) == [
                        f"{who} {user}{i}-{n} x-user={user}" for n in range(20)
                    ]
    finally:
        for proc in apps:
            stop_app(proc)
    wait_for(lambda: our_rules(pod) == [])


def test_a_path_filter_steals_one_method_and_a_cancelled_call_reaches_the_user_app(
    mirrord: Mirrord, grpc_pod: LocalPod, tmp_path: Path
) -> None:
    pod = grpc_pod
    criteria = [{"path": "^/mirrord\\.Echo/Say$"}, {"header": "^x-user: alice$"}]
    config = tmp_path / "mirrord.json"
    app = run_filtered_steal(
        mirrord,
        pod,
        config,
        app=GRPC_APP,
        name="user-app",
        port=PORT,
        http_filter={"any_of": criteria},
    )
    try:
        with grpc.insecure_channel(f"{pod.ip}:{PORT}") as channel:
            wait_for(lambda: say(channel, "probe", "bob").startswith("user-app"), 20)
            assert say(channel, "hi", None) == "user-app hi x-user="  # by path
            assert chat(channel, ["x"], "bob") == ["pod x x-user=bob"]  # another method
            # alice's chat: one answer, then the client cancels the call without ever
            # half-closing it: only the cancellation (an RST_STREAM) can end it in the app
            call = channel.stream_stream("/mirrord.Echo/Chat")
            outbox: queue.Queue[bytes | None] = queue.Queue()
            answers = call(iter(outbox.get, None), metadata=[("x-user", "alice")], timeout=60)
            outbox.put(b"first")
            assert next(answers) == b"user-app first x-user=alice"
            answers.cancel()
            try:
                assert app.stdout is not None
                assert _readline(app.stdout, 30).strip() == "chat ended x-user=alice"
            finally:
                outbox.put(None)  # (lets grpc's request thread go)
    finally:
        stop_app(app)
    wait_for(lambda: our_rules(pod) == [])


def _readline(stream: IO[str], timeout: float) -> str:
    """A line of `stream`, waiting at most `timeout` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout} s"
    return stream.readline()


def collect(channel: grpc.Channel, texts: list[str], user: str) -> tuple[str, dict[str, str]]:
    """A client-streaming call: the answer and the trailing metadata."""
    call = channel.stream_unary("/mirrord.Echo/Collect")
    answer, outcome = call.with_call(
        iter(t.encode() for t in texts), metadata=[("x-user", user)], timeout=20
    )
    return answer.decode(), dict(outcome.trailing_metadata() or ())


def count(channel: grpc.Channel, request: str, user: str) -> tuple[list[str], Any, str, Any]:
    """A server-streaming call: the answers, the status code, its details, the trailers."""
    call = channel.unary_stream("/mirrord.Echo/Count")
    answers = call(request.encode(), metadata=[("x-user", user)], timeout=20)
    got: list[str] = []
    try:
        for answer in answers:
            got.append(answer.decode())
    except grpc.RpcError:
        pass  # (a status other than OK: read below)
    trailers = dict(answers.trailing_metadata() or ())
    return got, answers.code(), answers.details(), trailers


def test_grpc_client_and_server_streaming_with_trailers_deadlines_and_cancellation(
    mirrord: Mirrord, grpc_pod: LocalPod, tmp_path: Path
) -> None:
    """Client- and server-streaming calls stolen by metadata (`x-user: alice`) or by path
    (`/mirrord.Echo/Collect`), the rest to the pod, at once on one channel; statuses and
    trailers intact; a deadline that passes is DEADLINE_EXCEEDED for the client and ends the
    call in the user app; a server stream the client cancels ends in the user app."""
    pod = grpc_pod
    config = tmp_path / "mirrord.json"
    criteria = [{"path": "^/mirrord\\.Echo/Collect$"}, {"header": "^x-user: alice$"}]
    incoming = {"mode": "steal", "http_filter": {"any_of": criteria, "ports": [PORT]}}
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    argv = [sys.executable, GRPC_APP, "user-app", "0.0.0.0", str(PORT)]
    app = mirrord.popen("run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", *argv)
    assert app.stdout is not None
    assert app.stdout.readline().strip() == str(PORT)
    ok, out = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    try:
        with grpc.insecure_channel(f"{pod.ip}:{PORT}") as channel:
            wait_for(lambda: say(channel, "probe", "alice").startswith("user-app"), 20)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                jobs: dict[str, concurrent.futures.Future[Any]] = {
                    "alice-collect": pool.submit(collect, channel, ["a", "b", "c"], "alice"),
                    "bob-collect": pool.submit(collect, channel, ["d"], "bob"),  # by path
                    "alice-count": pool.submit(count, channel, "3", "alice"),
                    "bob-count": pool.submit(count, channel, "2", "bob"),
                    "alice-fail": pool.submit(count, channel, "fail", "alice"),
                    "bob-fail": pool.submit(count, channel, "fail", "bob"),
                }
                results = {k: v.result(timeout=60) for k, v in jobs.items()}
            served_by_user = {"x-served-by": "user-app"}
            assert results == {
                "alice-collect": ("user-app a,b,c x-user=alice", served_by_user),
                "bob-collect": ("user-app d x-user=bob", served_by_user),
                "alice-count": (
                    [f"user-app {i} x-user=alice" for i in range(3)],
                    ok,
                    "",
                    served_by_user,
                ),
                "bob-count": (
                    [f"pod {i} x-user=bob" for i in range(2)],
                    ok,
                    "",
                    {"x-served-by": "pod"},
                ),
                "alice-fail": (
                    [f"user-app {i} x-user=alice" for i in range(2)],
                    out,
                    "user-app ran out",
                    served_by_user,
                ),
                "bob-fail": (
                    [f"pod {i} x-user=bob" for i in range(2)],
                    out,
                    "pod ran out",
                    {"x-served-by": "pod"},
                ),
            }
            lines = _line_queue(app.stdout)
            # a deadline that passes while the user app works on the call
            slow = channel.unary_unary("/mirrord.Echo/Slow")
            with pytest.raises(grpc.RpcError) as info:
                slow(b"", metadata=[("x-user", "alice")], timeout=1.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert _next_line(lines, "slow") == "slow ended x-user=alice"
            # a server stream the client cancels after its first answer
            stream = channel.unary_stream("/mirrord.Echo/Count")
            answers = stream(b"1000", metadata=[("x-user", "alice")], timeout=60)
            assert next(answers) == b"user-app 0 x-user=alice"
            while not lines.empty():  # (the calls above ended too)
                lines.get_nowait()
            answers.cancel()
            assert _next_line(lines, "count") == "count ended x-user=alice"
            assert answers.code() == grpc.StatusCode.CANCELLED
    finally:
        stop_app(app)
    wait_for(lambda: our_rules(pod) == [])


def _line_queue(stream: IO[str]) -> queue.Queue[str]:
    """The lines `stream` prints from now on, read by a thread (ends with the stream)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        with contextlib.suppress(ValueError, OSError):  # (the stream closed under it)
            for line in stream:
                lines.put(line.strip())

    threading.Thread(target=read, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str], prefix: str, timeout: float = 30) -> str:
    """The next line starting with `prefix`, waiting at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        if line.startswith(prefix):
            return line
