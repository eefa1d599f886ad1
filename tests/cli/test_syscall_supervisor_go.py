"""Go programs under the system-call supervisor (docs/layer.md), built here with Debian's Go
both ways: `CGO_ENABLED=0` (static, Go's own system calls only) and with cgo (dynamically
linked: the layer is loaded, but Go's runtime makes its file and socket calls itself). Both are
supervised without being asked. Against a local pod: an HTTP GET to the pod's loopback
service, the pod's addresses seen by the program, pod-only names through Go's resolver (the
pod's `/etc/hosts`, and its DNS server over UDP), the pod's hostname, a `/bin/cat` child
reading a pod-only file, and a Go HTTP server that receives the pod's stolen requests and a
copy of its mirrored ones (with the client's address)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec, create_pod
from tests.cli.conftest import Mirrord, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed (cgo)"),
    pytest.mark.timeout(400),  # the first test of each build includes `go build` (up to 300 s)
]

HERE = Path(__file__).resolve().parent
SPEC = PodSpec(
    name="gopod",
    env={"POD_ONLY_VAR": "from the pod"},
    files={"/app/pod-only.txt": b"only in the pod\n"},
    hosts={"hosts-only.test": "10.9.8.7"},
    dns_records={"dns-only.cluster.test": "10.1.2.3"},
    hostname="gopod-hostname",
    echo_port=None,
    http_port=8080,
)


@pytest.fixture(scope="module")
def pod() -> Iterator[LocalPod]:
    from mirrord.localpod import cleanup_leftovers

    cleanup_leftovers()
    with create_pod(SPEC) as made:
        yield made


@pytest.fixture(scope="module", params=["static", "cgo"])
def go_net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/cli/go/net.go, built with CGO_ENABLED=0 or 1."""
    work = tmp_path_factory.mktemp("go")
    program = work / f"net_{request.param}"
    subprocess.run(
        ["go", "build", "-o", str(program), str(HERE / "go" / "net.go")],
        check=True,
        timeout=300,
        env={
            **os.environ,
            "CGO_ENABLED": "1" if request.param == "cgo" else "0",
            "GOCACHE": str(work / "gocache"),
            "GOPATH": str(work / "gopath"),
            "GO111MODULE": "off",
        },
    )
    return program


def test_go_builds_are_recognised_from_their_build_id_note(go_net: Path) -> None:
    # what makes `mirrord run` supervise them without being asked (the cgo build has an
    # interpreter, so only the note tells)
    from mirrord.cli._elf import go_executable, needs_supervisor, static_executable

    assert go_executable(go_net) and needs_supervisor(go_net)
    assert static_executable(go_net) == go_net.name.endswith("static")
    cat = Path("/bin/cat")
    assert not go_executable(cat) and not needs_supervisor(cat)


def test_go_program_reaches_the_pods_network_names_and_files(
    mirrord: Mirrord, pod: LocalPod, go_net: Path
) -> None:
    lines = [
        "get:http://127.0.0.1:8080/hello",
        f"dial:{pod.ip}:8080",
        "lookup:hosts-only.test",
        "lookup:dns-only.cluster.test",
        "hostname",
        "cat:/app/pod-only.txt",
    ]
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--", str(go_net), input="\n".join(lines) + "\n"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 7, (out, result.stderr)
    assert out[0] == "env from the pod"
    # the pod's own HTTP service on its loopback, and the program sees the address it asked for
    assert out[1] == "get 200 gopod GET /hello peer 127.0.0.1:8080", result.stderr
    # getsockname is the pod-side address of the connection the agent made, not the relay's
    assert out[2].startswith(f"dial local {pod.ip}:"), out[2]
    assert out[2].endswith(f" remote {pod.ip}:8080"), out[2]
    assert out[3:6] == [
        "lookup hosts-only.test 10.9.8.7",  # the pod's /etc/hosts
        "lookup dns-only.cluster.test 10.1.2.3",  # the pod's DNS server, over UDP
        "hostname gopod-hostname",
    ], result.stderr
    # a dynamic child started by Go's exec keeps the filter and the layer
    assert out[6] == "cat only in the pod", result.stderr


def _get(address: str, path: str, port: int = 8080) -> tuple[bytes, str]:
    """GET `path` from `address:port` as a client of the pod: (the body, our own address)."""
    client = http.client.HTTPConnection(address, port, timeout=30)
    try:
        client.connect()
        host, port = client.sock.getsockname()[:2]
        client.request("GET", path)
        return client.getresponse().read(), f"{host}:{port}"
    finally:
        client.close()


def test_go_http_server_answers_the_pods_stolen_requests(
    mirrord: Mirrord, pod: LocalPod, go_net: Path
) -> None:
    # the port is busy on this machine: the layer's bind (which the supervisor uses) binds the
    # Go server elsewhere, the program still sees the port it asked for, and the pod's port is
    # stolen to wherever it is
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = mirrord.popen(
            "run", "-t", f"pid/{pod.pid}", "--steal", "--", str(go_net), stdin=subprocess.PIPE
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline() == "env from the pod\n"
            proc.stdin.write(f"serve:{port}\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == f"serving {port}\n"
            wait_for(
                lambda: mirrord.sessions() and mirrord.sessions()[0]["subscriptions"], 30, "sub"
            )
            # a client of the pod: its request reaches the Go server, which sees the client's
            # own address (accept's peer is the pod's client, not the daemon)
            body, me = _get(pod.ip, "/stolen", port)
            assert body == f"go server /stolen from {me}\n".encode()
            assert proc.stdout.readline() == f"request /stolen from {me}\n"
        finally:
            _, err = proc.communicate(input="", timeout=60)
    assert proc.returncode == 0, err


def test_go_http_server_receives_a_copy_of_the_pods_requests(
    mirrord: Mirrord, pod: LocalPod, go_net: Path
) -> None:
    # mirror (the default): the pod's own service answers, the Go server gets a copy
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", str(go_net), stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "env from the pod\n"
        proc.stdin.write("serve:8080\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "serving 8080\n"
        wait_for(lambda: mirrord.sessions() and mirrord.sessions()[0]["subscriptions"], 30, "sub")
        body, me = _get(pod.ip, "/mirrored")
        assert body == b"gopod GET /mirrored\n"
        assert proc.stdout.readline() == f"request /mirrored from {me}\n"
        # a loopback connect of the program to its own port reaches itself, as in the pod
        # (the layer's rule), not the pod's service on that port
        proc.stdin.write("get:http://127.0.0.1:8080/self\n")
        proc.stdin.flush()
        request = proc.stdout.readline()
        assert request.startswith("request /self from 127.0.0.1:"), request
        client = request.split()[-1]
        assert (
            proc.stdout.readline() == f"get 200 go server /self from {client} peer 127.0.0.1:8080\n"
        )
    finally:
        _, err = proc.communicate(input="", timeout=60)
    assert proc.returncode == 0, err


PYTHON_SERVER = """
import http.server

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host, port = self.client_address[:2]
        body = f"python {self.path} from {host}:{port}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("0.0.0.0", 8080), Handler)
print("serving", flush=True)
server.handle_request()
"""


def test_a_libc_program_under_syscalls_keeps_the_layers_socket_decisions(
    mirrord: Mirrord, pod: LocalPod
) -> None:
    # python3 (dynamic) under --syscalls: its libc socket calls are the layer's (one steal
    # subscription, the client's address from its accept), the supervisor lets them through
    proc = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", "--syscalls", "--steal", "--", sys.executable, "-c",
        PYTHON_SERVER,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "serving\n"
        wait_for(lambda: mirrord.sessions() and mirrord.sessions()[0]["subscriptions"], 30, "sub")
        [session] = mirrord.sessions()
        assert [sub["port"] for sub in session["subscriptions"]] == [8080], session
        body, me = _get(pod.ip, "/libc")
        assert body == f"python /libc from {me}\n".encode()
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
