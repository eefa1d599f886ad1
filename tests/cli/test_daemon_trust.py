"""Only its owner talks to the daemon, and nothing else answering on the control socket can
make `mirrord run` load anything: a runtime directory of another user is refused, a listener
of another uid on the control socket is refused (SO_PEERCRED), a status without the build id
is refused, and a session whose layer is not this install's is never run.

Another user is uid 65534 (nobody), reached by a forked child that setuid()s."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirrord.daemon._exceptions import DaemonError
from mirrord.daemon._runtime import RuntimePaths
from mirrord.layer import build_id, library_path
from tests._other_user import listening_as
from tests.cli.conftest import Mirrord, temp_mirrord

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")


@pytest.fixture
def mirrord() -> Iterator[Mirrord]:
    with temp_mirrord("mrdt") as cli:
        yield cli


def _answer(request: dict[str, Any], evil: Path, runtime: Path) -> dict[str, Any]:
    """What a hostile listener says: our build id and layer (so only the other checks can
    catch it), and a session whose LD_PRELOAD is its own library."""
    if request.get("op") == "status":
        daemon = {"build_id": build_id(), "layer_library": str(library_path()), "pid": os.getpid()}
        return {"daemon": daemon, "sessions": []}
    if request.get("op") == "create_session":
        env = {
            "LD_PRELOAD": str(evil),
            "MIRRORD_LAYER_SOCKET": str(runtime / "layer.sock"),
            "MIRRORD_SESSION": "0123456789abcdef",
        }
        return {"session": "0123456789abcdef", "env": env, "agent": "x", "warnings": []}
    return {}


def _serve(server: socket.socket, evil: Path, runtime: Path) -> None:
    """Answer JSON lines on `server` for a bounded number of connections."""
    server.settimeout(30)
    for _ in range(8):
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            try:
                for line in conn.makefile("rb"):
                    request = json.loads(line)
                    reply = {"id": request.get("id"), "ok": True}
                    reply["result"] = _answer(request, evil, runtime)
                    conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass


@contextlib.contextmanager
def _fake_daemon(path: Path, evil: Path, *, uid: int | None) -> Iterator[None]:
    """A listener on the control socket path. With `uid`, a forked child binds it, becomes
    that user and only then listen()s (SO_PEERCRED records the listening process's uid)."""
    if uid is None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(8)
        thread = threading.Thread(target=_serve, args=(server, evil, path.parent), daemon=True)
        thread.start()
        try:
            yield
        finally:
            server.shutdown(socket.SHUT_RDWR)  # wakes accept()
            server.close()
            thread.join(10)
            path.unlink(missing_ok=True)
        return
    with listening_as(uid, path, lambda server: _serve(server, evil, path.parent)):
        yield


def _marker_command(marker: Path) -> list[str]:
    return ["sh", "-c", f'echo "$LD_PRELOAD" > {marker}']


@needs_root
def test_a_runtime_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """Root used another user's directory (mode 0700 or not) and everything in it."""
    other = tmp_path / "theirs"
    other.mkdir(mode=0o700)
    os.chown(other, NOBODY, NOBODY)
    with pytest.raises(DaemonError) as caught:
        RuntimePaths(other).ensure()
    message = str(caught.value)
    assert "belongs to uid 65534" in message and "$MIRRORD_RUNTIME_DIR" in message
    assert not any(other.iterdir())  # nothing created in it


@needs_root
def test_mirrord_run_refuses_another_users_runtime_directory(tmp_path: Path) -> None:
    other = tmp_path / "theirs"
    other.mkdir(mode=0o700)
    os.chown(other, NOBODY, NOBODY)
    cli = Mirrord(other)
    marker = tmp_path / "ran"
    result = cli.run("run", "-t", "pid/1", "--", *_marker_command(marker), timeout=30)
    assert result.returncode == 1, result.stderr
    assert "belongs to uid 65534" in result.stderr
    assert not marker.exists()
    assert not any(other.iterdir())  # no daemon, log or lock was started there


@needs_root
def test_a_control_socket_of_another_uid_is_never_trusted(mirrord: Mirrord, tmp_path: Path) -> None:
    """Another user's process listening on the control socket (it answers with our build id
    and a session preloading its own library): nothing it says is used, the command never
    runs, and the error names the process."""
    evil = tmp_path / "evil.so"
    marker = tmp_path / "ran"
    mirrord.runtime.chmod(0o700)
    with _fake_daemon(mirrord.runtime / "mirrordd.sock", evil, uid=NOBODY):
        result = mirrord.run("run", "-t", "pid/1", "--", *_marker_command(marker), timeout=60)
        status = mirrord.run("daemon", "status", "--json", timeout=30)
    assert result.returncode == 1, result.stderr
    assert "runs as uid 65534" in result.stderr and "not your mirrord daemon" in result.stderr
    assert not marker.exists()
    assert status.returncode == 1 and "runs as uid 65534" in status.stderr
    assert "Traceback" not in result.stderr + status.stderr


def test_a_listener_handing_out_a_foreign_layer_is_never_run(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    """Something of our own uid listening on the control socket (not a daemon of this
    install) answers status with our build id and a session preloading another library: the
    command is not run with it."""
    evil = tmp_path / "evil.so"
    marker = tmp_path / "ran"
    with _fake_daemon(mirrord.runtime / "mirrordd.sock", evil, uid=None):
        result = mirrord.run("run", "-t", "pid/1", "--", *_marker_command(marker), timeout=60)
    assert result.returncode == 1, result.stderr
    assert str(evil) in result.stderr and str(library_path()) in result.stderr
    assert "the command was not run" in result.stderr
    assert not marker.exists()


def test_a_status_without_build_id_is_refused(mirrord: Mirrord, tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(mirrord.runtime / "mirrordd.sock"))
    server.listen(8)
    server.settimeout(20)

    def answer() -> None:
        for _ in range(4):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                for line in conn.makefile("rb"):
                    rid = json.loads(line)["id"]
                    result = {"daemon": {"pid": 1, "version": "0"}, "sessions": []}
                    reply = {"id": rid, "ok": True, "result": result}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    marker = tmp_path / "ran"
    try:
        result = mirrord.run("run", "-t", "pid/1", "--", *_marker_command(marker), timeout=30)
        status = mirrord.run("daemon", "status", timeout=30)
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)
        (mirrord.runtime / "mirrordd.sock").unlink()
    for done in (result, status):
        assert done.returncode == 1, done.stderr
        assert "did not say its build id" in done.stderr, done.stderr
    assert not marker.exists()


def test_an_idle_daemon_of_another_install_with_the_same_build_is_replaced(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    """Another install of the same sources (same build id, another layer file): its sessions
    would preload its own library, so an idle one is stopped and replaced by ours (a busy one
    is an error saying so), instead of every `mirrord run` being refused."""
    path = mirrord.runtime / "mirrordd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    pid = os.fork()
    if pid == 0:  # child: the other install's daemon; exits when told to shut down
        try:
            server.settimeout(30)
            for _ in range(8):
                conn, _ = server.accept()
                with conn:
                    for line in conn.makefile("rb"):
                        request = json.loads(line)
                        answer: dict[str, Any] = {"pid": os.getpid()}
                        if request["op"] == "status":
                            daemon = {"build_id": build_id(), "layer_library": "/elsewhere.so"}
                            answer = {"daemon": daemon, "sessions": []}
                        reply = {"id": request["id"], "ok": True, "result": answer}
                        conn.sendall(json.dumps(reply).encode() + b"\n")
                        if request["op"] == "shutdown":
                            path.unlink()
                            os._exit(0)
        finally:
            os._exit(0)
    server.close()
    try:
        result = mirrord.run("daemon", "start", timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert result.returncode == 0, result.stderr
    status = mirrord.status()["daemon"]
    assert status["layer_library"] == str(library_path())
    assert status["pid"] != pid
