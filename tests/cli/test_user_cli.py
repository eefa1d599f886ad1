"""What a developer sees when they get `mirrord` wrong, or when something under it dies: the
real CLI, daemon, agent and layer against local pods. Every error is one message that says
what to do (no traceback, no hang), with the documented exit code; stdout stays the user
command's own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli._ide import (
    READY,
    check_message,
    intellij_error,
    read_until_ready,
    vscode_error,
)
from tests.cli.conftest import MIRRORD, Mirrord, pid_alive, python_app, wait_for

SPEC = PodSpec(env={"POD_VAR": "from-the-pod", "AWS_PROFILE": "pod-profile"})


def run_argv(
    cli: Mirrord, argv: list[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`argv` (a `mirrord` command, maybe wrapped) with this test's runtime directory."""
    return subprocess.run(
        argv, env=cli.env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def assert_one_clear_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "mirrord: error:" in stderr or "Error" in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_unknown_option_of_run_is_a_usage_error_not_the_command(mirrord: Mirrord) -> None:
    # `--stael` used to become the command: a session (and an agent) started, then 127
    result = mirrord.run("run", "-t", "pid/1", "--stael", "--", "true")
    assert result.returncode == 2
    assert "No such option: --stael" in result.stderr
    assert "--steal" in result.stderr  # typer's did-you-mean
    assert result.stdout == ""
    assert not (mirrord.runtime / "mirrordd.sock").exists()  # nothing was started
    # options still end at the command's first word without `--`
    ok = mirrord.run("run", "--stael", "-t", "pid/1", "--", "true")
    assert ok.returncode == 2


def test_a_command_that_cannot_run_fails_before_any_session(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("not a program\n")
    cases = [
        (["no-such-command-here"], 127, "command not found: no-such-command-here"),
        ([str(tmp_path / "missing")], 127, "command not found"),
        ([str(tmp_path)], 126, "command not executable"),
        ([str(plain)], 126, "command not executable"),
    ]
    for command, code, message in cases:
        # a Kubernetes target: without the early check the agent start came first
        result = mirrord.run("run", "-t", "deployment/api", "--", *command)
        assert result.returncode == code, (command, result.stderr)
        assert_one_clear_error(result.stderr, message)
        assert "opening a session" not in result.stderr
    assert not (mirrord.runtime / "mirrordd.sock").exists()


def test_config_file_that_is_a_directory_or_not_text(mirrord: Mirrord, tmp_path: Path) -> None:
    folder = tmp_path / "conf.json"
    folder.mkdir()
    plain_dir = tmp_path / ".mirrord"
    plain_dir.mkdir()
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    for path, message in (
        (folder, "is a directory; give the path of a config file"),
        (plain_dir, "is a directory; give the path of a config file"),
        (binary, "not UTF-8 text (byte 0xff at offset 0)"),
    ):
        result = mirrord.run("run", "-f", str(path), "-t", "pid/1", "--", "true")
        assert result.returncode == 2, result.stderr
        assert_one_clear_error(result.stderr, f"{path}: {message}")
        check = mirrord.run("verify-config", str(path))
        assert check.returncode == 1
        assert message in check.stderr and "Traceback" not in check.stderr


def test_an_unusable_runtime_directory_is_one_message(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for runtime in (not_a_dir, not_a_dir / "sub"):
        cli = Mirrord(runtime)
        for args in (
            ("run", "-t", "pid/1", "--", "true"),
            ("daemon", "start"),
            ("daemon", "logs"),
        ):
            result = cli.run(*args, timeout=20)
            assert result.returncode == 1, (args, result.stderr)
            assert_one_clear_error(result.stderr, str(not_a_dir))
        ext = cli.run("ext", "-t", "pid/1", timeout=20)
        assert ext.returncode == 1
        error = intellij_error(ext.stderr)
        assert "cannot use the mirrord runtime directory" in error["message"]
        assert "MIRRORD_RUNTIME_DIR" in error["message"]


def test_ext_puts_the_reason_of_a_failed_session_in_its_json(mirrord: Mirrord) -> None:
    result = mirrord.run("ext", "-t", "pid/999999", "--wait-timeout", "1", timeout=30)
    assert result.returncode == 1
    lines = [check_message(json.loads(line)) for line in result.stdout.splitlines()]
    assert lines[-1] == {"type": "FinishedTask", "name": READY, "success": False, "message": None}
    # the IDE shows this message; "see stderr" told its user nothing
    for error in (vscode_error(result.stderr), intellij_error(result.stderr)):
        assert "999999" in error["message"] and "does not exist" in error["message"]
        assert error["help"]


def test_kubeconfig_is_this_commands_not_the_daemons(mirrord: Mirrord, tmp_path: Path) -> None:
    env = {k: v for k, v in mirrord.env.items() if k != "KUBECONFIG"}
    mirrord.env = env
    assert mirrord.run("daemon", "start").returncode == 0  # started without $KUBECONFIG
    mirrord.env = dict(env, KUBECONFIG=str(tmp_path / "team-cluster.yaml"))
    result = mirrord.run("run", "-t", "deployment/api", "--", "true")
    assert result.returncode == 1
    assert_one_clear_error(result.stderr, f"kubeconfig {tmp_path / 'team-cluster.yaml'} does")
    # a relative path is this command's directory's, not the daemon's (/)
    mirrord.env = dict(env, KUBECONFIG="rel/kube.yaml")
    here = tmp_path / "project"
    here.mkdir()
    result = run_argv(mirrord, [MIRRORD, "run", "-t", "deployment/api", "--", "true"], here)
    assert_one_clear_error(result.stderr, f"kubeconfig {here / 'rel' / 'kube.yaml'} does")


@pytest.mark.netns
def test_env_unset_removes_the_users_own_variable_too(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"env": {"unset": "aws_profile;LOCAL_ONLY"}}}))
    mirrord.env.update(AWS_PROFILE="my-laptop", Local_Only="x", KEPT="mine")
    show = "import os; print(os.environ.get('AWS_PROFILE'), os.environ.get('Local_Only'), os.environ.get('KEPT'), os.environ.get('POD_VAR'))"
    result = mirrord.run(
        "run", "-f", str(config), "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", show
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None", "mine", "from-the-pod"]
    # an IDE merges the env itself: ext tells it what to remove
    ext = mirrord.run(
        "ext", "-f", str(config), "-t", f"pid/{pod.pid}", "--wait-timeout", "0.5", timeout=30
    )
    execution = read_until_ready(ext.stdout.splitlines())
    assert execution.env_to_unset == ["aws_profile", "LOCAL_ONLY"]
    assert "AWS_PROFILE" not in execution.environment


@pytest.mark.netns
def test_closed_stderr_or_stdout_never_mixes_progress_into_the_output(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(SPEC)
    cmd = ["sh", "-c", 'exec "$@" 2>&-', "sh", MIRRORD, "run", "-t", f"pid/{pod.pid}", "--"]
    result = run_argv(mirrord, [*cmd, "sh", "-c", "echo out; echo err >&2; echo more"])
    assert result.returncode == 0
    assert result.stdout == "out\nmore\n"  # progress lines used to land here
    closed_out = ["sh", "-c", 'exec "$@" >&-', "sh", MIRRORD, "run", "-t", f"pid/{pod.pid}", "--"]
    result = run_argv(mirrord, [*closed_out, "sh", "-c", "echo to-nowhere; exit 4"])
    assert result.returncode == 4
    assert "Traceback" not in result.stderr


@pytest.mark.netns
def test_killed_daemon_warns_the_session_and_the_next_run_recovers(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    app = python_app(
        tmp_path,
        "import os, sys\n"
        "print(os.environ['POD_VAR'], flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "    open('/app/test.txt').read()\n"
        "    print('read', flush=True)\n"
        "except OSError as e:\n"
        "    print('errno', e.errno, flush=True)\n"
        "sys.exit(5)\n",
    )
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *app, stdin=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "from-the-pod"
    daemon = mirrord.daemon_pid()
    assert daemon is not None
    secrets = list(mirrord.runtime.glob(f"agent-{daemon}-*.secret"))
    assert secrets
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not pid_alive(daemon), 10, "the daemon to die")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=20)
    assert out.strip() == "errno 5"  # EIO, not a hang
    assert proc.returncode == 5
    assert "mirrord: warning: the mirrord daemon went away" in err
    # the next run starts a new daemon over the dead one's socket and pid file
    result = mirrord.run(
        "run",
        "-t",
        f"pid/{pod.pid}",
        "--",
        sys.executable,
        "-c",
        "print(open('/app/test.txt').read())",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from the pod"
    assert mirrord.daemon_pid() not in (None, daemon)
    # the dead daemon's agent secrets went with it
    assert not any(path.exists() for path in secrets)


def test_a_stuck_daemon_is_named_with_what_to_do(mirrord: Mirrord) -> None:
    assert mirrord.run("daemon", "start").returncode == 0
    daemon = mirrord.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)
    try:
        # a new daemon cannot take the pid lock: this used to end in "mirrordd exited while
        # starting" and a log tail
        result = mirrord.run("run", "-t", "pid/1", "--", "true", timeout=40)
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert result.returncode == 1
    assert_one_clear_error(result.stderr, f"daemon (pid {daemon})", "does not answer", "kill")


@pytest.mark.netns
def test_ext_wait_timeout_zero_does_not_wait(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(SPEC)
    started = time.monotonic()
    result = mirrord.run("ext", "-t", f"pid/{pod.pid}", "--wait-timeout", "0", timeout=30)
    assert result.returncode == 0, result.stderr
    read_until_ready(result.stdout.splitlines())
    assert time.monotonic() - started < 15  # 0 used to mean the default, 60 s
    wait_for(lambda: not mirrord.sessions(), 5, "the session to close")


@pytest.mark.netns
def test_ext_killed_before_the_debuggee_starts_closes_its_session(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    # an IDE stops `mirrord ext` (the user cancelled the launch) while it waits for the
    # debuggee: the session and its agent go at once, not when the wait times out
    pod = make_pod(SPEC)
    ext = mirrord.popen("ext", "-t", f"pid/{pod.pid}", "--wait-timeout", "600")
    assert ext.stdout is not None
    read_until_ready(iter(ext.stdout.readline, ""))
    assert len(mirrord.sessions()) == 1
    ext.kill()
    ext.wait(timeout=10)
    wait_for(lambda: not mirrord.sessions(), 10, "the session to close")


@pytest.mark.netns
def test_progress_in_ci_is_plain_lines_even_with_force_color(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(SPEC)
    mirrord.env.update(CI="true", FORCE_COLOR="1")
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "echo", "hi", input="")
    assert result.returncode == 0
    assert result.stdout == "hi\n"
    assert "\x1b" not in result.stderr  # no spinner frames in the CI log
    assert "mirrord: reading the target's environment\n" in result.stderr


@pytest.mark.netns
def test_an_empty_env_include_means_no_remote_variable(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(SPEC)
    show = "import os; print(os.environ.get('POD_VAR'))"
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "-s", "", "--", sys.executable, "-c", show)
    assert result.returncode == 0, result.stderr
    # the warning said "no remote variable is used" while the agent sent all of them
    assert "feature.env.include is empty" in result.stderr
    assert result.stdout.strip() == "None"


def test_ls_against_an_api_server_that_never_answers_times_out(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # accepted by the kernel, never answered
    try:
        port = server.getsockname()[1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
            "users: [{name: u, user: {token: t}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u, namespace: default}}]\n"
        )
        mirrord.env["KUBECONFIG"] = str(kubeconfig)
        started = time.monotonic()
        result = mirrord.run("ls", "--json", "--timeout", "1", timeout=30)
    finally:
        server.close()
    assert result.returncode == 1
    assert time.monotonic() - started < 15  # it used to wait forever
    assert "did not answer within 1 s" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_relative_or_too_long_runtime_directory(tmp_path: Path) -> None:
    # relative: the daemon (started in /) used another directory than its client: 20 s, then
    # "mirrordd did not answer"
    cli = Mirrord(tmp_path / "rt")
    try:
        env = dict(cli.env, MIRRORD_RUNTIME_DIR="rt")
        result = subprocess.run(
            [MIRRORD, "daemon", "start"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert f"in {tmp_path / 'rt'}" in result.stdout
        assert (tmp_path / "rt" / "mirrordd.sock").exists()
    finally:
        cli.cleanup()
    # too long for unix socket paths: said before anything is created
    long = Mirrord(tmp_path / ("x" * 100))
    result = long.run("run", "-t", "pid/1", "--", "true", timeout=20)
    assert result.returncode == 1
    assert_one_clear_error(result.stderr, "too long a path for the unix sockets")
    assert not long.runtime.exists()


def test_a_config_file_saved_with_a_bom_is_read(mirrord: Mirrord, tmp_path: Path) -> None:
    for name, text in (
        ("m.json", '{"target": "pid/4242"}'),
        ("m.toml", 'target = "pid/4242"\n'),
        ("m.yaml", "target: pid/4242\n"),
    ):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        result = mirrord.run("verify-config", "--ide", str(path))
        assert result.returncode == 0, result.stdout
        assert json.loads(result.stdout)["resolved"]["target"]["path"] == "pid/4242"


@pytest.mark.netns
def test_sigusr1_reaches_the_app_instead_of_killing_mirrord_alone(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    app = python_app(
        tmp_path,
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: (print('reload', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n",
    )
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *app)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)  # used to end mirrord run and orphan the app
    out, _ = proc.communicate(timeout=20)
    assert out.strip() == "reload"
    assert proc.returncode == 0


def test_stale_files_in_the_runtime_directory(mirrord: Mirrord) -> None:
    mirrord.runtime.chmod(0o755)  # looser than it should be: tightened
    (mirrord.runtime / "mirrordd.pid").write_text("garbage\n")
    (mirrord.runtime / "mirrordd.sock").write_text("not a socket")
    (mirrord.runtime / "layer.sock").mkdir()
    (mirrord.runtime / "mirrordd.log").write_text("an old daemon's line\n" * 10)
    result = mirrord.run("daemon", "start", timeout=30)
    assert result.returncode == 1
    # only this start's reason, not a traceback tail nor an older daemon's lines
    assert_one_clear_error(
        result.stderr, f"cannot listen on {mirrord.runtime / 'layer.sock'} (Is a directory)"
    )
    assert "old daemon" not in result.stderr
    (mirrord.runtime / "layer.sock").rmdir()
    result = mirrord.run("daemon", "start", timeout=30)
    assert result.returncode == 0, result.stderr
    assert mirrord.runtime.stat().st_mode & 0o777 == 0o700
    assert mirrord.status()["running"]


def test_a_deleted_working_directory_is_named(mirrord: Mirrord, tmp_path: Path) -> None:
    gone = 'mkdir gone && cd gone && rmdir ../gone && exec "$@"'
    for args in (["run", "-t", "pid/1", "--", "true"], ["verify-config", "/nonexistent.json"]):
        result = run_argv(mirrord, ["sh", "-c", gone, "sh", MIRRORD, *args], cwd=tmp_path)
        assert result.returncode == 1
        assert_one_clear_error(result.stderr, "the current directory", "no longer exists")


def test_a_malformed_daemon_answer_is_one_line_and_a_saved_traceback(
    mirrord: Mirrord, tmp_path: Path
) -> None:
    """A daemon of another mirrord version may answer what this CLI does not expect: the user
    gets one line naming a bug and where the traceback is, not the traceback."""
    import threading

    from mirrord.layer import build_id, library_path

    layer = {
        "LD_PRELOAD": str(library_path()),
        "MIRRORD_LAYER_SOCKET": str(mirrord.runtime / "layer.sock"),
    }
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(mirrord.runtime / "mirrordd.sock"))
    server.listen(8)
    server.settimeout(20)

    def answer() -> None:
        for _ in range(4):  # bounded: status (ensure_daemon), then create_session
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                for line in conn.makefile("rb"):
                    request = json.loads(line)
                    # a status with our build id (one without is refused before anything),
                    # then a create_session answer with our layer but no session id
                    result = (
                        {"daemon": {"build_id": build_id(), "layer_library": layer["LD_PRELOAD"]}}
                        if request["op"] == "status"
                        else {"env": layer}
                    )
                    reply = {"id": request["id"], "ok": True, "result": result}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = mirrord.run("run", "-t", "pid/1", "--", "true", timeout=30)
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept() above; close() alone does not
        server.close()
        thread.join(5)
        (mirrord.runtime / "mirrordd.sock").unlink()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "internal error (KeyError" in result.stderr and "bug in mirrord" in result.stderr
    saved = Path(result.stderr.rsplit("traceback in ", 1)[1].strip())
    try:
        assert "Traceback" in saved.read_text()
    finally:
        saved.unlink()


def test_a_kernel_thread_target_says_what_to_target(mirrord: Mirrord) -> None:
    with open("/proc/2/stat") as f:
        if "(kthreadd)" not in f.read():
            pytest.skip("pid 2 is not kthreadd here")
    result = mirrord.run("run", "-t", "pid/2", "--", "true", timeout=60)
    assert result.returncode == 1
    assert_one_clear_error(result.stderr, "no environment to read (a kernel thread?)")


@pytest.mark.netns
def test_scripts_that_exec_refuses_are_named(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    no_shebang = tmp_path / "no-shebang.sh"
    no_shebang.write_text("echo hi\n")
    bad_interpreter = tmp_path / "bad-interpreter.sh"
    bad_interpreter.write_text("#!/nonexistent/interpreter\necho hi\n")
    for script in (no_shebang, bad_interpreter):
        script.chmod(0o755)
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", str(no_shebang))
    assert result.returncode == 126  # was an OSError traceback
    assert_one_clear_error(result.stderr, "Exec format error", "needs a #! line")
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", str(bad_interpreter))
    assert result.returncode == 127
    assert_one_clear_error(result.stderr, "the interpreter named on its #! line was not found")


def test_control_api_bad_requests_are_bad_request_not_internal(mirrord: Mirrord) -> None:
    assert mirrord.run("daemon", "start").returncode == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(mirrord.runtime / "mirrordd.sock"))
        replies = sock.makefile("rb")
        for request in (
            [1, 2],
            {"id": 1, "op": "no-such-op"},
            {"id": 2, "op": "create_session", "config_request": {}, "client_pid": "abc"},
        ):
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(replies.readline())
            while "event" in reply:
                reply = json.loads(replies.readline())
            assert reply["ok"] is False
            assert reply["error"]["code"] == "bad_request", reply  # "internal" said "a bug"


@pytest.mark.netns
def test_runs_one_after_another_with_idle_timeout_zero(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    """daemon.idle_timeout 0 ("exit with the last session") used to stop the daemon while the
    next run's session was being created: "the mirrord daemon closed the connection"."""
    pod = make_pod(SPEC)
    mirrord.env["MIRRORD_DAEMON_IDLE_TIMEOUT"] = "0"
    show = "import os; print(os.environ['POD_VAR'])"
    for _ in range(3):
        result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", show)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "from-the-pod"
