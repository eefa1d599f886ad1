"""HTTPS under a filtered steal, with a real agent next to a real pod whose app serves TLS (a
test CA from trustme): the agent terminates the clients' TLS with the session's certificate,
filters HTTP/1.1 and HTTP/2 (ALPN), sends matched requests to the user app (plain or TLS) and
re-encrypts the others toward the pod's app. Real clients: curl (`--http1.1`, `--http2`),
Python's ssl (several requests on one connection) and h2 over TLS. Without a certificate, TLS
passes through untouched."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import grpc
import h2
import h2.config
import h2.connection
import h2.events
import pytest
import trustme

from mirrord.localpod import LocalPod
from tests._agent_client import AgentClient, AgentConn, AgentError
from tests._agent_process import AgentProc
from tests.cli.conftest import Mirrord, temp_mirrord
from tests.incoming.conftest import port_printing_apps, python_app_in_pod, serve_channel, subscribe
from tests.incoming.test_end_to_end import our_rules, stop_app, wait_for
from tests.incoming.test_steal_rules import ours

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TLS_APP = str(Path(__file__).with_name("_tls_app.py"))
GRPC_APP = str(Path(__file__).with_name("_grpc_app.py"))
GRPC_PORT = 8446
PORT = 8443
NAME = "pod.test"  # the name the clients ask for (curl --resolve), in the certificate


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """PEM files: the test CA; the pod's certificate and key (`cert`, `key`, used by the pod's
    app and the user app); the session's (`session.crt`, `session.key`: another certificate
    for the same name from the same CA, so a client can tell who answered its handshake)."""
    files = {"ca": tmp_path / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for prefix, name in (("", "tls"), ("session_", "session")):
        leaf = ca.issue_cert(NAME, "localhost")
        files[f"{prefix}cert"] = tmp_path / f"{name}.crt"
        files[f"{prefix}key"] = tmp_path / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(files[f"{prefix}cert"]))
        leaf.private_key_pem.write_to_path(str(files[f"{prefix}key"]))
    return files


def served_certificate(pod: LocalPod, certs: dict[str, Path]) -> Path:
    """Which of the two certificates a client connecting to the pod's PORT is shown."""
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    with ctx.wrap_socket(
        socket.create_connection((pod.ip, PORT), timeout=30), server_hostname=NAME
    ) as sock:
        der = sock.getpeercert(binary_form=True)
    for key in ("cert", "session_cert"):
        if ssl.PEM_cert_to_DER_cert(certs[key].read_text()) == der:
            return certs[key]
    raise AssertionError("a certificate that is neither the pod's nor the session's")


IDLE_PORT = 8444  # the pod's HTTPS app closing keep-alive connections idle for 0.5 s
PLAIN_PORT = 8445  # the pod's app serving plain HTTP only


@pytest.fixture
def tls_pod(pod: LocalPod, certs: dict[str, Path]) -> Iterator[LocalPod]:
    """The pod with an HTTPS app (h2 and http/1.1) on PORT, with the pod's certificate (and
    the same on IDLE_PORT with an idle timeout)."""
    library = os.path.dirname(os.path.dirname(h2.__file__))
    pem = [str(certs["cert"]), str(certs["key"])]
    with contextlib.ExitStack() as apps:
        for port, args in (
            (IDLE_PORT, [*pem, "0.5"]),
            (PLAIN_PORT, ["plain", "plain"]),
            (PORT, pem),
        ):
            apps.enter_context(python_app_in_pod(pod, TLS_APP, port, library, "0.0.0.0", *args))
        yield pod


@pytest.fixture
def user_app(certs: dict[str, Path]) -> Iterator[Callable[[bool], int]]:
    """`user_app(tls)`: the user app's stand-in on the host (no mirrord), serving HTTPS with
    the same certificate, or plain HTTP; its port."""

    def start(tls: bool) -> int:
        cert, key = (str(certs["cert"]), str(certs["key"])) if tls else ("plain", "plain")
        return run([sys.executable, TLS_APP, "user-app", "127.0.0.1", "0", cert, key])

    with port_printing_apps() as run:
        yield start


def tls_wire(certs: dict[str, Path], protocol: str = "tls") -> dict[str, object]:
    """What the daemon sends in Subscribe.tls for these files."""
    return {
        "cert_pem": certs["session_cert"].read_text(),
        "key_pem": certs["session_key"].read_text(),
        "delivery": {"protocol": protocol, "trust_roots_pem": certs["ca"].read_text()},
    }


def curl(
    pod: LocalPod,
    certs: dict[str, Path],
    path: str,
    user: str | None,
    *,
    http2: bool = False,
    port: int = PORT,
    ipv6: bool = False,
) -> tuple[str, str]:
    """One HTTPS request with curl trusting the test CA, to the pod's IPv4 address or its IPv6
    one: (body, HTTP version)."""
    argv = ["curl", "-sS", "--max-time", "30", "--cacert", str(certs["ca"])]
    address = f"[{pod.ip6}]" if ipv6 else pod.ip
    argv += ["--resolve", f"{NAME}:{port}:{address}", "-w", "|%{http_version}"]
    argv.append("--http2" if http2 else "--http1.1")
    if user is not None:
        argv += ["-H", f"x-user: {user}"]
    argv.append(f"https://{NAME}:{port}{path}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    body, _, version = done.stdout.rpartition("|")
    return body, version


def https_keep_alive(
    pod: LocalPod,
    certs: dict[str, Path],
    requests: list[tuple[str, str | None]],
    *,
    port: int = PORT,
    pause: float = 0.0,
    ipv6: bool = False,
) -> list[str]:
    """Python's ssl + http.client: every request on one TLS connection, in order (`pause`
    seconds apart), to the pod's IPv4 or IPv6 address; the bodies."""
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection((pod.ip6 if ipv6 else pod.ip, port), timeout=30)
    conn = http.client.HTTPSConnection(NAME, port, context=ctx, timeout=30)
    conn.sock = ctx.wrap_socket(raw, server_hostname=NAME)
    bodies = []
    try:
        for i, (path, user) in enumerate(requests):
            if i:
                time.sleep(pause)
            conn.request("GET", path, headers={"x-user": user} if user else {})
            bodies.append(conn.getresponse().read().decode())
    finally:
        conn.close()
    return bodies


def h2_over_tls(
    pod: LocalPod,
    certs: dict[str, Path],
    requests: list[tuple[str, str | None]],
    *,
    ipv6: bool = False,
) -> dict[str, str]:
    """The h2 library over Python's ssl (ALPN h2): all streams at once on one connection, to
    the pod's IPv4 or IPv6 address; path -> body."""
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(
        socket.create_connection((pod.ip6 if ipv6 else pod.ip, PORT), timeout=30),
        server_hostname=NAME,
    )
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    conn.initiate_connection()
    paths: dict[int, str] = {}
    for path, user in requests:
        sid = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", NAME)]
        conn.send_headers(sid, headers + ([("x-user", user)] if user else []), end_stream=True)
        paths[sid] = path
    sock.sendall(conn.data_to_send())
    bodies: dict[int, bytearray] = {sid: bytearray() for sid in paths}
    done: set[int] = set()
    with sock:
        for _ in range(1000):  # bounded: a handful of frames per stream
            if done == set(paths):
                break
            data = sock.recv(65536)
            assert data, "the agent closed the connection"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id or 0] += ev.data or b""
                    conn.acknowledge_received_data(
                        ev.flow_controlled_length or 0, ev.stream_id or 0
                    )
                elif isinstance(ev, h2.events.StreamEnded):
                    done.add(ev.stream_id or 0)
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"stream {ev.stream_id} reset: {ev.error_code}")
            sock.sendall(conn.data_to_send())
    return {paths[sid]: bytes(body).decode() for sid, body in bodies.items()}


@pytest.mark.anyio
@pytest.mark.parametrize("delivery", ["tls", "tcp"])
async def test_https_requests_matching_the_filter_reach_the_user_app_the_rest_the_pod(
    tls_pod: LocalPod,
    steal_agent: AgentProc,
    user_app: Callable[[bool], int],
    certs: dict[str, Path],
    delivery: str,
) -> None:
    pod = tls_pod
    get = anyio.to_thread.run_sync
    app_port = user_app(delivery == "tls")
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, app_port, seen)
            await subscribe(
                client,
                1,
                PORT,
                "steal",
                {"header_filter": "^x-user: alice$"},
                tls=tls_wire(certs, delivery),
            )
            # curl, HTTP/1.1 and HTTP/2 (ALPN)
            assert await get(curl, pod, certs, "/a", "alice") == (
                "user-app GET /a x-user=alice\n",
                "1.1",
            )
            assert await get(curl, pod, certs, "/b", "bob") == ("pod GET /b x-user=bob\n", "1.1")
            h2_alice = await get(lambda: curl(pod, certs, "/c", "alice", http2=True))
            assert h2_alice == ("user-app GET /c x-user=alice\n", "2")
            h2_bob = await get(lambda: curl(pod, certs, "/d", None, http2=True))
            assert h2_bob == ("pod GET /d x-user=\n", "2")
            # one TLS connection: matched and unmatched requests, answered in order
            bodies = await get(
                https_keep_alive,
                pod,
                certs,
                [("/1", "alice"), ("/2", "bob"), ("/3", "alice"), ("/4", None)],
            )
            assert bodies == [
                "user-app GET /1 x-user=alice\n",
                "pod GET /2 x-user=bob\n",
                "user-app GET /3 x-user=alice\n",
                "pod GET /4 x-user=\n",
            ]
            # h2 over TLS: streams of one connection routed each its way
            streams: list[tuple[str, str | None]] = [("/s1", "alice"), ("/s2", "bob")]
            streams.append(("/s3", "alice"))
            answers = await get(h2_over_tls, pod, certs, streams)
            assert answers == {
                "/s1": "user-app GET /s1 x-user=alice\n",
                "/s2": "pod GET /s2 x-user=bob\n",
                "/s3": "user-app GET /s3 x-user=alice\n",
            }
            assert len(seen) == 6  # one IncomingConnection per matched request or stream
            # the clients were answered with the session's certificate; one that does not
            # trust it fails its handshake (curl: 60) and nothing reaches anyone
            assert await get(served_certificate, pod, certs) == certs["session_cert"]
            untrusting = [
                *("curl", "-sS", "--max-time", "30", "--resolve"),
                f"{NAME}:{PORT}:{pod.ip}",
            ]
            done = await get(
                lambda: subprocess.run(
                    [*untrusting, f"https://{NAME}:{PORT}/x"],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            )
            assert done.returncode == 60, done.stderr
            assert len(seen) == 6
            tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "trust", ["server_cert: the user app's", "server_cert: another", "trust_roots: another CA"]
)
async def test_tls_delivery_checks_the_user_apps_certificate(
    tls_pod: LocalPod,
    steal_agent: AgentProc,
    user_app: Callable[[bool], int],
    certs: dict[str, Path],
    trust: str,
) -> None:
    """The user app must present the certificate `tls_delivery` trusts; when it does not, the
    request is answered by the pod's app (the agent logs why)."""
    answered_by = "user-app" if trust == "server_cert: the user app's" else "pod"
    wire = tls_wire(certs)
    delivery: dict[str, object] = {"protocol": "tls"}
    if trust == "server_cert: the user app's":
        delivery["server_cert_pem"] = certs["cert"].read_text()
    elif trust == "server_cert: another":
        delivery["server_cert_pem"] = certs["session_cert"].read_text()
    else:
        delivery["trust_roots_pem"] = trustme.CA().cert_pem.bytes().decode()
    wire["delivery"] = delivery
    app_port = user_app(True)
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, app_port, seen)
            flt: dict[str, object] = {"header_filter": "^x-user: alice$"}
            await subscribe(client, 1, PORT, "steal", flt, tls=wire)
            body = await anyio.to_thread.run_sync(curl, tls_pod, certs, "/a", "alice")
            assert body == (f"{answered_by} GET /a x-user=alice\n", "1.1")
            assert len(seen) == 1  # the session connection was opened either way
            tg.cancel_scope.cancel()


def plain_get(pod: LocalPod, path: str, user: str) -> str:
    conn = http.client.HTTPConnection(pod.ip, PORT, timeout=30)
    try:
        conn.request("GET", path, headers={"x-user": user})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.mark.anyio
async def test_plain_http_an_idle_pod_connection_and_a_pod_app_without_tls(
    tls_pod: LocalPod,
    steal_agent: AgentProc,
    user_app: Callable[[bool], int],
    certs: dict[str, Path],
) -> None:
    """With a certificate, a client speaking plain HTTP on the port is filtered as before; the
    pod's app closing an idle TLS keep-alive connection is noticed: the next unmatched request
    goes on a new one (not a 502); a pod's app that does not speak TLS leaves its requests
    with a 502 naming why, while the matched ones still reach the user app."""
    pod = tls_pod
    get = anyio.to_thread.run_sync
    app_port = user_app(False)
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, app_port, seen)
            flt: dict[str, object] = {
                "header_filter": "^x-user: alice$",
                "ports": [PORT, IDLE_PORT],
            }
            tls = tls_wire(certs, "tcp")
            await subscribe(client, 1, PORT, "steal", flt, tls=tls)
            await subscribe(client, 1, IDLE_PORT, "steal", flt, tls=tls)
            assert await get(plain_get, pod, "/p", "alice") == "user-app GET /p x-user=alice\n"
            requests: list[tuple[str, str | None]] = [("/1", "bob"), ("/2", "bob")]
            requests.append(("/3", "alice"))
            bodies = await get(
                lambda: https_keep_alive(pod, certs, requests, port=IDLE_PORT, pause=3.0)
            )
            assert bodies == [
                "pod GET /1 x-user=bob\n",
                "pod GET /2 x-user=bob\n",
                "user-app GET /3 x-user=alice\n",
            ]
            # a pod's app without TLS: the client's TLS is still terminated; matched requests
            # reach the user app, the others get 502 with the reason
            await subscribe(client, 1, PLAIN_PORT, "steal", {**flt, "ports": [PLAIN_PORT]}, tls=tls)
            alice = await get(lambda: curl(pod, certs, "/a", "alice", port=PLAIN_PORT))
            assert alice == ("user-app GET /a x-user=alice\n", "1.1")
            bob, _ = await get(lambda: curl(pod, certs, "/b", "bob", port=PLAIN_PORT))
            assert "is unreachable: TLS with the pod's app failed" in bob, bob
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_without_a_certificate_tls_passes_to_the_pod_untouched(
    tls_pod: LocalPod, steal_agent: AgentProc, certs: dict[str, Path]
) -> None:
    """A filtered steal of the port, no certificate: the client's TLS reaches the pod's app
    itself (its certificate, its answer), whatever the headers inside."""
    pod = tls_pod
    get = anyio.to_thread.run_sync
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, None, seen)
            await subscribe(client, 1, PORT, "steal", {"header_filter": "^x-user: alice$"})
            assert await get(curl, pod, certs, "/a", "alice") == (
                "pod GET /a x-user=alice\n",
                "1.1",
            )
            h2 = await get(lambda: curl(pod, certs, "/b", "alice", http2=True))
            assert h2 == ("pod GET /b x-user=alice\n", "2")
            bodies = await get(https_keep_alive, pod, certs, [("/1", "alice"), ("/2", None)])
            assert bodies == ["pod GET /1 x-user=alice\n", "pod GET /2 x-user=\n"]
            assert seen == []
            assert await get(served_certificate, pod, certs) == certs["cert"]  # the pod's own
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_bad_certificate_is_refused_and_the_port_stays_the_pods(
    tls_pod: LocalPod, steal_agent: AgentProc, certs: dict[str, Path], ca: trustme.CA
) -> None:
    pod = tls_pod
    wire = tls_wire(certs)
    wire["key_pem"] = ca.issue_cert("other.test").private_key_pem.bytes().decode()
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        with pytest.raises(AgentError, match="key does not belong to the certificate"):
            await subscribe(
                client, 1, PORT, "steal", {"header_filter": "^x-user: alice$"}, tls=wire
            )
        body = await anyio.to_thread.run_sync(curl, pod, certs, "/a", "alice")
        assert body == ("pod GET /a x-user=alice\n", "1.1")


def grpc_say(
    pod: LocalPod, certs: dict[str, Path], calls: list[tuple[str, str | None]]
) -> list[str]:
    """Unary gRPC calls over one TLS channel (trusting the test CA), in order: the answers."""
    credentials = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
    options = [("grpc.ssl_target_name_override", NAME)]
    with grpc.secure_channel(f"{pod.ip}:{GRPC_PORT}", credentials, options=options) as channel:
        call = channel.unary_unary("/mirrord.Echo/Say")
        answers = []
        for text, user in calls:
            metadata = [("x-user", user)] if user else None
            answer: bytes = call(text.encode(), metadata=metadata, timeout=20)
            answers.append(answer.decode())
    return answers


@pytest.mark.anyio
async def test_grpc_over_tls_calls_are_routed_by_metadata(
    pod: LocalPod, steal_agent: AgentProc, certs: dict[str, Path]
) -> None:
    """grpcio over TLS (ALPN h2) to a pod whose gRPC app serves TLS: alice's calls reach the
    user app (a plain gRPC server: tls_delivery "tcp"), the others the pod's app, on one
    client channel."""
    python = os.path.realpath(sys.executable)
    env = {**pod.env, "PYTHONPATH": os.path.dirname(os.path.dirname(grpc.__file__))}
    pem = [str(certs["cert"]), str(certs["key"])]
    pod_app = pod.popen_in_pod([python, GRPC_APP, "pod", "0.0.0.0", str(GRPC_PORT), *pem], env=env)
    user = subprocess.Popen(
        [sys.executable, GRPC_APP, "user-app", "127.0.0.1", "0"], stdout=subprocess.PIPE
    )
    try:
        assert pod_app.stdout is not None and user.stdout is not None
        assert pod_app.stdout.readline().strip() == str(GRPC_PORT).encode()
        app_port = int(user.stdout.readline())
        async with AgentClient.open(steal_agent) as client:
            await client.open_channel(1)
            seen: list[AgentConn] = []
            async with anyio.create_task_group() as tg:
                await tg.start(serve_channel, client, 1, app_port, seen)
                flt: dict[str, object] = {"header_filter": "^x-user: alice$", "ports": [GRPC_PORT]}
                await subscribe(client, 1, GRPC_PORT, "steal", flt, tls=tls_wire(certs, "tcp"))
                calls: list[tuple[str, str | None]] = [("a", "alice"), ("b", "bob")]
                calls += [("c", None), ("d", "alice")]
                answers = await anyio.to_thread.run_sync(grpc_say, pod, certs, calls)
                assert answers == [
                    "user-app a x-user=alice",
                    "pod b x-user=bob",
                    "pod c x-user=",
                    "user-app d x-user=alice",
                ]
                assert len(seen) == 2
                tg.cancel_scope.cancel()
    finally:
        for proc in (pod_app, user):
            proc.kill()
            proc.wait(timeout=10)
        if user.stdout is not None:
            user.stdout.close()


# ---------------------------------------------------------------- through `mirrord run`


@pytest.fixture
def mirrord() -> Iterator[Mirrord]:
    with temp_mirrord("mrdt") as cli:
        yield cli


def https_config(tmp_path: Path, tls_steal: dict[str, str], delivery: str) -> Path:
    config = tmp_path / "mirrord.json"
    incoming = {
        "mode": "steal",
        "http_filter": {"header_filter": "^x-user: alice$", "ports": [PORT]},
        "tls_steal": tls_steal,
        "tls_delivery": {"protocol": delivery, "trust_roots": "ca.pem"},
    }
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    return config


def test_mirrord_run_steals_matching_https_requests_with_the_configured_certificate(
    mirrord: Mirrord, tls_pod: LocalPod, certs: dict[str, Path], tmp_path: Path
) -> None:
    """The user app serves HTTPS itself (tls_delivery "tls"), under mirrord; the session's
    certificate files are named relative to the working directory of `mirrord run`."""
    pod = tls_pod
    config = https_config(tmp_path, {"cert": "session.crt", "key": "session.key"}, "tls")
    argv = [sys.executable, TLS_APP, "user-app", "0.0.0.0", str(PORT)]
    argv += [str(certs["cert"]), str(certs["key"])]
    app = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", *argv, cwd=str(tmp_path)
    )
    assert app.stdout is not None
    assert app.stdout.readline().strip() == str(PORT)
    try:
        # the subscription follows listen() asynchronously: wait until alice's are stolen
        wait_for(lambda: curl(pod, certs, "/probe", "alice")[0].startswith("user-app"), 20)
        assert curl(pod, certs, "/a", "alice") == ("user-app GET /a x-user=alice\n", "1.1")
        assert curl(pod, certs, "/b", "bob") == ("pod GET /b x-user=bob\n", "1.1")
        assert curl(pod, certs, "/c", "alice", http2=True) == (
            "user-app GET /c x-user=alice\n",
            "2",
        )
        assert curl(pod, certs, "/d", None, http2=True) == ("pod GET /d x-user=\n", "2")
        bodies = https_keep_alive(pod, certs, [("/1", None), ("/2", "alice"), ("/3", "bob")])
        assert bodies == [
            "pod GET /1 x-user=\n",
            "user-app GET /2 x-user=alice\n",
            "pod GET /3 x-user=bob\n",
        ]
    finally:
        stop_app(app)
    wait_for(lambda: our_rules(pod) == [])
    assert curl(pod, certs, "/after", "alice") == ("pod GET /after x-user=alice\n", "1.1")


def test_mirrord_run_steals_matching_https_requests_over_ipv6(
    mirrord: Mirrord, pod6: LocalPod, certs: dict[str, Path], tmp_path: Path
) -> None:
    """A dual-stack pod whose HTTPS app listens on `::`: IPv6 clients (curl over HTTP/1.1 and
    HTTP/2, Python's ssl on one connection, h2 over TLS) and IPv4 ones are filtered alike; the
    unmatched requests are re-encrypted toward the pod's app at its IPv6 original
    destination."""
    pod = pod6
    library = os.path.dirname(os.path.dirname(h2.__file__))
    pem = [str(certs["cert"]), str(certs["key"])]
    with python_app_in_pod(pod, TLS_APP, PORT, library, "::", *pem):
        config = https_config(tmp_path, {"cert": "session.crt", "key": "session.key"}, "tls")
        argv = [sys.executable, TLS_APP, "user-app", "::", str(PORT), *pem]
        app = mirrord.popen(
            "run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", *argv, cwd=str(tmp_path)
        )
        try:
            assert app.stdout is not None
            assert app.stdout.readline().strip() == str(PORT)
            wait_for(
                lambda: curl(pod, certs, "/probe", "alice", ipv6=True)[0].startswith("user-app"), 20
            )
            for ipv6 in (True, False):
                got = curl(pod, certs, "/a", "alice", ipv6=ipv6)
                assert got == ("user-app GET /a x-user=alice\n", "1.1")
                assert curl(pod, certs, "/b", "bob", ipv6=ipv6) == (
                    "pod GET /b x-user=bob\n",
                    "1.1",
                )
                got = curl(pod, certs, "/c", "alice", http2=True, ipv6=ipv6)
                assert got == ("user-app GET /c x-user=alice\n", "2")
                got = curl(pod, certs, "/d", None, http2=True, ipv6=ipv6)
                assert got == ("pod GET /d x-user=\n", "2")
            requests = [("/1", None), ("/2", "alice"), ("/3", "bob")]
            assert https_keep_alive(pod, certs, requests, ipv6=True) == [
                "pod GET /1 x-user=\n",
                "user-app GET /2 x-user=alice\n",
                "pod GET /3 x-user=bob\n",
            ]
            assert h2_over_tls(pod, certs, requests, ipv6=True) == {
                "/1": "pod GET /1 x-user=\n",
                "/2": "user-app GET /2 x-user=alice\n",
                "/3": "pod GET /3 x-user=bob\n",
            }
        finally:
            stop_app(app)
    wait_for(lambda: ours(pod) == [])


@pytest.mark.parametrize("problem", ["missing", "mismatch", "not-pem"])
def test_a_bad_certificate_stops_mirrord_run_before_any_agent_starts(
    mirrord: Mirrord, pod: LocalPod, certs: dict[str, Path], ca: trustme.CA, problem: str
) -> None:
    tmp_path = certs["cert"].parent  # with the CA and the pod's certificate
    key = tmp_path / "other.key"
    if problem == "mismatch":
        ca.issue_cert("other.test").private_key_pem.write_to_path(str(key))
    elif problem == "not-pem":
        key.write_bytes(b"\x30\x82\x01\x0a binary, DER perhaps")
    config = https_config(tmp_path, {"cert": "tls.crt", "key": str(key)}, "tcp")
    run = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", "true", cwd=str(tmp_path)
    )
    _, err = run.communicate(timeout=60)
    expected = {
        "missing": "cannot read feature.network.incoming.tls_steal.key",
        "mismatch": "the key does not belong to the certificate",
        "not-pem": "is not a PEM file",
    }[problem]
    assert run.returncode != 0
    assert expected in err, err
    assert "Traceback" not in err
    status = mirrord.status()
    assert status["agents"] == [] and status["sessions"] == []
    assert our_rules(pod) == []
