"""Processes under the layer: fork children register naming their parent and keep the
parent's remote fds; exec and spawn keep the layer even with a custom environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import PYTHON, TEST_FILE, Runner, build_c

FORK_20 = r"""
import os, socket, sys
kids = []
for i in range(20):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            data = open('/app/test.txt', 'rb').read()
            s = socket.create_connection(('192.0.2.55', 8000 + i), timeout=10)
            greeting = s.makefile('rb').readline()
            s.close()
            code = 0 if data == b'hello from the target\n' and greeting == f'hello 192.0.2.55:{8000 + i}\n'.encode() else 3
        except Exception as e:
            print(e, file=sys.stderr)
            code = 4
        os._exit(code)
    kids.append(pid)
bad = 0
for pid in kids:
    _, status = os.waitpid(pid, 0)
    bad += os.waitstatus_to_exitcode(status) != 0
print(os.getpid(), bad, ' '.join(map(str, kids)))
"""


def test_twenty_forked_children_read_and_connect(run: Runner, daemon: LayerDaemon) -> None:
    out = run.py(FORK_20, timeout=60).stdout.split()
    parent, bad, kids = int(out[0]), int(out[1]), [int(k) for k in out[2:]]
    assert bad == 0
    assert len(kids) == 20
    assert daemon.processes == {parent: None, **{k: parent for k in kids}}
    assert (
        sum(
            isinstance(m, type(m)) and type(m).__name__ == "LayerConnect" for m in daemon.requests()
        )
        == 20
    )


def test_forked_child_keeps_a_remote_fd(run: Runner, daemon: LayerDaemon) -> None:
    daemon.add_file("/app/big.bin", b"x" * 10 + b"TAIL")
    # opened read-write, so it is handle-backed: the child reads through the handle the
    # agent copied for it, the parent closes its own right after fork
    code = r"""
import os
fd = os.open('/app/big.bin', os.O_RDWR)
os.lseek(fd, 10, 0)
pid = os.fork()
if pid == 0:
    os._exit(0 if os.read(fd, 4) == b'TAIL' else 5)
os.close(fd)
_, st = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(st))
"""
    assert run.py(code, settings=LayerSettings(fs_mode="write", timeout_ms=5000)).stdout == b"0\n"
    assert len(daemon.processes) == 2


def test_subprocess_children_keep_the_layer_with_a_custom_env(
    run: Runner, daemon: LayerDaemon
) -> None:
    code = r"""
import os, subprocess
a = subprocess.run(['cat', '/app/test.txt'], capture_output=True, env={'PATH': os.environ['PATH']}).stdout
b = subprocess.run(['cat', '/app/test.txt'], capture_output=True).stdout
c = os.popen('cat /app/test.txt').read().encode()
print(a == b == c == b'hello from the target\n', os.getpid())
"""
    out = run.py(code).stdout.split()
    assert out[0] == b"True"
    parent = int(out[1])
    children = [pid for pid, p in daemon.processes.items() if p == parent]
    assert len(children) >= 3  # cat x3 (popen's shell may register too)


def test_exec_keeps_the_daemon_connection(run: Runner, daemon: LayerDaemon) -> None:
    code = "import os; os.execv('/bin/cat', ['cat', '/app/test.txt'])"
    assert run.py(code).stdout == TEST_FILE
    # one process: the exec'd image reused the registered connection
    assert len(daemon.processes) == 1


def test_bypassed_fork_and_exec_without_layer_settings(tmp_path: object) -> None:
    from mirrord.layer import library_path

    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_")}
    env["LD_PRELOAD"] = str(library_path())
    code = "import os,subprocess; pid=os.fork()\nif pid==0: os._exit(0)\nos.waitpid(pid,0); print(subprocess.run(['echo','ok'],capture_output=True).stdout.decode(), end='')"
    out = subprocess.run(
        [PYTHON, "-S", "-c", code], env=env, capture_output=True, timeout=30, check=True
    )
    assert out.stdout == b"ok\n"


@pytest.fixture(scope="module")
def spawn_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(tmp_path_factory, "spawn")


@pytest.mark.parametrize(
    "how", ["execve", "execvp", "execl", "execlp", "execle", "posix_spawn", "posix_spawnp"]
)
def test_exec_and_spawn_with_an_env_without_the_layer(
    run: Runner, daemon: LayerDaemon, spawn_program: Path, how: str
) -> None:
    assert run([str(spawn_program), how]).stdout == TEST_FILE
    if how.startswith("posix_spawn"):
        parent, child = daemon.processes.items()
        assert child[1] == parent[0]  # the spawned cat registered naming its parent
    else:
        assert len(daemon.processes) == 1  # exec: the same process


@pytest.fixture(scope="module")
def spawn_actions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(tmp_path_factory, "spawn_actions")


# files over fetch_limit are handle-backed, and nothing is handed over: the child has only what
# the layer gives it (glibc's own spawn would give it the empty placeholder, the local files)
_RELAYED = LayerSettings(fs_mode="write", fetch_limit=1000, fs_handover=False, timeout_ms=5000)


@pytest.mark.parametrize("how", ["dup2-read", "chdir-read"])
def test_a_spawned_child_reads_the_remote_file_its_file_actions_give_it(
    run: Runner, daemon: LayerDaemon, spawn_actions: Path, how: str
) -> None:
    """posix_spawn_file_actions_adddup2 of a handle-backed remote file into the child's stdin
    (Rust's `Command::stdin(File)`), the parent closing its fd at once; and addchdir_np into a
    directory only the pod has (`Command::current_dir`)."""
    content = b"x" * 10 + b"TAIL" + b"y" * 3000
    daemon.add_file("/app/only-here/big.bin", content)
    out = run([str(spawn_actions), how, "/app/only-here/big.bin"], settings=_RELAYED)
    assert out.stdout == (content[10:] if how == "dup2-read" else content)
    assert out.stderr.endswith(b"spawn: ok; left to reap: none\n")
    parent, child = list(daemon.processes.items())[:2]
    assert child[1] == parent[0]


def test_a_spawn_through_the_layer_keeps_its_attributes(
    run: Runner, daemon: LayerDaemon, spawn_actions: Path
) -> None:
    """POSIX_SPAWN_SETPGROUP on a spawn the layer runs itself (its stdin a remote file)."""
    daemon.add_file("/app/big.bin", b"z" * 3000)
    out = run([str(spawn_actions), "pgroup", "/app/big.bin"], settings=_RELAYED)
    size, pgid, pid = out.stdout.split()
    assert (int(size), pgid) == (3000, pid)  # the child leads a process group of its own
    assert out.stderr.endswith(b"spawn: ok; left to reap: none\n")


@pytest.mark.parametrize("how", ["dup2-write", "open-write"])
def test_a_spawned_child_writes_the_remote_file_its_file_actions_give_it(
    run: Runner, daemon: LayerDaemon, spawn_actions: Path, how: str
) -> None:
    """The child's stdout is a remote file: opened by the parent (`Command::stdout(File::create
    (..))`, a write-back cache the parent closes at once) or by the file action itself
    (addopen) in a directory only the pod has."""
    daemon.add_dir("/app/out")
    out = run([str(spawn_actions), how, "/app/out/w.txt"], settings=_RELAYED)
    assert out.stderr.endswith(b"spawn: ok; left to reap: none\n")
    assert daemon.host_path("/app/out/w.txt").read_bytes() == b"spawned\n"
    assert not Path("/app/out/w.txt").exists()


def test_a_spawn_whose_exec_fails_reports_it_and_leaves_no_child(
    run: Runner, daemon: LayerDaemon, spawn_actions: Path
) -> None:
    daemon.add_file("/app/big.bin", b"z" * 3000)
    out = run([str(spawn_actions), "missing", "/app/big.bin"], settings=_RELAYED)
    assert out.stderr.endswith(b"spawn: No such file or directory; left to reap: none\n")


def test_fork_from_a_threaded_process(run: Runner, daemon: LayerDaemon) -> None:
    code = r"""
import os, threading
stop = threading.Event()
def reader():
    while not stop.is_set():
        open('/app/test.txt').read()
threads = [threading.Thread(target=reader) for _ in range(4)]
for t in threads: t.start()
codes = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        ok = open('/app/config/settings.yaml').read() == 'debug: true\n'
        os._exit(0 if ok else 1)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
stop.set()
for t in threads: t.join()
print(codes)
"""
    assert run.py(code, timeout=60).stdout == b"[0, 0, 0, 0, 0]\n"
    parents = list(daemon.processes.values())
    assert parents.count(None) == 1 and len(parents) == 6


def test_exec_into_a_skipped_process_lets_go_of_the_connection(
    run: Runner, daemon: LayerDaemon
) -> None:
    # python registers, then becomes `sleep` (skipped): sleep must not hold the connection
    code = "import os; os.execvp('sleep', ['sleep', '5'])"
    import time

    env = run.env(LayerSettings(skip_processes=("sleep",), timeout_ms=5000))
    with subprocess.Popen([PYTHON, "-S", "-c", code], env=env, cwd=run.cwd) as proc:
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.path.exists(f"/proc/{proc.pid}/exe"):
                if os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):
                    break
                time.sleep(0.02)
            time.sleep(0.3)
            socks = [
                os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{proc.pid}/fd")
            ]
            assert not [s for s in socks if s.startswith("socket:")], socks
        finally:
            proc.kill()
