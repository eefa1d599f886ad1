"""HTTP/2 under a filtered steal, end to end: `curl --http2-prior-knowledge` sends several
requests over one connection to a pod whose app speaks h2c; `mirrord run` steals the port
with a header filter; the matching streams are answered by the user app (an h2c server run
under mirrord), the others by the pod's app."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import h2
import pytest

from mirrord.localpod import LocalPod
from tests._agent_client import AgentClient, AgentConn
from tests._agent_process import AgentProc
from tests.cli.conftest import Mirrord
from tests.incoming.conftest import (
    python_app_in_pod,
    run_filtered_steal,
    serve_channel,
    serving,
    subscribe,
)
from tests.incoming.test_end_to_end import our_rules, stop_app, wait_for
from tests.incoming.test_steal_rules import ours

pytestmark = [pytest.mark.netns, pytest.mark.slow]

H2_APP = str(Path(__file__).with_name("_h2_app.py"))
PORT = 8090


@pytest.fixture
def h2_pod(pod: LocalPod) -> Iterator[LocalPod]:
    """The pod with an h2c app on PORT."""
    with python_app_in_pod(pod, H2_APP, PORT, os.path.dirname(os.path.dirname(h2.__file__))) as p:
        yield p


def curl_h2(
    pod: LocalPod, path: str, user: str | None, *, upgrade: bool = False, ipv6: bool = False
) -> str:
    """One request with `curl --http2-prior-knowledge` (or `--http2`: HTTP/1.1 with `Upgrade:
    h2c`), to the pod's IPv4 address or its IPv6 one: the body (asserting HTTP/2)."""
    mode = "--http2" if upgrade else "--http2-prior-knowledge"
    argv = ["curl", "-sS", "-g", "--max-time", "30", mode, "-w", "|%{http_version}"]
    if user is not None:
        argv += ["-H", f"x-user: {user}"]
    argv.append(f"http://[{pod.ip6}]:{PORT}{path}" if ipv6 else f"http://{pod.ip}:{PORT}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    body, _, version = out.rpartition("|")
    assert version == "2", out
    return body


@pytest.fixture
def h2_pod6(pod6: LocalPod) -> Iterator[LocalPod]:
    """A dual-stack pod with an h2c app on PORT of both families."""
    library = os.path.dirname(os.path.dirname(h2.__file__))
    with python_app_in_pod(pod6, H2_APP, PORT, library, host="::") as p:
        yield p


# A node http2 client: every request on one session (one TCP connection), all at once, each
# `[path, user or null, body size]`; prints `[[status, body length, first line], ...]` and the
# number of sockets the session used. (curl 7.88 cannot reuse an h2c connection: its second
# request fails with "Error in the HTTP2 framing layer" against any server.)
_NODE_CLIENT = r"""
const http2 = require('http2');
const [url, reqs] = [process.argv[1], JSON.parse(process.argv[2])];
const session = http2.connect(url);
let sockets = 0;
session.on('connect', () => { sockets += 1; });
Promise.all(reqs.map(([path, user, size]) => new Promise((resolve, reject) => {
  const headers = {':path': path, ':method': size ? 'POST' : 'GET'};
  if (user) headers['x-user'] = user;
  const req = session.request(headers);
  const chunks = [];
  let status = 0;
  req.on('response', (h) => { status = h[':status']; });
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const line = body.toString('latin1').split(String.fromCharCode(10))[0];
    resolve([status, body.length, line]);
  });
  req.on('error', reject);
  if (size) req.end(Buffer.alloc(size, 120));  // a GET is ended by node itself
}))).then((answers) => {
  console.log(JSON.stringify({answers, sockets}));
  session.close();
}, (err) => { console.error(String(err)); process.exit(1); });
"""


def node_h2(pod: LocalPod, requests: list[tuple[str, str | None, int]]) -> dict[str, object]:
    argv = ["node", "-e", _NODE_CLIENT, f"http://{pod.ip}:{PORT}", json.dumps(requests)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_h2c_streams_matching_the_filter_reach_the_user_app_the_rest_the_pod(
    mirrord: Mirrord, h2_pod: LocalPod, tmp_path: Path
) -> None:
    pod = h2_pod
    assert curl_h2(pod, "/before", "alice") == "pod GET /before x-user=alice\n"
    http_filter = {"header_filter": "^x-user: alice$"}
    config = tmp_path / "mirrord.json"
    app = run_filtered_steal(
        mirrord, pod, config, app=H2_APP, name="user-app", port=PORT, http_filter=http_filter
    )
    try:
        # the subscription follows listen() asynchronously: wait until alice's are stolen
        wait_for(lambda: curl_h2(pod, "/probe", "alice").startswith("user-app"), 20)
        assert curl_h2(pod, "/a", "alice") == "user-app GET /a x-user=alice\n"
        assert curl_h2(pod, "/b", "bob") == "pod GET /b x-user=bob\n"
        assert curl_h2(pod, "/c", None) == "pod GET /c x-user=\n"
        # HTTP/1.1 with Upgrade: h2c: the agent switches (the pod's app speaks HTTP/2) and the
        # upgrade request, stream 1, is routed like any stream
        assert curl_h2(pod, "/u1", "alice", upgrade=True) == "user-app GET /u1 x-user=alice\n"
        assert curl_h2(pod, "/u2", "bob", upgrade=True) == "pod GET /u2 x-user=bob\n"
        big = 3 * 1024 * 1024  # far past every flow-control window, both ways
        requests = [
            ("/1", "alice", 0),
            ("/2", "bob", 0),
            ("/3", None, 0),
            ("/4", "alice", big),
            ("/5", "carol", big),
            ("/6", "alice", 10),
        ]
        result = node_h2(pod, requests)
        assert result["sockets"] == 1
        answers = result["answers"]
        assert isinstance(answers, list)
        expected = []
        for path, user, size in requests:
            who = "user-app" if user == "alice" else "pod"
            line = f"{who} {'POST' if size else 'GET'} {path} x-user={user or ''}"
            expected.append([200, len(line) + 1 + size, line])
        assert answers == expected
    finally:
        stop_app(app)
    wait_for(lambda: our_rules(pod) == [])
    assert curl_h2(pod, "/after", "alice") == "pod GET /after x-user=alice\n"


def test_h2c_streams_are_filtered_over_ipv6_as_over_ipv4(
    mirrord: Mirrord, h2_pod6: LocalPod, tmp_path: Path
) -> None:
    """A dual-stack pod: the user app (on `::`) gets the matching streams of IPv6 clients and
    of IPv4 ones; the others reach the pod's app at its IPv6 (or IPv4) original destination."""
    pod = h2_pod6
    app = run_filtered_steal(
        mirrord,
        pod,
        tmp_path / "mirrord.json",
        app=H2_APP,
        name="user-app",
        port=PORT,
        http_filter={"header_filter": "^x-user: alice$"},
        host="::",
    )
    try:
        wait_for(lambda: curl_h2(pod, "/probe", "alice", ipv6=True).startswith("user-app"), 20)
        for ipv6 in (True, False):
            assert curl_h2(pod, "/a", "alice", ipv6=ipv6) == "user-app GET /a x-user=alice\n"
            assert curl_h2(pod, "/b", "bob", ipv6=ipv6) == "pod GET /b x-user=bob\n"
            assert curl_h2(pod, "/c", None, ipv6=ipv6) == "pod GET /c x-user=\n"
            got = curl_h2(pod, "/u", "alice", upgrade=True, ipv6=ipv6)
            assert got == "user-app GET /u x-user=alice\n"
    finally:
        stop_app(app)
    wait_for(lambda: ours(pod) == [])
    assert curl_h2(pod, "/after", "alice", ipv6=True) == "pod GET /after x-user=alice\n"


@pytest.fixture
def user_h2_app() -> Iterator[int]:
    """The user app's stand-in on the host (no mirrord): an h2c server; its port."""
    proc = subprocess.Popen(
        [sys.executable, H2_APP, "user-app", "127.0.0.1", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.anyio
async def test_agent_routes_h2c_streams_to_the_session_and_the_pod(
    h2_pod: LocalPod, steal_agent: AgentProc, user_h2_app: int
) -> None:
    """The agent alone, with the daemon's relay played by the test: each matched stream is an
    IncomingConnection of its own carrying an HTTP/2 connection to the user app."""
    pod = h2_pod
    async with serving(steal_agent, user_h2_app) as (client, seen):
        await subscribe(client, 1, PORT, "steal", {"header_filter": "^x-user: alice$"})
        get = anyio.to_thread.run_sync
        assert await get(curl_h2, pod, "/a", "alice") == "user-app GET /a x-user=alice\n"
        assert await get(curl_h2, pod, "/b", "bob") == "pod GET /b x-user=bob\n"
        requests = [("/1", "alice", 0), ("/2", None, 0), ("/3", "alice", 100_000)]
        result = await get(node_h2, pod, requests)
        assert result["sockets"] == 1
        assert result["answers"] == [
            [200, 29, "user-app GET /1 x-user=alice"],
            [200, 19, "pod GET /2 x-user="],
            [200, 100_030, "user-app POST /3 x-user=alice"],
        ]
        assert len(seen) == 3  # one IncomingConnection per matched stream


def _http1_upgrade_get(pod: LocalPod, path: str, user: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(pod.ip, 8080, timeout=20)
    try:
        headers = {
            "connection": "Upgrade, HTTP2-Settings",
            "upgrade": "h2c",
            "http2-settings": "AAMAAABkAAQAAP__",
            "x-user": user,
        }
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.anyio
async def test_an_h2c_upgrade_to_an_http1_pod_app_stays_http1(
    pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    """The pod's app on 8080 speaks HTTP/1.1 only: the agent does not switch; the request is
    filtered as HTTP/1.1 and answered as it would be without mirrord."""
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, local_app("user-app"), seen)
            await subscribe(client, 1, 8080, "steal", {"header_filter": "^x-user: alice$"})
            get = anyio.to_thread.run_sync
            assert await get(_http1_upgrade_get, pod, "/a", "alice") == (
                200,
                b"user-app GET /a x-user=alice\n",
            )
            assert await get(_http1_upgrade_get, pod, "/b", "bob") == (200, b"pod GET /b\n")
            tg.cancel_scope.cancel()


def test_mirror_copies_each_h2c_stream_its_filter_matches(
    mirrord: Mirrord, h2_pod: LocalPod, tmp_path: Path
) -> None:
    """Mirror mode with a header filter: the pod's app answers every stream; each of alice's
    streams (of one client connection too) reaches the user app as a copy of its own."""
    pod = h2_pod
    log = tmp_path / "seen.log"
    log.touch()
    config = tmp_path / "mirrord.json"
    http_filter = {"header_filter": "^x-user: alice$", "ports": [PORT]}
    feature = {
        "network": {"incoming": {"mode": "mirror", "http_filter": http_filter}},
        "fs": {"mode": "local"},  # the user app's log is a file of this machine
    }
    config.write_text(json.dumps({"feature": feature}))
    argv = [sys.executable, H2_APP, "user-app", "0.0.0.0", str(PORT), str(log)]
    app = mirrord.popen("run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", *argv)
    assert app.stdout is not None
    assert app.stdout.readline().strip() == str(PORT)

    def seen() -> list[str]:
        return [line for line in log.read_text().splitlines() if "/probe" not in line]

    def probe() -> bool:
        assert curl_h2(pod, "/probe", "alice") == "pod GET /probe x-user=alice\n"
        return "/probe" in log.read_text()

    try:
        # the subscription follows listen() asynchronously: wait until alice's are copied
        wait_for(probe, 20)
        requests = [("/1", "alice", 0), ("/2", "bob", 0), ("/3", "alice", 200_000), ("/4", None, 0)]
        result = node_h2(pod, requests)
        assert result["sockets"] == 1
        answers = result["answers"]
        assert isinstance(answers, list)
        assert [a[2] for a in answers] == [
            f"pod {'POST' if size else 'GET'} {path} x-user={user or ''}"
            for path, user, size in requests
        ]
        wait_for(lambda: len(seen()) >= 2, 20)
        time.sleep(0.5)  # (and nothing more comes)
        assert sorted(seen()) == ["GET /1 x-user=alice len=0", "POST /3 x-user=alice len=200000"]
    finally:
        stop_app(app)


@pytest.mark.anyio
async def test_an_http1_only_user_app_behind_a_matched_h2_stream_gets_a_clear_502(
    h2_pod: LocalPod, steal_agent: AgentProc, local_app: Callable[[str], int]
) -> None:
    """The session's user app speaks HTTP/1.1 only: a stream its filter matches is not
    translated; the client gets 502 saying why and what to do; other streams are unaffected."""
    pod = h2_pod
    async with AgentClient.open(steal_agent) as client:
        await client.open_channel(1)
        seen: list[AgentConn] = []
        async with anyio.create_task_group() as tg:
            await tg.start(serve_channel, client, 1, local_app("user-app"), seen)
            await subscribe(client, 1, PORT, "steal", {"header_filter": "^x-user: alice$"})
            get = anyio.to_thread.run_sync
            answer = await get(curl_h2, pod, "/a", "alice")
            assert answer.startswith("mirrord: the user app did not answer in HTTP/2"), answer
            assert "serve h2c on this port" in answer
            assert await get(curl_h2, pod, "/b", "bob") == "pod GET /b x-user=bob\n"
            tg.cancel_scope.cancel()
