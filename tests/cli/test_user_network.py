"""Outgoing traffic and DNS as a developer meets them through `mirrord run`: real programs
(python's socket/urllib, curl, getent, node) talk to services and names that exist only in a
local pod, and what they see must be what the same program sees inside the pod.

Each case is a regression found by driving these programs: getaddrinfo's error codes
(EAI_NONAME came out as EAI_AGAIN), gethostbyname's canonical name and glibc's `::1` ->
127.0.0.1 for AF_INET, a named service's socket types, a non-blocking connect refused at once
instead of in progress, a polled non-blocking connect opening one target connection per
poll, UDP to a port that had nobody listening lost for good, and an outgoing filter naming
`localhost` that never matched."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec, create_pod
from tests.cli.conftest import Mirrord, agent_pids, python_app

pytestmark = pytest.mark.netns

NODE = shutil.which("node")
GETENT = shutil.which("getent")
CURL = shutil.which("curl")

SPEC = PodSpec(
    hosts={"pod-only-svc": "127.0.0.1", "pod-six": "::1"},
    dns_records={"db.cluster.local": "10.213.250.9", "web.svc.cluster.local": "127.0.0.1"},
    resolv_conf="nameserver 127.0.0.1\nsearch svc.cluster.local cluster.local\n"
    "options timeout:1 attempts:1\n",
    echo_port=7777,
    http_port=8080,
)

# A TCP server on the pod's loopback that tells each client how many connections it accepted.
COUNTING_SERVER = """
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 7171))
l.listen(64)
print("ready", flush=True)
n = 0
l.settimeout(120)
while n < 1000:
    c, _ = l.accept()
    n += 1
    c.sendall(b"connection %d\\n" % n)
    c.close()
"""

UDP_SERVER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9997))
s.settimeout(20)
print("ready", flush=True)
data, peer = s.recvfrom(100)
s.sendto(b"echo " + data, peer)
"""


@pytest.fixture(scope="module")
def net_pod() -> Iterator[LocalPod]:
    from mirrord.localpod import cleanup_leftovers

    cleanup_leftovers()
    with create_pod(SPEC) as made:
        yield made


def start_in_pod(pod: LocalPod, source: str) -> subprocess.Popen[bytes]:
    """A python server inside the pod, once it printed `ready`."""
    proc = pod.popen_in_pod([sys.executable, "-c", source])
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else ""
    return proc


def run_both(mirrord: Mirrord, pod: LocalPod, argv: Sequence[str], *flags: str) -> tuple[str, str]:
    """(stdout through mirrord, stdout of the same command inside the pod)."""
    through = mirrord.run("run", "-t", f"pid/{pod.pid}", *flags, "--", *argv)
    inside = pod.run_in_pod(list(argv), check=False)
    assert through.returncode == inside.returncode, (through.stderr, inside.stderr)
    return through.stdout, inside.stdout.decode()


DNS_APP = """
import socket

def gai(*args, **kwargs):
    try:
        found = socket.getaddrinfo(*args, **kwargs)
        return sorted({(a[0].name, a[1].name, a[3], a[4][0]) for a in found})
    except socket.gaierror as e:
        return ("gaierror", e.errno)

def ghbn(name):
    try:
        return socket.gethostbyname(name), socket.gethostbyname_ex(name)
    except OSError as e:
        return (type(e).__name__, e.errno)

print("unknown", gai("nosuchname", 80))
print("unknown v6", gai("nosuchname", 80, socket.AF_INET6))
print("hosts name, no v6", gai("pod-only-svc", 80, socket.AF_INET6))
print("dns name, no AAAA", gai("db", 80, socket.AF_INET6))
print("search + canon", gai("db", 80, 0, socket.SOCK_STREAM, 0, socket.AI_CANONNAME))
print("v4mapped", gai("web", 80, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_V4MAPPED))
print("named service", gai("pod-only-svc", "http"))
print("numeric service", gai("pod-only-svc", 80))
print("gethostbyname db", ghbn("db"))
print("gethostbyname ::1-only", ghbn("pod-six"))
print("gethostbyname unknown", ghbn("nosuchname"))
print("hosts name, trailing dot", gai("pod-only-svc.", 80))
print("upper case", gai("DB", 80, 0, socket.SOCK_STREAM, 0, socket.AI_CANONNAME))
"""


def test_dns_answers_and_errors_match_the_pod(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    app = tmp_path / "dns_app.py"
    app.write_text(DNS_APP)
    through, inside = run_both(mirrord, net_pod, [sys.executable, str(app)])
    assert through == inside
    assert "unknown ('gaierror', -2)" in through  # EAI_NONAME, not EAI_AGAIN
    assert "dns name, no AAAA ('gaierror', -5)" in through  # EAI_NODATA
    assert "('db.cluster.local', [], ['10.213.250.9'])" in through  # canonical h_name


@pytest.mark.skipif(GETENT is None, reason="getent is not installed")
def test_getent_shows_the_canonical_name_and_fails_like_the_pod(
    mirrord: Mirrord, net_pod: LocalPod
) -> None:
    for argv in (
        ["getent", "hosts", "db"],
        ["getent", "ahosts", "web"],
        ["getent", "hosts", "x-none"],
    ):
        through, inside = run_both(mirrord, net_pod, argv)
        assert through == inside, argv
    through, _ = run_both(mirrord, net_pod, ["getent", "hosts", "db"])
    assert through.split() == ["10.213.250.9", "db.cluster.local"]


NODE_DNS = """
const dns = require('dns');
dns.lookup('nosuchname', (e) => {
  dns.lookup('db', {all: true}, (e2, a) => console.log(e && e.code, JSON.stringify(a)));
});
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_node_lookup_of_an_unknown_name_is_enotfound(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    script = tmp_path / "dns.js"
    script.write_text(NODE_DNS)
    through, inside = run_both(mirrord, net_pod, [str(NODE), str(script)])
    assert through == inside == 'ENOTFOUND [{"address":"10.213.250.9","family":4}]\n'


CONNECT_APP = """
import errno, select, socket, sys

def name(code):
    return errno.errorcode.get(code, code)

# refused: in progress first, the refusal in SO_ERROR, as the kernel does it
s = socket.socket()
s.setblocking(False)
first = s.connect_ex(("127.0.0.1", 5555))
select.select([], [s], [], 5)
print("nonblocking refused", name(first), name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))
s.close()
try:
    socket.create_connection(("pod-only-svc", 5555), timeout=5)
except OSError as e:
    print("blocking refused", type(e).__name__, name(e.errno))

# a non-blocking connect polled with connect() again until it is connected
s = socket.socket()
s.setblocking(False)
codes = [s.connect_ex(("127.0.0.1", 7171))]
for _ in range(4):
    select.select([], [s], [], 5)
    codes.append(s.connect_ex(("127.0.0.1", 7171)))
print("polled", [name(c) for c in codes])
s.setblocking(True)
print("first", s.recv(100).decode().strip())
print("second", socket.create_connection(("127.0.0.1", 7171), timeout=5).recv(100).decode().strip())

# the local address of a connected UDP socket is the target's, as for TCP
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((sys.argv[1], 9))
print("udp local address", u.getsockname()[0])
"""


def test_refused_and_polled_nonblocking_connects_behave_as_in_the_pod(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    app = tmp_path / "connect_app.py"
    app.write_text(CONNECT_APP)
    server = start_in_pod(net_pod, COUNTING_SERVER)
    try:
        result = mirrord.run(
            "run", "-t", f"pid/{net_pod.pid}", "--", sys.executable, str(app), net_pod.ip
        )
    finally:
        server.kill()
        server.wait(timeout=5)
    assert result.stdout.splitlines() == [
        "nonblocking refused EINPROGRESS ECONNREFUSED",
        "blocking refused ConnectionRefusedError ECONNREFUSED",
        "polled ['EINPROGRESS', 0, 'EISCONN', 'EISCONN', 'EISCONN']",
        # each poll used to open one more connection in the pod
        "first connection 1",
        "second connection 2",
        f"udp local address {net_pod.ip}",
    ], result.stderr


UDP_APP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(b"early", ("127.0.0.1", 9997))
try:
    print("early", s.recvfrom(100), flush=True)
except OSError as e:
    print("early", type(e).__name__, flush=True)
sys.stdin.readline()  # the pod's server runs now
s.settimeout(5)
s.sendto(b"again", ("127.0.0.1", 9997))
data, peer = s.recvfrom(100)
print("again", data.decode(), peer, flush=True)
"""


def test_udp_reaches_a_server_that_started_after_a_refused_datagram(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    app = tmp_path / "udp_app.py"
    app.write_text(UDP_APP)
    proc = mirrord.popen(
        "run", "-t", f"pid/{net_pod.pid}", "--", sys.executable, str(app), stdin=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "early TimeoutError\n"
    server = start_in_pod(net_pod, UDP_SERVER)
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        server.kill()
        server.wait(timeout=5)
    # the relay used to end with the first "port unreachable": later datagrams were lost
    assert out == "again echo again ('127.0.0.1', 9997)\n", err
    assert proc.returncode == 0


class _LocalHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"from this machine\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def machine_service() -> Iterator[int]:
    """An HTTP service on this machine's loopback only (the pod has none on its port)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LocalHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_local_filter_naming_localhost_keeps_a_machine_service_local(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path, machine_service: int
) -> None:
    port = machine_service
    config = tmp_path / "mirrord.json"
    outgoing = {"filter": {"local": [f"localhost:{port}"]}}
    config.write_text(json.dumps({"feature": {"network": {"outgoing": outgoing}}}))
    # curl resolves `localhost` itself and python through getaddrinfo: both must match
    fetch = (
        "import urllib.request as u, sys\n"
        "for url in sys.argv[1:]:\n"
        "    print(u.urlopen(url, timeout=10).read().decode().strip())\n"
    )
    urls = [f"http://localhost:{port}/", f"http://127.0.0.1:{port}/", "http://127.0.0.1:8080/pod"]
    target = ("run", "-t", f"pid/{net_pod.pid}", "-f", str(config), "--")
    result = mirrord.run(*target, sys.executable, "-c", fetch, *urls)
    assert result.stdout.splitlines() == [
        "from this machine",
        "from this machine",
        "pod GET /pod",
    ], result.stderr
    result = mirrord.run(*target, str(CURL), "-sS", "-m", "10", f"http://localhost:{port}/")
    assert result.stdout == "from this machine\n", result.stderr


RESET_SERVER = """
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 7373))
l.listen(8)
l.settimeout(30)
print("ready", flush=True)
c, _ = l.accept()
c.settimeout(10)
print("got", c.recv(10).decode(), flush=True)
c.sendall(b"ok")
try:
    print("then", c.recv(10), flush=True)
except OSError as e:
    print("then", type(e).__name__, flush=True)
"""

RESET_APP = """
import socket, struct
s = socket.create_connection(("127.0.0.1", 7373), timeout=5)
s.sendall(b"hello")
assert s.recv(2) == b"ok"  # the server has read it
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()  # a reset, not an end
"""


def test_an_app_that_resets_its_connection_resets_the_pods_peer(
    mirrord: Mirrord, net_pod: LocalPod
) -> None:
    server = start_in_pod(net_pod, RESET_SERVER)
    try:
        result = mirrord.run(
            "run", "-t", f"pid/{net_pod.pid}", "--", sys.executable, "-c", RESET_APP
        )
        assert result.returncode == 0, result.stderr
        out, _ = server.communicate(timeout=20)
    finally:
        server.kill()
        server.wait(timeout=5)
    # the pod's server used to see a clean end of stream (b'')
    assert out.decode().splitlines() == ["got hello", "then ConnectionResetError"]


UDP_ECHO_SERVER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9996))
s.settimeout(30)
print("ready", flush=True)
for _ in range(1000):
    data, peer = s.recvfrom(100)
    s.sendto(data, peer)
"""

UDP_MANY_APP = """
import os, socket, sys
shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
shared.settimeout(5)
shared.sendto(b"before", ("127.0.0.1", 9996))
assert shared.recvfrom(100)[0] == b"before"
child = os.fork()
if child == 0:
    shared.close()  # the child's copy: the parent's relay must stay
    os._exit(0)
os.waitpid(child, 0)
shared.sendto(b"after", ("127.0.0.1", 9996))
assert shared.recvfrom(100)[0] == b"after"
for i in range(150):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"q%d" % i, ("127.0.0.1", 9996))
    assert s.recvfrom(100)[0] == b"q%d" % i
    s.close()
print("done", flush=True)
sys.stdin.readline()
"""


def test_closed_udp_sockets_do_not_pile_up_in_the_agent(
    mirrord: Mirrord, net_pod: LocalPod
) -> None:
    # a statsd or DNS client opens a socket per message: each used to keep a relay (a daemon
    # socket and an agent socket in the pod) until the app exited
    server = start_in_pod(net_pod, UDP_ECHO_SERVER)
    app = [sys.executable, "-c", UDP_MANY_APP]
    proc = mirrord.popen("run", "-t", f"pid/{net_pod.pid}", "--", *app, stdin=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "done\n", proc.stderr.read() if proc.stderr else ""
        agents = agent_pids(mirrord.runtime)
        assert agents
        open_fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in agents)
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.communicate(timeout=20)
    finally:
        server.kill()
        server.wait(timeout=5)
    assert open_fds < 100, f"{open_fds} fds open in the agent after 150 closed UDP sockets"


SELF_CONNECT_APP = """
import socket, sys, threading

def serve(port, name):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(8)

    def answer():
        while True:
            conn, _ = listener.accept()
            conn.sendall(name.encode() + b"\\n")
            conn.close()

    threading.Thread(target=answer, daemon=True).start()

free, busy = int(sys.argv[1]), int(sys.argv[2])
serve(free, "self")
serve(busy, "self, bound elsewhere")
for port in (free, busy):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    print(s.makefile("rb").readline().decode().strip(), s.getpeername())
"""


def test_a_loopback_connect_to_the_apps_own_port_stays_local(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    # `busy` is taken on this machine, so the app's listener is really bound elsewhere; its
    # loopback connects to both ports must reach the app itself, as they do in the pod (they
    # used to go to the pod, where nobody listens on them: refused)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free = probe.getsockname()[1]
    probe.close()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy = holder.getsockname()[1]
    try:
        app = python_app(tmp_path, SELF_CONNECT_APP)
        result = mirrord.run("run", "-t", f"pid/{net_pod.pid}", "--", *app, str(free), str(busy))
    finally:
        holder.close()
    assert result.stdout.splitlines() == [
        f"self ('127.0.0.1', {free})",
        f"self, bound elsewhere ('127.0.0.1', {busy})",
    ], result.stderr


UDP_SINK = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9993))
s.settimeout(1)
print("ready", flush=True)
expected = int(sys.argv[1])
seen = set()
deadline = time.monotonic() + 60
while len(seen) < expected and time.monotonic() < deadline:
    try:
        seen.add(s.recvfrom(100)[0].decode())
    except TimeoutError:
        pass
print(json.dumps(sorted(seen)), flush=True)
"""

LAST_DATAGRAM_APP = """
import socket, sys
for i in range(int(sys.argv[1])):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.connect(("127.0.0.1", 9993))
    c.send(b"connected %d" % i)
    c.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"sendto %d" % i, ("127.0.0.1", 9993))
    u.close()
"""


def test_a_datagram_sent_just_before_close_reaches_the_pod(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    # closing the socket used to end the relay at once, dropping what it had not read yet
    runs = 25
    sink = net_pod.popen_in_pod([sys.executable, "-c", UDP_SINK, str(2 * runs)])
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline() == b"ready\n"
        app = python_app(tmp_path, LAST_DATAGRAM_APP)
        result = mirrord.run("run", "-t", f"pid/{net_pod.pid}", "--", *app, str(runs))
        assert result.returncode == 0, result.stderr
        out, _ = sink.communicate(timeout=70)
    finally:
        sink.kill()
        sink.wait(timeout=5)
    arrived = json.loads(out.decode().splitlines()[-1])
    expected = [f"{how} {i}" for how in ("connected", "sendto") for i in range(runs)]
    assert sorted(arrived) == sorted(expected), sorted(set(expected) - set(arrived))


UNIX_SERVER = """
import os, socket
path = "/app/svc.sock"
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(8)
s.settimeout(30)
print("ready", flush=True)
for _ in range(2):
    c, _ = s.accept()
    c.sendall(b"pod unix socket: " + c.recv(100))
    c.close()
"""

UNIX_APP = """
import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect("/app/svc.sock")
s.sendall(b"hello")
print(s.recv(100).decode(), s.getpeername(), os.path.exists("/app/svc.sock"))
s.close()
try:
    local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    local.connect("/app/not-listed.sock")  # not in unix_streams: stays on this machine
except OSError as e:
    print("not listed", type(e).__name__)
"""


def test_unix_streams_reach_the_pods_unix_socket(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    # a unix socket that exists only in the pod's file system (it used to be "not supported
    # yet": the connect stayed on this machine and failed)
    config = tmp_path / "mirrord.json"
    outgoing = {"unix_streams": ["^/app/svc\\.sock$"]}
    config.write_text(json.dumps({"feature": {"network": {"outgoing": outgoing}}}))
    server = net_pod.popen_in_pod([sys.executable, "-c", UNIX_SERVER])
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == b"ready\n", server.stderr
        app = python_app(tmp_path, UNIX_APP)
        result = mirrord.run("run", "-t", f"pid/{net_pod.pid}", "-f", str(config), "--", *app)
    finally:
        server.kill()
        server.wait(timeout=5)
    assert result.stdout.splitlines() == [
        "pod unix socket: hello /app/svc.sock True",
        "not listed FileNotFoundError",
    ], result.stderr
    assert "unix_streams" not in result.stderr  # no "not supported" warning


# What the kernel itself says of a connected socket (a raw getsockname system call, which the
# layer does not see): the pod's address for the agent's own socket, loopback for a relay.
HANDOVER_APP = """
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)

def kernel_address(s):
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    assert libc.syscall(51, s.fileno(), buf, ctypes.byref(size)) == 0  # getsockname, x86_64
    return socket.inet_ntoa(buf.raw[4:8])

t = socket.create_connection((sys.argv[1], 7777), timeout=10)
t.sendall(b"ping")
print("tcp", t.recv(100).decode(), t.getpeername()[0] == sys.argv[1], kernel_address(t))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(10)
u.connect((sys.argv[1], 9997))
u.send(b"hi")
print("udp", u.recv(100).decode(), u.getsockname()[0] == sys.argv[1], kernel_address(u))
# a connected UDP socket sending elsewhere, then connected to a socket of this machine
here = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
here.bind(("127.0.0.1", 0))
here.settimeout(10)
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
v.connect((sys.argv[1], 9))
v.sendto(b"sent elsewhere", (sys.argv[1], 9996))
v.connect(here.getsockname())
v.send(b"local again")
print("udp local", here.recv(100).decode(), kernel_address(v))
"""

# Prints the first datagram it gets on port 9996.
FIRST_DATAGRAM = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9996))
s.settimeout(20)
print("ready", flush=True)
print(s.recv(100).decode(), flush=True)
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers of x86_64")
@pytest.mark.parametrize("handover", [True, False])
def test_a_local_targets_connections_are_handed_over_unless_switched_off(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path, handover: bool
) -> None:
    # hand-over: the app's socket is the agent's own, connected in the pod's network namespace
    # (the kernel says so); feature.network.outgoing.handover false relays it over loopback
    config = tmp_path / "mirrord.json"
    outgoing = {"handover": handover, "ignore_localhost": True}
    config.write_text(json.dumps({"feature": {"network": {"outgoing": outgoing}}}))
    app = tmp_path / "handover_app.py"
    app.write_text(HANDOVER_APP)
    server = start_in_pod(net_pod, UDP_SERVER)
    sink = start_in_pod(net_pod, FIRST_DATAGRAM)
    try:
        result = mirrord.run(
            "run", "-t", f"pid/{net_pod.pid}", "-f", str(config), "--",
            sys.executable, str(app), net_pod.ip,
        )  # fmt: skip
        assert sink.stdout is not None
        sunk = sink.stdout.readline().decode().strip()
    finally:
        for proc in (server, sink):
            proc.kill()
            proc.wait(timeout=5)
    assert result.returncode == 0, result.stderr
    kernel = net_pod.ip if handover else "127.0.0.1"
    assert result.stdout.splitlines() == [
        f"tcp ping True {kernel}",
        f"udp echo hi True {kernel}",
        "udp local local again 127.0.0.1",  # a socket of this machine again
    ], result.stderr
    assert sunk == "sent elsewhere"  # from the pod, as its own socket would send it
    [agent] = mirrord.status()["agents"]
    # three sockets handed over (the TCP one and two connected UDP ones), or none
    assert agent["link"]["handed_over"] == (3 if handover else 0)


TCP_SINK = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9995))
s.listen(4)
s.settimeout(60)
print("ready", flush=True)
for _ in range(int(sys.argv[1])):
    c, _ = s.accept()
    c.settimeout(30)
    total = 0
    try:
        while data := c.recv(1 << 20):
            total += len(data)
    except OSError as e:
        print("error", type(e).__name__, total, flush=True)
        continue
    print("got", total, flush=True)
"""

LAST_BYTES_APP = """
import os, socket, sys
s = socket.create_connection((sys.argv[1], 9995), timeout=20)
s.sendall(b"z" * int(sys.argv[2]))  # returns once the bytes are in the kernel's buffers
os._exit(0)  # at once: the kernel closes the socket, with what the daemon has not read yet
"""


def test_bytes_written_just_before_exit_reach_the_pod(
    mirrord: Mirrord, net_pod: LocalPod, tmp_path: Path
) -> None:
    """A relayed connection (hand-over off): what the app wrote before exiting goes on to
    the pod's peer, followed by an orderly close, as a process exiting with an open socket
    does (the daemon used to close the process's channel at once, resetting the connection
    with the bytes it had not read yet)."""
    runs, size = 3, 6 * 1024 * 1024  # more than the credit window and the socket buffers
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"network": {"outgoing": {"handover": False}}}}))
    sink = start_in_pod(net_pod, TCP_SINK.replace("int(sys.argv[1])", str(runs)))
    try:
        app = python_app(tmp_path, LAST_BYTES_APP)
        for _ in range(runs):
            result = mirrord.run(
                "run", "-t", f"pid/{net_pod.pid}", "-f", str(config), "--",
                *app, net_pod.ip, str(size),
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
        out, _ = sink.communicate(timeout=90)
    finally:
        sink.kill()
        sink.wait(timeout=5)
    assert out.decode().splitlines() == [f"got {size}"] * runs
