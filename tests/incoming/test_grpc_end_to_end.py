"""gRPC under a filtered steal, end to end: a grpcio client calls a pod whose app is a grpcio
server; `mirrord run` steals the port with a metadata (header) filter `x-user: alice`; alice's
calls (unary, bidirectional streaming, an error status) are answered by the user app (a
grpcio server run under mirrord), everyone else's by the pod's app, on one client channel."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import queue
import select
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
