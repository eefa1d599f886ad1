"""What a new user meets on the first day: the real CLI and daemon (and, where a session must
open, a real agent and a local pod). A mistake is one message that says what to do, found
before a daemon is started; a daemon shutting down or stuck is waited for, or named, within
bounds; `mirrord demo` interrupted at any moment leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirrord.layer import build_id
from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import MIRRORD, Mirrord, processes_mentioning, wait_for

SPEC = PodSpec(env={"POD_VAR": "from-the-pod"})
SHOW = "import os; print(os.environ['POD_VAR'])"


def assert_no_daemon(cli: Mirrord) -> None:
    assert not (cli.runtime / "mirrordd.sock").exists()
    assert processes_mentioning(str(cli.runtime)) == []


def without_cluster(cli: Mirrord, home: Path) -> None:
    """No kubeconfig anywhere: no $KUBECONFIG, an empty home."""
    cli.env.pop("KUBECONFIG", None)
    cli.env.pop("MIRRORD_KUBECONFIG", None)
    cli.env["HOME"] = str(home)


def test_no_target_and_no_cluster_names_the_targets_to_use(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    without_cluster(mirrord, tmp_path)
    message = "no target: use `-t pid/N`, `-t container/ID`, or a cluster target"
    result = mirrord.run("run", "--", "true", timeout=30)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert_no_daemon(mirrord)  # found before a daemon was started
    # a daemon that already runs says the same
    assert mirrord.run("daemon", "start").returncode == 0
    again = mirrord.run("run", "--", "true", timeout=30)
    assert again.returncode == 1 and message in again.stderr, again.stderr


def test_a_bare_number_suggests_a_pid_and_a_bad_config_starts_no_daemon(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    result = mirrord.run("run", "-t", "1234", "--", "true", timeout=30)
    assert result.returncode == 2
    assert "did you mean 'pid/1234' or 'pod/1234'" in result.stderr
    assert_no_daemon(mirrord)
    config = tmp_path / "mirrord.json"
    config.write_text('{"feature": {"fs": {"mode": "sideways"}}}')
    bad = mirrord.run("run", "-f", str(config), "-t", "pid/1", "--", "true", timeout=30)
    assert bad.returncode == 2
    assert "feature.fs.mode" in bad.stderr and "Traceback" not in bad.stderr
    assert_no_daemon(mirrord)


def test_a_local_target_without_root_fails_before_a_daemon_starts(mirrord: Mirrord) -> None:
    # a user namespace without a uid map: the command runs as uid 65534 (not root), with its
    # files still readable (the test's interpreter may live under /root)
    result = subprocess.run(
        ["unshare", "--user", MIRRORD, "run", "-t", "pid/1", "--", "true"],
        env=mirrord.env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "must run as root" in result.stderr and "Traceback" not in result.stderr
    assert_no_daemon(mirrord)


@pytest.mark.netns
def test_a_config_file_found_in_a_parent_folder_is_named(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    config = tmp_path / ".mirrord" / "mirrord.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"target": f"pid/{pod.pid}"}))
    deeper = tmp_path / "src" / "app"
    deeper.mkdir(parents=True)
    result = subprocess.run(
        [MIRRORD, "run", "--", sys.executable, "-c", SHOW],
        env=mirrord.env,
        cwd=deeper,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from-the-pod"
    assert f"using the config file {config} (found in a parent folder)" in result.stderr


@pytest.fixture
def vanishing_daemon(mirrord: Mirrord) -> Iterator[threading.Thread]:
    """A control socket that answers one `status` and then goes away, as a daemon whose
    `daemon.idle_timeout` ran out between `mirrord run`'s check and its connection does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(mirrord.runtime / "mirrordd.sock"))
    listener.listen(4)
    listener.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                request = json.loads(lines.readline())
                status = {"daemon": {"build_id": build_id(), "pid": os.getpid()}, "sessions": []}
                reply = {"id": request["id"], "ok": True, "result": status}
                conn.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError):
            pass
        finally:
            (mirrord.runtime / "mirrordd.sock").unlink(missing_ok=True)
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield thread
    thread.join(timeout=35)
    listener.close()


@pytest.mark.netns
def test_a_daemon_that_goes_away_between_check_and_connect_is_replaced(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], vanishing_daemon: threading.Thread
) -> None:
    pod = make_pod(SPEC)
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", SHOW)
    assert "no mirrord daemon answers" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from-the-pod"
    vanishing_daemon.join(timeout=5)
    assert not vanishing_daemon.is_alive()


@pytest.mark.netns
def test_a_daemon_shutting_down_is_waited_for(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    """Its sockets are gone but it still holds the pid lock (it stops its agents before it
    exits): the next run waits for it and starts a new one."""
    pod = make_pod(SPEC)
    assert mirrord.run("daemon", "start").returncode == 0
    old = mirrord.daemon_pid()
    assert old is not None
    os.kill(old, signal.SIGSTOP)  # held "between" removing its sockets and exiting
    try:
        (mirrord.runtime / "mirrordd.sock").unlink()
        run = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", SHOW)
        time.sleep(1)
    finally:
        os.kill(old, signal.SIGTERM)
        os.kill(old, signal.SIGCONT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert out.strip() == "from-the-pod"
    assert mirrord.daemon_pid() not in (None, old)


@pytest.mark.netns
def test_daemon_status_fits_80_columns_and_names_a_stuck_daemon_fast(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    config = tmp_path / "mirrord.json"
    config.write_text(
        json.dumps(
            {
                "feature": {
                    "network": {
                        "incoming": {
                            "mode": "steal",
                            "http_filter": {"header_filter": "^x-user: someone-with-a-long-name$"},
                        }
                    }
                }
            }
        )
    )
    app = (
        "import socket, sys, time; s = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen();"
        " print('listening', flush=True); sys.stdin.read()"
    )
    run = mirrord.popen(
        "run", "-f", str(config), "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", app,
        "--a-long-argument-of-the-command-" + "x" * 60,
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert run.stdout is not None
        assert run.stdout.readline().strip() == "listening"
        wait_for(lambda: mirrord.sessions() and mirrord.sessions()[0]["subscriptions"], 30, "sub")
        status = mirrord.run("daemon", "status")
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, status.stdout
        assert "…" not in status.stdout, status.stdout
        [session] = mirrord.sessions()
        assert session["id"] in status.stdout and f"pid/{pod.pid}" in status.stdout
        assert "8080 steal" in status.stdout and "long-name" in status.stdout
    finally:
        run.communicate(input="", timeout=30)  # the app ends at the end of its stdin
    daemon = mirrord.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)
    try:
        stuck = mirrord.run("daemon", "status", timeout=25)  # it waited 30 s
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert stuck.returncode == 1
    assert f"daemon (pid {daemon})" in stuck.stderr and "does not answer" in stuck.stderr


@pytest.mark.netns
@pytest.mark.parametrize("after", [0.3, 1.0, 2.0, 3.5, 6.0])
def test_demo_interrupted_at_any_moment_leaves_nothing(mirrord: Mirrord, after: float) -> None:
    """Ctrl-C on a terminal reaches the whole foreground group; here: SIGINT to the demo's
    own process group, at moments from its start-up to its running app."""
    demo = mirrord.popen("demo", start_new_session=True)
    time.sleep(after)
    if demo.poll() is None:
        os.killpg(demo.pid, signal.SIGINT)
    out, err = demo.communicate(timeout=90)
    assert "Traceback" not in out + err, out + err
    assert demo.returncode in (0, 1, 130), (demo.returncode, err)
    assert processes_mentioning(str(mirrord.runtime)) == []
    assert [p.name for p in mirrord.runtime.iterdir() if p.name.startswith("demo-")] == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"mrd{demo.pid}x" not in netns.stdout
    assert not list(Path(tempfile.gettempdir()).glob(f"mrd{demo.pid}x*"))
