"""Sockets and DNS under the layer: outgoing through daemon relays, incoming subscriptions
with the real peer reported, DNS through the target; and their local bypasses."""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mirrord.layer import LayerSettings
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import PYTHON, Runner


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"served {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ("127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_python_connect_goes_through_the_relay(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import socket
s = socket.create_connection(('192.0.2.55', 80), timeout=10)
print(s.makefile('rb').readline().decode().strip())
print(s.getpeername(), s.getsockname())
"""
    out = run.py(code).stdout.decode().splitlines()
    assert out == ["hello 192.0.2.55:80", "('192.0.2.55', 80) ('192.0.2.2', 40000)"]
    assert daemon.kinds() == ["LayerConnect"]


def test_nonblocking_connect_reports_einprogress(run: Runner) -> None:
    code = """
import errno, select, socket
s = socket.socket()
s.setblocking(False)
rc = s.connect_ex(('192.0.2.55', 81))
select.select([], [s], [], 10)
print(rc == errno.EINPROGRESS, s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
s.setblocking(True)
print(s.recv(100).decode().strip())
"""
    assert run.py(code).stdout.decode().splitlines() == ["True 0", "hello 192.0.2.55:81"]


def test_localhost_connect_stays_local_with_ignore_localhost(
    run: Runner, daemon: LayerDaemon, http_server: tuple[str, int]
) -> None:
    code = f"""
import urllib.request
print(urllib.request.urlopen('http://127.0.0.1:{http_server[1]}/x', timeout=10).read().decode(), end='')
"""
    out = run.py(code, settings=LayerSettings(ignore_localhost=True))
    assert out.stdout == b"served /x\n"
    assert daemon.requests() == []


def test_outgoing_filter_keeps_unlisted_destinations_local(
    run: Runner, daemon: LayerDaemon, http_server: tuple[str, int]
) -> None:
    settings = LayerSettings(outgoing_filter_mode="remote", outgoing_filter=("192.0.2.0/24",))
    code = f"""
import socket, urllib.request
print(urllib.request.urlopen('http://127.0.0.1:{http_server[1]}/y', timeout=10).read().decode(), end='')
print(socket.create_connection(('192.0.2.11', 9), timeout=10).recv(100).decode(), end='')
"""
    assert run.py(code, settings=settings).stdout == b"served /y\nhello 192.0.2.11:9\n"
    assert daemon.kinds() == ["LayerConnect"]


def test_python_getaddrinfo_resolves_in_the_target(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import socket
print(sorted({a[4][0] for a in socket.getaddrinfo('db.svc.cluster.local', 5432, type=socket.SOCK_STREAM)}))
print(socket.gethostbyname('db.svc.cluster.local'))
print(socket.gethostbyname_ex('db.svc.cluster.local'))
try:
    socket.getaddrinfo('nowhere.svc.cluster.local', 80)
except socket.gaierror as e:
    print('gaierror', e.errno == socket.EAI_NONAME)
print(socket.getaddrinfo('localhost', 80, type=socket.SOCK_STREAM)[0][4][0] in ('127.0.0.1', '::1'))
"""
    out = run.py(code).stdout.decode().splitlines()
    assert out == [
        "['192.0.2.77']",
        "192.0.2.77",
        "('db.svc.cluster.local', [], ['192.0.2.77'])",
        "gaierror True",
        "True",
    ]
    lookups = [m for m in daemon.requests() if type(m).__name__ == "DnsLookup"]
    hosts = [m.host for m in lookups]  # type: ignore[attr-defined]
    assert set(hosts) == {"db.svc.cluster.local", "nowhere.svc.cluster.local"}
    assert "localhost" not in hosts


def test_dns_off_and_dns_filter_resolve_locally(run: Runner, daemon: LayerDaemon) -> None:
    code = "import socket; print(socket.getaddrinfo('localhost', 80)[0][4][0] != '')"
    run.py(code, settings=LayerSettings(dns=False))
    settings = LayerSettings(dns_filter_mode="local", dns_filter=("db.svc.cluster.local",))
    code = """
import socket
try:
    socket.getaddrinfo('db.svc.cluster.local', 80)
    print('resolved')
except socket.gaierror:
    print('local-only name: not found here')
"""
    out = run.py(code, settings=settings).stdout.decode().strip()
    assert out == "local-only name: not found here"
    assert daemon.requests() == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_resolves_and_connects_through_the_target(
    run: Runner, daemon: LayerDaemon, http_server: tuple[str, int]
) -> None:
    daemon.upstreams[("192.0.2.77", 8080)] = http_server
    out = run(["curl", "-sS", "--max-time", "10", "http://db.svc.cluster.local:8080/hello"])
    assert out.stdout == b"served /hello\n"
    assert daemon.kinds() == ["DnsLookup", "LayerConnect"]


def test_udp_sendto_and_recvfrom_through_the_relay(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(10)
u.sendto(b'ping', ('192.0.2.55', 53))
data, addr = u.recvfrom(100)
print(data.decode(), addr)
u.sendmsg([b'again'], [], 0, ('192.0.2.55', 53))
data, anc, flags, addr = u.recvmsg(100)
print(data.decode(), addr)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(10)
c.connect(('192.0.2.56', 5353))
c.send(b'connected')
print(c.recv(100).decode(), c.getpeername())
u.close()
c.close()
"""
    out = run.py(code).stdout.decode().splitlines()
    assert out == [
        "udp:ping ('192.0.2.55', 53)",
        "udp:again ('192.0.2.55', 53)",
        "udp:connected ('192.0.2.56', 5353)",
    ]
    # each closed UDP socket ends its relay (one relay each here)
    assert daemon.kinds() == ["LayerConnect", "LayerConnect", "LayerDisconnect", "LayerDisconnect"]


def _wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen()
print('listening', s.getsockname()[1], flush=True)
c, peer = s.accept()
c.sendall(f'{peer} {c.getpeername()}'.encode())
c.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run_listener(
    run: Runner, daemon: LayerDaemon, port: int, settings: LayerSettings | None = None
) -> str:
    import subprocess

    with subprocess.Popen(
        [PYTHON, "-S", "-c", LISTENER, str(port)],
        env=run.env(settings),
        cwd=run.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            assert line == f"listening {port}\n"
            _wait_for(lambda: any(listen.port == port for listen in daemon.listens))
            sock = daemon.incoming(port, ("192.0.2.99", 41000))
            data = sock.recv(200).decode()
            proc.wait(timeout=10)
            return data
        finally:
            proc.kill()


def test_listen_subscribes_and_accept_reports_the_real_peer(
    run: Runner, daemon: LayerDaemon
) -> None:
    port = _free_port()
    assert _run_listener(run, daemon, port) == "('192.0.2.99', 41000) ('192.0.2.99', 41000)"
    (listen,) = daemon.listens
    assert (listen.port, listen.bound_address, listen.bound_port) == (port, "127.0.0.1", port)
    assert "PeerLookup" in daemon.kinds()


def test_listen_on_a_busy_port_binds_another_and_says_so(run: Runner, daemon: LayerDaemon) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert _run_listener(run, daemon, port) == "('192.0.2.99', 41000) ('192.0.2.99', 41000)"
    (listen,) = daemon.listens
    assert listen.port == port and listen.bound_port != port


def test_ignored_port_and_incoming_off_stay_local(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import socket, sys
s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()
c = socket.create_connection(s.getsockname(), timeout=10)
a, peer = s.accept()
print(peer == c.getsockname())
"""
    port = _free_port()
    for settings in (
        LayerSettings(ignore_ports=(port,), ignore_localhost=True),
        LayerSettings(incoming="off", ignore_localhost=True),
    ):
        out = run([PYTHON, "-S", "-c", code, str(port)], settings=settings)
        assert out.stdout == b"True\n"
    assert daemon.requests() == []


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_reads_files_and_resolves_through_the_target(run: Runner, daemon: LayerDaemon) -> None:
    code = """
const fs = require('fs'); const dns = require('dns');
process.stdout.write(fs.readFileSync('/app/test.txt', 'utf8'));
console.log(fs.readdirSync('/app').join(','));
fs.readFile('/app/config/settings.yaml', 'utf8', (err, data) => {
  if (err) throw err;
  process.stdout.write(data);
  dns.lookup('db.svc.cluster.local', {family: 4}, (err, address) => {
    if (err) throw err;
    console.log(address);
  });
});
"""
    out = run(["node", "-e", code])
    assert (
        out.stdout
        == b"hello from the target\nconfig,empty,link,test.txt\ndebug: true\n192.0.2.77\n"
    )
    assert "DnsLookup" in daemon.kinds()


EXEC_LISTENER = """
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen()
s.set_inheritable(True)
print('listening', s.getsockname()[1], flush=True)
code = (
    "import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); c, peer = s.accept(); "
    "c.sendall(str(peer).encode()); c.close()"
)
os.execv(sys.executable, [sys.executable, '-S', '-c', code, str(s.fileno())])
"""


def test_a_subscribed_listener_survives_exec(run: Runner, daemon: LayerDaemon) -> None:
    import subprocess

    port = _free_port()
    with subprocess.Popen(
        [PYTHON, "-S", "-c", EXEC_LISTENER, str(port)],
        env=run.env(),
        cwd=run.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().decode() == f"listening {port}\n"
            _wait_for(lambda: any(listen.port == port for listen in daemon.listens))
            sock = daemon.incoming(port, ("192.0.2.99", 41001))
            assert sock.recv(200).decode() == "('192.0.2.99', 41001)"
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()
    assert len(daemon.processes) == 1  # exec kept the registration


def test_loopback_udp_stays_local_with_ignore_localhost(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import socket
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(('127.0.0.1', 0))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.settimeout(10)
b.sendto(b'x', a.getsockname())
data, peer = a.recvfrom(10)
a.sendmsg([b'y'], [], 0, peer)
print(data, b.recvmsg(10)[0], peer[1] == b.getsockname()[1])
"""
    out = run.py(code, settings=LayerSettings(ignore_localhost=True))
    assert out.stdout == b"b'x' b'y' True\n"
    assert daemon.requests() == []


PREFORK = """
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen()
print('listening', flush=True)
pid = os.fork()
if pid == 0:
    c, peer = s.accept()
    c.sendall(str(peer).encode())
    c.close()
    s.close()
    os._exit(0)
os.waitpid(pid, 0)
print('child done', flush=True)
sys.stdin.readline()
s.close()
"""


def test_a_forked_worker_accepts_and_closing_its_copy_keeps_the_subscription(
    run: Runner, daemon: LayerDaemon
) -> None:
    import subprocess

    port = _free_port()
    with subprocess.Popen(
        [PYTHON, "-S", "-c", PREFORK, str(port)],
        env=run.env(),
        cwd=run.cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == b"listening\n"
            _wait_for(lambda: any(listen.port == port for listen in daemon.listens))
            sock = daemon.incoming(port, ("192.0.2.98", 41002))
            assert sock.recv(200).decode() == "('192.0.2.98', 41002)"
            assert proc.stdout.readline() == b"child done\n"
            assert "LayerUnlisten" not in daemon.kinds()  # the worker's close kept it
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()
    assert daemon.kinds().count("LayerUnlisten") == 1


def test_ipv6_connect_goes_through_a_v4_mapped_relay(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import socket
s = socket.socket(socket.AF_INET6)
s.settimeout(10)
s.connect(('2001:db8::5', 80))
print(s.recv(100).decode().strip(), s.getpeername()[:2])
"""
    out = run.py(code).stdout.decode().splitlines()
    assert out == ["hello 2001:db8::5:80 ('2001:db8::5', 80)"]


def test_ipv6_off_fails_ipv6_sockets_as_a_host_without_ipv6_and_binds_all_on_ipv4(
    run: Runner, daemon: LayerDaemon
) -> None:
    """`feature.network.ipv6: false`: creating an IPv6 socket fails with EAFNOSUPPORT (the
    app falls back to IPv4 as it would on a host without IPv6); `::`, "every interface",
    resolves to IPv4's 0.0.0.0 (a gRPC server's `[::]:PORT`); IPv4 goes on as before."""
    code = """
import errno, socket
try:
    socket.socket(socket.AF_INET6)
    print('made')
except OSError as e:
    print(errno.errorcode[e.errno])
infos = socket.getaddrinfo('::', 50051, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
print(sorted({(f.name, a[:2]) for f, _, _, _, a in infos}))
s = socket.create_connection(('192.0.2.55', 80), timeout=10)
print(s.makefile('rb').readline().decode().strip())
"""
    out = run.py(code, settings=LayerSettings(ipv6=False)).stdout.decode().splitlines()
    assert out == [
        "EAFNOSUPPORT",
        "[('AF_INET', ('0.0.0.0', 50051))]",
        "hello 192.0.2.55:80",
    ]
    # on (the default): both as without the layer
    out = run.py(code).stdout.decode().splitlines()
    assert out[0] == "made"
    assert out[1] == "[('AF_INET6', ('::', 50051))]"


def test_threads_resolve_in_parallel(run: Runner, daemon: LayerDaemon) -> None:
    for i in range(4):
        daemon.dns[f"slow{i}.svc"] = f"192.0.2.{10 + i}"
    code = """
import socket, threading, time
out = {}
def resolve(i):
    out[i] = socket.gethostbyname(f'slow{i}.svc')
start = time.monotonic()
ts = [threading.Thread(target=resolve, args=(i,)) for i in range(4)]
for t in ts: t.start()
for t in ts: t.join()
print(sorted(out.values()), time.monotonic() - start < 3.0)
"""
    out = run.py(code).stdout.decode().strip()
    assert out == "['192.0.2.10', '192.0.2.11', '192.0.2.12', '192.0.2.13'] True"


def test_a_relayed_socket_keeps_its_number_flags_and_tcp_options(
    run: Runner, daemon: LayerDaemon
) -> None:
    # the relay socket the daemon passes replaces the app's socket: what programs commonly
    # do with a connected TCP socket must still work on it
    code = """
import errno, fcntl, os, select, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setblocking(False)
fd = s.fileno()
rc = s.connect_ex(('192.0.2.55', 82))
select.select([], [s], [], 10)
print(rc == errno.EINPROGRESS, s.fileno() == fd, s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
print(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK), bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0, s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET, s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM)
s.setblocking(True)
print(s.recv(100).decode().strip(), s.getpeername())
"""
    assert run.py(code).stdout.decode().splitlines() == [
        "True True 0",
        "True True",
        "True True",
        "True True",
        "hello 192.0.2.55:82 ('192.0.2.55', 82)",
    ]
    assert daemon.kinds() == ["LayerConnect"]
