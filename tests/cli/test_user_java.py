"""A Java service through `mirrord run`, as most mirrord users run one: the JVM reads the
pod's environment and files, writes a file that lands in the pod, resolves a pod-only name,
talks to a service on the pod's loopback with `java.net.http`, and serves the pod's stolen
HTTP requests with `com.sun.net.httpserver` (the JVM's own epoll, its own threads)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec, create_pod
from tests.cli.conftest import Mirrord

pytestmark = pytest.mark.netns

JAVA = shutil.which("java")
JAVAC = shutil.which("javac")

SPEC = PodSpec(
    name="javapod",
    env={"POD_VAR": "from-the-pod"},
    files={"/app/config.properties": b"db=postgres://pod\n", "/app/w/.keep": b""},
    hosts={"pod-only-svc": "127.0.0.1"},
    echo_port=None,
    http_port=8080,
)

APP = """
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.*;
import java.net.http.*;
import java.nio.file.*;
import java.util.concurrent.*;
import java.util.stream.*;

public class PodApp {
    public static void main(String[] args) throws Exception {
        System.out.println("env " + System.getenv("POD_VAR"));
        System.out.println("file " + Files.readString(Path.of("/app/config.properties")).trim());
        try (Stream<Path> s = Files.list(Path.of("/app"))) {
            System.out.println("list " + s.map(p -> p.getFileName().toString()).sorted()
                .collect(Collectors.toList()));
        }
        Files.writeString(Path.of("/app/w/from-java.txt"), "written by the JVM\\n");
        System.out.println("dns " + InetAddress.getByName("pod-only-svc").getHostAddress());
        HttpResponse<String> pod = HttpClient.newHttpClient().send(
            HttpRequest.newBuilder(URI.create("http://pod-only-svc:8080/from-java")).build(),
            HttpResponse.BodyHandlers.ofString());
        System.out.println("outgoing " + pod.statusCode() + " " + pod.body().trim());
        CountDownLatch served = new CountDownLatch(1);
        HttpServer server = HttpServer.create(new InetSocketAddress(8080), 0);
        server.createContext("/", ex -> {
            byte[] body = ("java app served " + ex.getRequestURI()).getBytes();
            ex.sendResponseHeaders(200, body.length);
            try (OutputStream o = ex.getResponseBody()) { o.write(body); }
            served.countDown();
        });
        server.start();
        System.out.println("ready");
        System.out.flush();
        boolean ok = served.await(30, TimeUnit.SECONDS);
        server.stop(0);
        System.exit(ok ? 0 : 3);
    }
}
"""


@pytest.fixture(scope="module")
def java_pod() -> Iterator[LocalPod]:
    from mirrord.localpod import cleanup_leftovers

    cleanup_leftovers()
    with create_pod(SPEC) as made:
        yield made


@pytest.mark.skipif(JAVA is None or JAVAC is None, reason="no JDK (scripts/install-system-deps)")
def test_a_java_service_sees_the_pod_and_serves_its_stolen_requests(
    mirrord: Mirrord, java_pod: LocalPod, tmp_path: Path
) -> None:
    (tmp_path / "PodApp.java").write_text(APP)
    subprocess.run([str(JAVAC), "PodApp.java"], cwd=tmp_path, check=True, timeout=120)
    proc = mirrord.popen(
        "run", "-t", f"pid/{java_pod.pid}", "--steal", "--fs-mode", "write", "--",
        str(JAVA), "-cp", str(tmp_path), "PodApp",
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for _ in range(20):  # bounded: the app prints six lines before `ready`
            line = proc.stdout.readline()
            if not line or line.strip() == "ready":
                break
            lines.append(line.strip())
        assert lines[-1:] and line.strip() == "ready", (lines, proc.stderr and proc.stderr.read())
        url = f"http://{java_pod.ip}:8080/stolen"
        with urllib.request.urlopen(url, timeout=20) as reply:
            stolen = reply.read().decode()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert lines == [
        "env from-the-pod",
        "file db=postgres://pod",
        "list [config.properties, w]",
        "dns 127.0.0.1",
        "outgoing 200 javapod GET /from-java",
    ], lines
    assert stolen == "java app served /stolen"
    written = Path(f"/proc/{java_pod.pid}/root/app/w/from-java.txt").read_text()
    assert written == "written by the JVM\n"
