"""Without a daemon (or with one that never answers) a preloaded program runs locally when
the config says so, and its remote calls fail with EIO / ECONNREFUSED: never a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from mirrord.layer import LayerSettings, layer_env
from tests.layer.conftest import PYTHON


def _env(sock: Path, settings: LayerSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIRRORD_", "LD_PRELOAD"))}
    env.update(layer_env(socket_path=str(sock), session_id="s", settings=settings))
    return env


REMOTE_CALLS = """
import errno, os, socket
try:
    open('/app/test.txt')
except OSError as e:
    print('open', errno.errorcode[e.errno])
try:
    os.stat('/app/test.txt')
except OSError as e:
    print('stat', errno.errorcode[e.errno])
try:
    socket.create_connection(('192.0.2.55', 80), timeout=5)
except OSError as e:
    print('connect', errno.errorcode[e.errno])
try:
    socket.getaddrinfo('db.svc.cluster.local', 80)
except socket.gaierror as e:
    print('dns', e.errno == socket.EAI_AGAIN)
print(open('/etc/passwd').read().startswith('root:'))
"""

EXPECTED = ["open EIO", "stat EIO", "connect ECONNREFUSED", "dns True", "True"]


def test_local_config_runs_fully_locally_without_a_daemon(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("local\n")
    env = _env(
        tmp_path / "absent.sock", LayerSettings(fs_mode="local", outgoing_tcp=False, dns=False)
    )
    out = subprocess.run(
        ["bash", "-c", "cat f.txt; [[ -r f.txt ]] && echo yes; ls; stat -c %s f.txt"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert out.stdout == b"local\nyes\nf.txt\n6\n"


def test_remote_calls_fail_with_eio_and_econnrefused_without_a_daemon(tmp_path: Path) -> None:
    env = _env(tmp_path / "absent.sock", LayerSettings(timeout_ms=2000))
    start = time.monotonic()
    out = subprocess.run(
        [PYTHON, "-S", "-c", REMOTE_CALLS],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.decode().splitlines() == EXPECTED
    assert out.stderr == b""  # nothing printed unless MIRRORD_LAYER_DEBUG is set
    assert time.monotonic() - start < 10
    cat = subprocess.run(
        ["cat", "/app/test.txt"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert cat.returncode == 1 and b"Input/output error" in cat.stderr


def test_a_daemon_that_never_answers_times_out_with_eio(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(64)  # accepts into the backlog, never reads or answers
        env = _env(path, LayerSettings(timeout_ms=500))
        start = time.monotonic()
        out = subprocess.run(
            [PYTHON, "-S", "-c", REMOTE_CALLS],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.decode().splitlines() == EXPECTED
        assert time.monotonic() - start < 20


def test_debug_output_only_with_mirrord_layer_debug(tmp_path: Path) -> None:
    env = _env(tmp_path / "absent.sock", LayerSettings(timeout_ms=500))
    env["MIRRORD_LAYER_DEBUG"] = "1"
    out = subprocess.run(
        ["cat", "/app/test.txt"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert b"mirrord-layer[" in out.stderr


def test_skipped_processes_and_dont_load_run_without_hooks(tmp_path: Path) -> None:
    env = _env(tmp_path / "absent.sock", LayerSettings(skip_processes=("cat",)))
    out = subprocess.run(
        ["cat", "/etc/hostname"], env=env, capture_output=True, timeout=30, check=True
    )
    assert out.stdout == Path("/etc/hostname").read_bytes()
    # not skipped: /app/test.txt would be remote (EIO); skipped: local (ENOENT)
    out = subprocess.run(
        ["cat", "/app/test.txt"], env=env, capture_output=True, timeout=30, check=False
    )
    assert b"No such file or directory" in out.stderr
    env = _env(tmp_path / "absent.sock", LayerSettings())
    env["MIRRORD_DONT_LOAD"] = "1"
    out = subprocess.run(
        ["cat", "/app/test.txt"], env=env, capture_output=True, timeout=30, check=False
    )
    assert b"No such file or directory" in out.stderr
