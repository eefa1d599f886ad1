"""Incoming traffic through a real agent subprocess, at the agent-protocol level: a client on
the pod's host side talks HTTP to the pod's IP; the test is the daemon and relays what the
agent hands it to a real HTTP server process standing in for the user's app."""

from __future__ import annotations

import errno
import http.client
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from mirrord.agent._http_filter import CLOSED, RequestSplitter, RequestStarted
from mirrord.localpod import LocalPod
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient, AgentConn, AgentError
from tests._agent_process import AgentProc, start_agent, stop_agent
from tests.incoming.conftest import serve_channel, serving, subscribe, unsubscribe
from tests.incoming.test_steal_rules import ours as our_rules

pytestmark = [pytest.mark.netns, pytest.mark.anyio]


def http_request(
    host: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    port: int = 8080,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_steal_answers_every_method_from_the_user_app_then_the_pod_again(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    app_port = local_app("local")
    async with serving(steal_agent, app_port) as (client, seen):
        reply = await subscribe(client, 1, 8080, "steal")
        assert reply.warnings == []
        assert any("MRD_" in line for line in our_rules(pod))
        for method in ("GET", "POST", "PUT", "DELETE"):
            body = b"payload-" + method.encode() if method in ("POST", "PUT") else None
            status, out = await in_thread(http_request, pod.ip, method, "/items/7", body=body)
            assert status == 200
            assert out == f"local {method} /items/7 x-user=\n".encode() + (body or b"")
        assert len(seen) == 4
        await unsubscribe(client, 1, 8080)
        status, out = await in_thread(http_request, pod.ip, "GET", "/items/7")
        assert out == b"pod GET /items/7\n"
        with anyio.fail_after(10):
            while our_rules(pod):
                await anyio.sleep(0.05)
    assert our_rules(pod) == []


async def test_steal_reports_the_real_peer_and_original_destination(
    pod: LocalPod, steal_agent: AgentProc
) -> None:
    async with serving(steal_agent, None) as (client, seen):
        await subscribe(client, 1, 7777, "steal")
        sock = await anyio.connect_tcp(pod.ip, 7777)
        async with sock:
            with anyio.fail_after(10):
                while not seen:
                    await anyio.sleep(0.01)
            await sock.send(b"hello")
            assert await seen[0].receive_exactly(5) == b"hello"
            await seen[0].send(b"from the user app")
            assert await sock.receive() == b"from the user app"
            local = sock.extra(anyio.abc.SocketAttribute.local_address)
            assert local[0] == pod.host_ip
        announce = seen[0].announce
        assert announce.conn_id % 2 == 1  # the agent's conn ids are odd
        assert announce.mode == "steal"
        assert (announce.remote_address, announce.remote_port) == local
        assert (announce.local_address, announce.local_port) == (pod.ip, 7777)


async def test_answer_shutdown_and_close_in_one_write_still_reach_the_stolen_peer(
    pod: LocalPod, steal_agent: AgentProc
) -> None:
    """The daemon's last Data, its Shutdown and its clean ConnClose often arrive in one read
    (a fast user app): the agent writes the answer and the EOF before it closes the socket."""
    async with serving(steal_agent, None) as (client, seen):
        await subscribe(client, 1, 7777, "steal")
        for round_ in range(20):  # each round a new stolen connection
            sock = await anyio.connect_tcp(pod.ip, 7777)
            async with sock:
                question = b"question %d" % round_
                await sock.send(question)
                await sock.send_eof()
                with anyio.fail_after(10):
                    while len(seen) <= round_:
                        await anyio.sleep(0.01)
                    conn = seen[round_]
                    assert await conn.receive_all() == question  # then the peer's EOF
                answer = b"answer %d " % round_ + os.urandom(4096)
                frames = b"".join(
                    client.conn.send(msg, 1)
                    for msg in (
                        m.Data(conn_id=conn.conn_id, data=answer),
                        m.Shutdown(conn_id=conn.conn_id),
                        m.ConnClose(conn_id=conn.conn_id, errno=0),
                    )
                )
                await client.send_raw(frames)
                got = bytearray()
                with anyio.fail_after(10):
                    while True:
                        try:
                            got += await sock.receive()
                        except anyio.EndOfStream:
                            break
                assert bytes(got) == answer, f"round {round_ + 1}: {len(got)} bytes"


async def test_open_connection_survives_the_steal_and_ending_it_resets_nothing(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    app_port = local_app("local")
    before = http.client.HTTPConnection(pod.ip, 8080, timeout=10)
    try:
        before.request("GET", "/one")
        assert before.getresponse().read() == b"pod GET /one\n"
        async with serving(steal_agent, app_port) as (client, _seen):
            await subscribe(client, 1, 8080, "steal")

            def keep_alive(path: str) -> bytes:
                before.request("GET", path)
                return before.getresponse().read()

            # Open before the steal: still the pod's (only SYNs are redirected).
            assert await in_thread(keep_alive, "/two") == b"pod GET /two\n"
            stolen = http.client.HTTPConnection(pod.ip, 8080, timeout=10)

            def on_stolen(path: str) -> bytes:
                stolen.request("GET", path)
                return stolen.getresponse().read()

            assert await in_thread(on_stolen, "/three") == b"local GET /three x-user=\n"
            await unsubscribe(client, 1, 8080)
            # Neither connection is reset by the end of the steal.
            assert await in_thread(on_stolen, "/four") == b"local GET /four x-user=\n"
            assert await in_thread(keep_alive, "/five") == b"pod GET /five\n"
            stolen.close()
            assert await in_thread(http_request, pod.ip, "GET", "/six") == (
                200,
                b"pod GET /six\n",
            )
    finally:
        before.close()


async def test_mirror_1000_requests_on_20_keep_alive_connections(
    pod: LocalPod, pod_app: int, steal_agent: AgentProc
) -> None:
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        streams: dict[int, bytes] = {}
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, None, seen)
            await subscribe(client, 1, pod_app, "mirror")

            def load() -> list[bytes]:
                answers: list[bytes] = []

                def one(n: int) -> None:
                    conn = http.client.HTTPConnection(pod.ip, pod_app, timeout=10)
                    for i in range(50):
                        conn.request("POST", f"/c{n}/r{i}", body=f"b{n}.{i}".encode())
                        answers.append(conn.getresponse().read())
                    conn.close()

                import threading

                threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                return answers

            answers = await in_thread(load)
            assert len(answers) == 1000
            assert all(a.startswith(b"pod-app POST /c") for a in answers)

            async def collect(conn: AgentConn) -> None:
                streams[conn.conn_id] = await conn.receive_all()

            # One mirrored connection per flow (the user app's connection is kept alive, as
            # the client's is): each of the 20 carries its client's 50 requests in order.
            with anyio.fail_after(30):
                while len(seen) < 20:
                    await anyio.sleep(0.05)
                async with anyio.create_task_group() as readers:
                    for conn in seen:
                        readers.start_soon(collect, conn)
            assert len(seen) == 20
            assert all(conn.announce.replies for conn in seen)  # answers are read back
            ports = set()
            for conn in seen:
                splitter = RequestSplitter()
                splitter.receive_data(streams[conn.conn_id])
                splitter.receive_data(b"")
                paths: list[str] = []
                for _ in range(10_000):
                    ev = splitter.next_event()
                    if isinstance(ev, RequestStarted):
                        paths.append(ev.head.target)
                    elif ev is CLOSED:
                        break
                n = paths[0].split("/")[1]
                assert paths == [f"/{n}/r{i}" for i in range(50)]
                ports.add(conn.announce.remote_port)
            assert len(ports) == 20
            # TrafficStats come every 2 s: the kernel dropped nothing.
            with anyio.fail_after(10):
                while True:
                    stats = client.stats
                    if stats and stats[-1].packets >= 1000:
                        break
                    await anyio.sleep(0.2)
            assert stats[-1].port == pod_app and stats[-1].drops == 0
            await unsubscribe(client, 1, pod_app)
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("end", ["close", "reset"])
async def test_mirror_sends_what_a_closing_app_did_not_answer_again_on_a_new_connection(
    pod: LocalPod, pod_app: int, steal_agent: AgentProc, end: str
) -> None:
    # Three requests pipelined in one write: the flow's one mirrored connection carries all
    # three, and the user app (this test, as an HTTP/1.0 server would) answers the first and
    # closes. The two it did not answer go again on a new connection, and so on. `reset`: the
    # app closed with the next request unread, so its kernel reset the connection; the daemon
    # relays the answer and the reset in one batch, and the answer still counts.
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        firsts: list[bytes] = []

        async def one_answer_then_close(conn: AgentConn) -> None:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await conn.receive()
                if not chunk:
                    return
                data += chunk
            firsts.append(data.split(b" ", 2)[1])
            answer = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
            if end == "close":
                await conn.send(answer)
                await conn.close()
                return
            await client.send_raw(
                client.conn.send(m.Data(conn_id=conn.conn_id, data=answer), 1)
                + client.conn.send(m.ConnClose(conn_id=conn.conn_id, errno=errno.ECONNRESET), 1)
            )

        async with anyio.create_task_group() as tg:
            tx, rx = anyio.create_memory_object_stream[AgentConn](100)
            client.incoming[1] = tx

            async def accept() -> None:
                async with rx:
                    async for conn in rx:
                        seen.append(conn)
                        tg.start_soon(one_answer_then_close, conn)

            tg.start_soon(accept)
            await subscribe(client, 1, pod_app, "mirror")

            def pipelined() -> None:
                with socket.create_connection((pod.ip, pod_app), timeout=10) as sock:
                    sock.sendall(
                        b"".join(b"GET /r%d HTTP/1.1\r\nHost: pod\r\n\r\n" % i for i in range(3))
                    )
                    answers = b""
                    while answers.count(b"HTTP/1.") < 3 and (chunk := sock.recv(65536)):
                        answers += chunk

            await in_thread(pipelined)
            with anyio.fail_after(20):
                while len(firsts) < 3:
                    await anyio.sleep(0.05)
            assert firsts == [b"/r0", b"/r1", b"/r2"]
            assert len(seen) == 3 and all(c.announce.replies for c in seen)
            await unsubscribe(client, 1, pod_app)
            client.incoming.pop(1, None)
            tx.close()
            tg.cancel_scope.cancel()


async def test_mirror_counts_an_answer_that_comes_after_the_client_reset(
    pod: LocalPod, pod_app: int, steal_agent: AgentProc
) -> None:
    # The client sends three requests and resets its connection at once; the user app (this
    # test) answers the first only after that reset reached the agent, then closes. The
    # answer still counts: the mirror used to close the app's connection at the client's
    # reset, dropping an answer that came (or had not been read) after it, and sent the
    # answered request again.
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        firsts: list[bytes] = []
        reset_seen = anyio.Event()

        async def answer_late_then_close(conn: AgentConn) -> None:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await conn.receive()
                if not chunk:
                    return
                data += chunk
            firsts.append(data.split(b" ", 2)[1])
            if len(firsts) == 1:
                await reset_seen.wait()
                await anyio.sleep(0.5)  # the sniffer's view of the reset is processed first
            await conn.send(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await conn.close()

        async with anyio.create_task_group() as tg:
            tx, rx = anyio.create_memory_object_stream[AgentConn](100)
            client.incoming[1] = tx

            async def accept() -> None:
                async with rx:
                    async for conn in rx:
                        tg.start_soon(answer_late_then_close, conn)

            tg.start_soon(accept)
            await subscribe(client, 1, pod_app, "mirror")

            def pipelined_then_reset() -> None:
                sock = socket.create_connection((pod.ip, pod_app), timeout=10)
                sock.sendall(
                    b"".join(b"GET /r%d HTTP/1.1\r\nHost: pod\r\n\r\n" % i for i in range(3))
                )
                time.sleep(0.3)  # the requests are sniffed before the reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                sock.close()  # RST

            await in_thread(pipelined_then_reset)
            reset_seen.set()
            with anyio.fail_after(20):
                while len(firsts) < 3:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.3)  # a fourth (a request sent again) would come by now
            assert firsts == [b"/r0", b"/r1", b"/r2"]
            await unsubscribe(client, 1, pod_app)
            client.incoming.pop(1, None)
            tx.close()
            tg.cancel_scope.cancel()


async def test_filters_give_alice_and_bob_their_own_requests_and_the_rest_to_the_pod(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    alice_port, bob_port = local_app("alice-app"), local_app("bob-app")
    async with (
        AgentClient.open(steal_agent) as alice,
        AgentClient.open(steal_agent) as bob,
    ):
        await alice.open_channel(1)
        await bob.open_channel(1)
        seen_a: list[AgentConn] = []
        seen_b: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, alice, 1, alice_port, seen_a)
            await tg.start(serve_channel, bob, 1, bob_port, seen_b)
            await subscribe(alice, 1, 8080, "steal", {"header_filter": "^x-user: alice$"})
            await subscribe(bob, 1, 8080, "steal", {"header_filter": "^x-user: bob$"})

            def traffic() -> list[tuple[str, bytes]]:
                out: list[tuple[str, bytes]] = []
                # keep-alive connections mixing all three users, and POST bodies
                for _ in range(3):
                    conn = http.client.HTTPConnection(pod.ip, 8080, timeout=10)
                    for user in ("alice", "bob", "carol", "alice", "", "bob"):
                        headers = {"x-user": user} if user else {}
                        conn.request("POST", f"/u/{user or 'none'}", body=b"B", headers=headers)
                        out.append((user, conn.getresponse().read()))
                    conn.close()
                return out

            results = await in_thread(traffic)
            for user, body in results:
                if user == "alice":
                    assert body == b"alice-app POST /u/alice x-user=alice\nB"
                elif user == "bob":
                    assert body == b"bob-app POST /u/bob x-user=bob\nB"
                else:
                    assert body == f"pod POST /u/{user or 'none'}\n".encode() + b"B"
            assert len(seen_a) == 6 and len(seen_b) == 6
            await unsubscribe(alice, 1, 8080)
            _, body = await in_thread(
                http_request, pod.ip, "GET", "/x", headers={"x-user": "alice"}
            )
            assert body == b"pod GET /x\n"
            _, body = await in_thread(http_request, pod.ip, "GET", "/y", headers={"x-user": "bob"})
            assert body == b"bob-app GET /y x-user=bob\n"
            await unsubscribe(bob, 1, 8080)
            tg.cancel_scope.cancel()
    with anyio.fail_after(10):
        while our_rules(pod):
            await anyio.sleep(0.05)


async def test_matched_upgrade_hands_the_whole_connection_to_the_session(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    app_port = local_app("local")
    async with serving(steal_agent, app_port) as (client, _seen):
        await subscribe(client, 1, 8080, "steal", {"path_filter": "^/ws$"})
        sock = await anyio.connect_tcp(pod.ip, 8080)
        async with sock:
            await sock.send(
                b"GET /ws HTTP/1.1\r\nHost: pod\r\nUpgrade: shout\r\nConnection: Upgrade\r\n\r\n"
            )
            got = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in got:
                    got += await sock.receive()
            assert got.startswith(b"HTTP/1.1 101")
            await sock.send(b"now raw bytes")
            echoed = b""
            with anyio.fail_after(10):
                while len(echoed) < 13:
                    echoed += await sock.receive()
            assert echoed == b"NOW RAW BYTES"


async def test_non_http_bytes_on_a_filtered_port_reach_the_pod_untouched(
    pod: LocalPod, steal_agent: AgentProc
) -> None:
    async with serving(steal_agent, None) as (client, seen):
        await subscribe(client, 1, 7777, "steal", {"header_filter": "x-user: alice"})
        payload = bytes(range(256)) * 64
        sock = await anyio.connect_tcp(pod.ip, 7777)  # the pod's echo server
        async with sock:
            await sock.send(payload)
            echoed = b""
            with anyio.fail_after(10):
                while len(echoed) < len(payload):
                    echoed += await sock.receive()
        assert echoed == payload
        assert seen == []


async def test_unfiltered_steal_of_a_stolen_port_is_refused_clearly(
    pod: LocalPod, steal_agent: AgentProc
) -> None:
    async with (
        AgentClient.open(steal_agent) as one,
        AgentClient.open(steal_agent) as two,
    ):
        await one.open_channel(1)
        await two.open_channel(1)
        await subscribe(one, 1, 8080, "steal", {"header_filter": "x-user: alice"})
        with pytest.raises(AgentError) as info:
            await subscribe(two, 1, 8080, "steal")
        assert info.value.errno == errno.EADDRINUSE
        assert "on_concurrent_steal" in info.value.message
        with pytest.raises(AgentError) as bad:
            await subscribe(two, 1, 8080, "steal", {"header_filter": "("})
        assert bad.value.errno == errno.EINVAL


async def test_agent_sigkill_guard_removes_every_rule_within_2s(
    pod: LocalPod, steal_agent: AgentProc
) -> None:
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        await subscribe(client, 1, 8080, "steal")
        await subscribe(client, 1, 7777, "steal", {"path_filter": "/a"})
        assert len(our_rules(pod)) >= 4
        os.kill(steal_agent.pid, signal.SIGKILL)
        killed = time.monotonic()
        for _ in range(100):
            if not our_rules(pod):
                break
            time.sleep(0.02)
        assert our_rules(pod) == []
        assert time.monotonic() - killed < 2.0
    with socket.create_connection((pod.ip, 8080), timeout=5):
        pass  # the pod's own server again


async def test_agent_option_picks_the_nft_backend_and_cleans_stale_rules(
    pod: LocalPod, local_app: Callable[[str], int]
) -> None:
    from mirrord.agent._steal import StealRules, chain_names

    # rules left by an agent whose guard died with it (e.g. the node killed both)
    dead = StealRules(target_pid=pod.pid, backend="iptables-nft")
    dead.set_redirects({9999: 1})
    assert dead.guard_pid is not None
    os.kill(dead.guard_pid, signal.SIGKILL)
    dead.close()
    assert any(chain_names(dead.tag)["pre"] in line for line in our_rules(pod))

    app_port = local_app("local")
    env = {"MIRRORD_AGENT_NFTABLES": "true", "MIRRORD_AGENT_CLEAN_IPTABLES_ON_START": "true"}
    agent = start_agent(f"pid/{pod.pid}", env=env)
    try:
        async with serving(agent, app_port) as (client, _seen):
            await subscribe(client, 1, 8080, "steal")
            rules = our_rules(pod)
            assert any("table ip mirrord_" in line for line in rules)
            assert not any("MRD_" in line for line in rules)  # the stale chains are gone
            _, body = await in_thread(http_request, pod.ip, "GET", "/nft")
            assert body == b"local GET /nft x-user=\n"
            await unsubscribe(client, 1, 8080)
    finally:
        stop_agent(agent)
    assert our_rules(pod) == []


async def test_stealing_a_probe_port_warns_with_the_kube_probe_recipe(pod: LocalPod) -> None:
    agent = start_agent(f"pid/{pod.pid}", env={"MIRRORD_AGENT_PROBE_PORTS": "8080"})
    try:
        async with AgentClient.open(agent) as client:
            await client.open_channel(1)
            await client.open_channel(3)
            reply = await subscribe(client, 1, 8080, "steal")
            assert len(reply.warnings) == 1
            assert "HTTP probes" in reply.warnings[0]
            assert '"header_filter": "^user-agent: (?!kube-probe)"' in reply.warnings[0]
            await unsubscribe(client, 1, 8080)
            recipe: dict[str, object] = {"header_filter": "^user-agent: (?!kube-probe)"}
            assert (await subscribe(client, 3, 8080, "steal", recipe)).warnings == []
            assert (await subscribe(client, 1, 7777, "steal")).warnings == []
    finally:
        stop_agent(agent)


SERVER_FIRST = """
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", 2525), backlog=64)
print("ready", flush=True)
def serve(c):
    c.sendall(b"220 pod greets first\\r\\n")
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


async def test_a_server_first_protocol_on_a_filtered_port_reaches_the_pod(
    pod: LocalPod, steal_agent: AgentProc
) -> None:
    server = pod.popen_in_pod([os.path.realpath(sys.executable), "-c", SERVER_FIRST])
    assert server.stdout is not None
    assert server.stdout.readline() == b"ready\n"
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        await subscribe(client, 1, 2525, "steal", {"header_filter": "x-user: alice"})
        sock = await anyio.connect_tcp(pod.ip, 2525)
        async with sock:
            got = b""
            with anyio.fail_after(10):
                while not got.endswith(b"\r\n"):
                    got += await sock.receive()
            assert got == b"220 pod greets first\r\n"
            await sock.send(b"EHLO me\r\n")
            got = b""
            with anyio.fail_after(10):
                while not got.endswith(b"\r\n"):
                    got += await sock.receive()
            assert got == b"EHLO me\r\n"


async def test_on_concurrent_steal_override_takes_the_port_over(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    first_app, second_app = local_app("first"), local_app("second")
    async with (
        AgentClient.open(steal_agent) as one,
        AgentClient.open(steal_agent) as two,
        anyio.create_task_group() as tg,
    ):
        await one.open_channel(1)
        await two.open_channel(1)
        seen_one: list[AgentConn] = []
        seen_two: list[AgentConn] = []
        await tg.start(serve_channel, one, 1, first_app, seen_one)
        await tg.start(serve_channel, two, 1, second_app, seen_two)
        await subscribe(one, 1, 8080, "steal")
        with pytest.raises(AgentError) as refused:
            await subscribe(two, 1, 8080, "steal")  # on_concurrent_steal "abort"
        assert refused.value.errno == errno.EADDRINUSE
        reply = await subscribe(two, 1, 8080, "steal", on_concurrent_steal="override")
        assert any("took the steal over" in w for w in reply.warnings)
        body = await anyio.to_thread.run_sync(_get, pod, "/next")
        assert body == b"second GET /next x-user=\n"
        assert len(seen_two) == 1 and not seen_one
        tg.cancel_scope.cancel()


def _get(pod: LocalPod, path: str) -> bytes:
    conn = http.client.HTTPConnection(pod.ip, 8080, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


async def test_pipelined_requests_to_session_and_pod_are_answered_in_order(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    app_port = local_app("local")
    async with serving(steal_agent, app_port) as (client, seen):
        await subscribe(client, 1, 8080, "steal", {"header_filter": "^x-user: alice$"})
        users = ["alice", "", "alice", "bob", "alice", ""]
        wire = b"".join(
            f"POST /p{i} HTTP/1.1\r\nHost: pod\r\nContent-Length: 1\r\n".encode()
            + (f"x-user: {u}\r\n".encode() if u else b"")
            + b"\r\nZ"
            for i, u in enumerate(users)
        )
        sock = await anyio.connect_tcp(pod.ip, 8080)
        async with sock:
            await sock.send(wire)  # all six at once: pipelined
            got = b""
            with anyio.fail_after(15):
                while got.count(b"HTTP/1.1 200") < len(users) or not got.endswith(b"Z"):
                    got += await sock.receive()
        bodies = [part.split(b"\r\n\r\n", 1)[1] for part in got.split(b"HTTP/1.1 200")[1:]]
        expected = [
            f"local POST /p{i} x-user=alice\nZ".encode()
            if u == "alice"
            else f"pod POST /p{i}\nZ".encode()
            for i, u in enumerate(users)
        ]
        assert bodies == expected
        assert len(seen) == 3


async def test_large_bodies_cross_a_filtered_port_both_ways(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    app_port = local_app("local")
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB
    async with serving(steal_agent, app_port) as (client, _seen):
        await subscribe(client, 1, 8080, "steal", {"header_filter": "^x-user: alice$"})

        def post(user: str) -> bytes:
            conn = http.client.HTTPConnection(pod.ip, 8080, timeout=30)
            try:
                conn.request("PUT", "/big", body=body, headers={"x-user": user})
                return conn.getresponse().read()
            finally:
                conn.close()

        assert await in_thread(post, "alice") == b"local PUT /big x-user=alice\n" + body
        assert await in_thread(post, "bob") == b"pod PUT /big\n" + body


async def test_mirror_again_right_after_unsubscribing(
    pod: LocalPod, steal_agent: AgentProc
) -> None:
    async with serving(steal_agent, None) as (client, seen):
        for round_ in range(3):
            await subscribe(client, 1, 8080, "mirror")
            _, body = await in_thread(http_request, pod.ip, "GET", f"/again{round_}")
            assert body == f"pod GET /again{round_}\n".encode()
            with anyio.fail_after(10):
                while len(seen) <= round_:
                    await anyio.sleep(0.02)
            copy = await seen[round_].receive_all()
            assert copy.startswith(f"GET /again{round_} HTTP/1.1\r\n".encode())
            await unsubscribe(client, 1, 8080)
