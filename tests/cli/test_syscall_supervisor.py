"""The system-call supervisor (`mirrord run --syscalls`, docs/layer.md): a static C program,
which the layer cannot reach, reads a local pod's pod-only file through the seccomp listener,
reads local files as usual, and gets EIO for files and ECONNREFUSED for connections and
datagrams (not a hang, not ENOSYS, never this machine instead) once the supervisor died."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec, create_pod
from tests.cli.conftest import Mirrord, pid_alive, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed"),
]

HERE = Path(__file__).resolve().parent
SPEC = PodSpec(
    env={"POD_ONLY_VAR": "from the pod"},
    files={"/app/pod-only.txt": b"only in the pod\n", "/app/other.txt": b"second file\n"},
    symlinks={"/app/link": "pod-only.txt"},
    dns_records={"udp-only.test": "10.4.5.6"},
    echo_port=None,
    http_port=None,
)


@pytest.fixture(scope="module")
def pod() -> Iterator[LocalPod]:
    from mirrord.localpod import cleanup_leftovers

    cleanup_leftovers()
    with create_pod(SPEC) as made:
        yield made


@pytest.fixture(scope="module")
def static_reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/cli/c/sv_read.c linked with -static: no interpreter, LD_PRELOAD means nothing."""
    out = tmp_path_factory.mktemp("sv") / "sv_read"
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O1",
            "-Wall",
            "-Werror",
            "-o",
            str(out),
            str(HERE / "c" / "sv_read.c"),
        ],
        check=True,
        timeout=120,
    )
    return out


def _local_file(tmp_path: Path) -> Path:
    # below the working directory: in the layer's default local set
    path = tmp_path / "local.txt"
    path.write_text("on this machine\n")
    return path


def test_static_binary_reads_a_pod_only_file_and_local_files_under_syscalls(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path, tmp_path: Path
) -> None:
    local = _local_file(tmp_path)
    lines = "\n".join(
        ["/app/pod-only.txt", "open:/app/other.txt", "openat2:/app/pod-only.txt",
         str(local), "/app/missing.txt", "access:/app/pod-only.txt", "access:/app/missing.txt",
         f"access:{local}", "stat:/app/pod-only.txt", "stat:/app/missing.txt",
         f"stat:{local}", "fstat:/app/other.txt", "/etc/hostname"]
    )  # fmt: skip
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--syscalls", "--", str(static_reader), input=lines + "\n"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("pid ") and not out[0].endswith("supervisor none"), out
    assert out[1:13] == [
        "/app/pod-only.txt = only in the pod",
        "/app/other.txt = second file",
        # openat2 without RESOLVE_* flags is answered like openat
        "/app/pod-only.txt = only in the pod",
        f"{local} = on this machine",
        "/app/missing.txt ! ENOENT",  # the pod's own answer
        "/app/pod-only.txt access ok",
        "/app/missing.txt access ! ENOENT",
        f"{local} access ok",
        # the target's stat: its size and mode (0644 regular file), not this machine's
        "/app/pod-only.txt stat 16 100644",
        "/app/missing.txt stat ! ENOENT",
        f"{local} stat 16 100644",
        # glibc's fstat is newfstatat(fd, "", AT_EMPTY_PATH): continued, so the installed
        # fd's own stat: a local target's file is handed over, the pod's file itself (its
        # mode 0644; relayed, a memfd's 0777: fd identity is not exact there)
        "/app/other.txt fstat 12 100644",
    ], result.stdout
    # /etc/hostname is the pod's for reads (the layer's rule 4), not this machine's
    inside = pod.run_in_pod(["cat", "/etc/hostname"]).stdout.decode().strip()
    assert out[13] == f"/etc/hostname = {inside}"


def test_static_binary_is_supervised_without_being_asked(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path
) -> None:
    # an ELF without an interpreter: the layer cannot load into it, so mirrord run uses the
    # supervisor by itself (experimental.syscall_supervisor unset)
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--", str(static_reader), input="/app/pod-only.txt\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pid ") and not lines[0].endswith(" supervisor none"), lines
    assert lines[1:] == ["/app/pod-only.txt = only in the pod"]


def test_config_false_leaves_a_static_binary_out_of_reach(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path, tmp_path: Path
) -> None:
    # the reason for the supervisor: LD_PRELOAD does nothing to a static program
    config = tmp_path / "mirrord.json"
    config.write_text('{"experimental": {"syscall_supervisor": false}}')
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", str(static_reader),
        input="/app/pod-only.txt\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(" supervisor none"), lines
    assert lines[1:] == ["/app/pod-only.txt ! ENOENT"]


def test_dynamic_program_is_not_supervised_unless_asked(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    # the same program linked dynamically has an interpreter: the layer is for it, and its
    # raw openat system calls (which the layer does not hook) stay local as before
    program = tmp_path / "sv_read_dynamic"
    subprocess.run(
        ["gcc", "-O1", "-Wall", "-Werror", "-o", str(program), str(HERE / "c" / "sv_read.c")],
        check=True,
        timeout=120,
    )
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--", str(program), input="/app/pod-only.txt\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(" supervisor none"), lines
    assert lines[1:] == ["/app/pod-only.txt ! ENOENT"]
    # asked for, the supervisor serves it too (the layer stays loaded in it)
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--syscalls", "--", str(program),
        input="/app/pod-only.txt\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["/app/pod-only.txt = only in the pod"]


def test_dead_supervisor_gives_eio_for_remote_files_and_local_ones_go_on(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path, tmp_path: Path
) -> None:
    local = _local_file(tmp_path)
    proc = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", "--syscalls", "--", str(static_reader),
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = proc.stdout.readline().split()
        assert first[:1] == ["pid"] and first[3] != "none", first
        supervisor = int(first[3])
        proc.stdin.write("/app/pod-only.txt\nudp:udp-only.test\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "/app/pod-only.txt = only in the pod\n"
        assert proc.stdout.readline() == "udp 10.4.5.6\n"
        os.kill(supervisor, signal.SIGKILL)
        wait_for(lambda: not pid_alive(supervisor), 30, "the supervisor to die")
        # a connect and datagrams the layer sends to the pod fail as on a lost agent; they do
        # not go to this machine instead (here a listener would take the connect)
        with socket.create_server(("127.0.0.1", 0)) as here:
            port = here.getsockname()[1]
            proc.stdin.write(f"/app/other.txt\n{local}\ntcp:{port}\nudp:udp-only.test\n")
            rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, err
    assert rest.splitlines() == [
        "/app/other.txt ! EIO",
        f"{local} = on this machine",
        "tcp ! ECONNREFUSED",
        "udp ! ECONNREFUSED",
    ], err
    assert f"system-call supervisor (pid {supervisor}) died" in err


def test_threads_and_exec_children_are_served(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path
) -> None:
    # 8 threads opening the pod-only file at once are answered concurrently, each correctly;
    # the filter is inherited across fork and exec: a static child is served, and a dynamic
    # one (cat, with the layer) reads the pod's file too
    lines = "\n".join(
        [
            "threads:8:/app/pod-only.txt",
            f"exec:{static_reader} /app/other.txt",
            "exec:/bin/cat /app/pod-only.txt",
        ]
    )
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--", str(static_reader), input=lines + "\n"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "threads 200/200",
        "/app/other.txt = second file",
        "exit 0",
        "only in the pod",
        "exit 0",
    ], result.stderr


@pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed")
def test_static_go_program_gets_the_pod_env_and_pod_only_files(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    # CGO_ENABLED=0: Go's own system calls, no libc, no interpreter; supervised without
    # being asked. Its runtime preempts with SIGURG, which a slow answer would livelock on.
    program = tmp_path / "reader"
    subprocess.run(
        ["go", "build", "-o", str(program), str(HERE / "go" / "reader.go")],
        check=True,
        timeout=300,
        env={
            **os.environ,
            "CGO_ENABLED": "0",
            "GOCACHE": str(tmp_path / "gocache"),
            "GOPATH": str(tmp_path / "gopath"),
            "GO111MODULE": "off",
        },
    )
    local = _local_file(tmp_path)
    lines = [
        "/app/pod-only.txt",
        str(local),
        "/app/missing.txt",
        "stat:/app/pod-only.txt",
        "threads:/app/other.txt",
        "ls:/app/godir",
        "write:/app/go-written.txt from go",
        "/app/go-written.txt",
    ]
    pod.run_in_pod(["sh", "-c", "mkdir -p /app/godir/d && : > /app/godir/z && : > /app/godir/a"])
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"fs": {"mode": "write"}}}))
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", str(program),
        input="\n".join(lines) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "env from the pod",
        "/app/pod-only.txt = only in the pod",
        f"{local} = on this machine",
        "/app/missing.txt ! open /app/missing.txt: no such file or directory",
        "/app/pod-only.txt stat 16 -rw-r--r--",
        "goroutines 400/400",
        "/app/godir: a d/ z",  # os.ReadDir of a pod-only directory (sorted by Go)
        "write ok",
        "/app/go-written.txt = from go",  # written back when Go closed it, read from the pod
    ], result.stderr
    done = pod.run_in_pod(["cat", "/app/go-written.txt"], check=False).stdout
    assert done == b"from go\n"
    pod.run_in_pod(["rm", "-rf", "/app/go-written.txt", "/app/godir"])


def test_fs_mapping_to_a_local_path_is_kept_for_a_static_program(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path, tmp_path: Path
) -> None:
    # feature.fs.mapping rewrites a path that then stays local: the layer opens the mapped
    # name, and so does the supervisor (it installs that fd), not the path the program named
    local = _local_file(tmp_path)
    config = tmp_path / "mirrord.json"
    config.write_text(
        json.dumps({"feature": {"fs": {"mapping": {"^/elsewhere/(.*)$": f"{tmp_path}/$1"}}}})
    )
    (tmp_path / "link").symlink_to("local.txt")
    lines = ["/elsewhere/local.txt", "/app/pod-only.txt", "statx:/elsewhere/local.txt",
             "readlink:/elsewhere/link", "mkdir:/elsewhere/made",
             "rename:/elsewhere/made /elsewhere/moved", "unlink:/elsewhere/link"]  # fmt: skip
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", str(static_reader),
        input="\n".join(lines) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "/elsewhere/local.txt = on this machine",
        "/app/pod-only.txt = only in the pod",
        # statx, readlink and the mutators under the mapped name too (/elsewhere does not
        # exist on this machine)
        "/elsewhere/local.txt statx 16 100644",
        "/elsewhere/link -> local.txt",
        "mkdir ok",
        "rename ok",
        "unlink ok",
    ], (local, result.stderr)
    assert (tmp_path / "moved").is_dir() and not (tmp_path / "made").exists()
    assert not (tmp_path / "link").is_symlink()


def test_statx_readlink_and_mutators_of_a_static_program(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path, tmp_path: Path
) -> None:
    # read mode (the default): statx and readlink answer with the pod's files; a mutator stays
    # local (as the layer keeps it), where /app does not exist
    lines = ["statx:/app/pod-only.txt", "statx:/app/missing.txt", "readlink:/app/link",
             "mkdir:/app/made-here"]  # fmt: skip
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--", str(static_reader), input="\n".join(lines) + "\n"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "/app/pod-only.txt statx 16 100644",
        "/app/missing.txt statx ! ENOENT",
        "/app/link -> pod-only.txt",
        "mkdir ! ENOENT",
    ], result.stderr
    # write mode: they change the pod's files
    pod.run_in_pod(["sh", "-c", "echo scratch > /app/scratch.txt"])
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"fs": {"mode": "write"}}}))
    run = ["run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", str(static_reader)]
    result = mirrord.run(*run, input="mkdir:/app/made\nrename:/app/scratch.txt /app/made/s.txt\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["mkdir ok", "rename ok"], result.stderr
    moved = pod.run_in_pod(["cat", "/app/made/s.txt"], check=False)
    assert moved.stdout == b"scratch\n", moved
    result = mirrord.run(*run, input="rmdir:/app/made\nunlink:/app/made/s.txt\nrmdir:/app/made\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["rmdir ! ENOTEMPTY", "unlink ok", "rmdir ok"]
    assert pod.run_in_pod(["test", "-e", "/app/made"], check=False).returncode == 1


def test_static_program_writes_lists_and_reads_a_big_pod_only_file(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path, tmp_path: Path
) -> None:
    # fs mode `write`: a pod-only file written (new, truncated, appended) lands in the pod once
    # the program closed it; a pod-only directory is listed with opendir/readdir; a file over
    # fetch_limit (8 MiB) is read whole
    pod.run_in_pod(["sh", "-c", "mkdir -p /app/dir/sub && : > /app/dir/a.txt && : > /app/dir/b"])
    big = 9 * 1024 * 1024 + 123
    pod.run_in_pod(["sh", "-c", f"yes 0123456789abcdef | head -c {big} > /app/big.bin"])
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({"feature": {"fs": {"mode": "write"}}}))
    lines = ["write:/app/written.txt first", "append:/app/written.txt second",
             "/app/written.txt", "write:/app/other.txt replaced", "ls:/app/dir",
             "ls:/app/missing", "size:/app/big.bin", "write:/app/last.txt bye"]  # fmt: skip
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", str(static_reader),
        input="\n".join(lines) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    content = (b"0123456789abcdef\n" * (big // 17 + 1))[:big]
    assert result.stdout.splitlines()[1:] == [
        "write ok",
        "append ok",
        "/app/written.txt = first",  # read back from the pod: written back at close
        "write ok",
        "/app/dir: a.txt b sub/",
        "/app/missing ls ! ENOENT",
        f"/app/big.bin size {big} sum {sum(content)}",
        "write ok",
    ], result.stderr

    def in_pod(path: str) -> bytes:
        return bytes(pod.run_in_pod(["cat", path], check=False).stdout)

    # written back when the program closed them, the last one just before it ended: mirrord
    # run returns once the supervisor is done
    assert in_pod("/app/other.txt") == b"replaced\n"
    assert in_pod("/app/written.txt") == b"first\nsecond\n"
    assert in_pod("/app/last.txt") == b"bye\n"
    pod.run_in_pod(
        [
            "sh",
            "-c",
            "printf 'second file\\n' > /app/other.txt; rm -f /app/written.txt /app/last.txt",
        ]
    )
    # nothing of the listings is left behind on this machine once the supervisor ended
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    wait_for(lambda: not list(tmp.glob("mirrord-sv-*")), 30, "the listings to be removed")


def test_static_program_sends_datagrams_without_connect_through_the_pod(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path
) -> None:
    # sendto and sendmsg with a destination on an unconnected UDP socket: to the pod's own
    # DNS server on its loopback (only the pod knows the name), as the layer relays them
    lines = ["udp:udp-only.test", "udpmsg:udp-only.test"]
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--", str(static_reader), input="\n".join(lines) + "\n"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["udp 10.4.5.6", "udp 10.4.5.6"], result.stderr


@pytest.mark.parametrize("ide", ["vscode", "intellij"])
def test_ide_starts_a_static_program_under_the_supervisor(
    mirrord: Mirrord, pod: LocalPod, static_reader: Path, tmp_path: Path, ide: str
) -> None:
    # `mirrord ext -e` of a static executable: the ready line's patched_path is what the IDE
    # starts instead of it, with the program's arguments and the session's environment
    from mirrord.layer import supervisor_path
    from tests.cli._ide import IDE_ENV, debuggee_env, read_until_ready

    mirrord.env.update(IDE_ENV[ide])
    ext = mirrord.popen(
        "ext", "-t", f"pid/{pod.pid}", "-e", str(static_reader), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert ext.stdout is not None
        execution = read_until_ready(ext.stdout)
        assert execution.patched_path == str(supervisor_path()), execution
        infos = [m["message"] for m in execution.messages if m["type"] == "Info"]
        assert any("system-call supervisor" in text for text in infos), execution.messages
        debuggee = subprocess.run(
            [execution.patched_path, "/app/pod-only.txt", "/app/missing.txt"],
            env=debuggee_env(mirrord.env, execution),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert debuggee.returncode == 0, debuggee.stderr
        assert debuggee.stdout.splitlines() == [
            "/app/pod-only.txt = only in the pod",
            "/app/missing.txt ! ENOENT",
        ], debuggee.stderr
        out, err = ext.communicate(timeout=60)  # the debuggee is gone: the session ends
        assert ext.returncode == 0 and out == "" and err == "", (out, err)
    finally:
        if ext.poll() is None:
            ext.kill()
            ext.wait(timeout=30)
    # turned off in the config: the IDE starts the program itself, without the target's files
    config = tmp_path / "mirrord.json"
    config.write_text('{"experimental": {"syscall_supervisor": false}}')
    ext = mirrord.popen(
        "ext", "-t", f"pid/{pod.pid}", "-f", str(config), "-e", str(static_reader),
        "--wait-timeout", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert ext.stdout is not None
        execution = read_until_ready(ext.stdout)
        assert execution.patched_path is None
        warnings = [m["message"] for m in execution.messages if m["type"] == "Warning"]
        assert any("statically linked" in text for text in warnings), execution.messages
        ext.communicate(timeout=60)
    finally:
        if ext.poll() is None:
            ext.kill()
            ext.wait(timeout=30)
