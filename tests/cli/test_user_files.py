"""Pod-only files as a developer meets them through `mirrord run`: real programs (node, python,
coreutils, sed, bash) read and write files that exist only in a local pod's mount namespace,
and what they print must be what the same program prints inside the pod.

Each case is a regression found by driving these programs: libuv's close/statx through
syscall(), glibc's realpath and mkstemp, mmap of a file bigger than fetch_limit, lstat of
"link/"."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec, create_pod
from tests._pipes import open_pipes
from tests.cli.conftest import Mirrord

pytestmark = pytest.mark.netns

NODE = shutil.which("node")
BIG = bytes(range(256)) * (9 * 4096) + b"tail"  # 9 MiB + 4: over the 8 MiB fetch_limit

SPEC = PodSpec(
    files={
        "/app/config.json": b'{"db": "postgres://pod", "n": 3}\n',
        "/app/sub/deep/c.txt": b"deep file\n",
        "/app/big.bin": BIG,
        "/app/w/.keep": b"",
    },
    symlinks={"/app/link.txt": "config.json", "/app/abslink": "/app/sub"},
    echo_port=None,
    http_port=None,
)


@pytest.fixture(scope="module")
def files_pod() -> Iterator[LocalPod]:
    from mirrord.localpod import cleanup_leftovers

    cleanup_leftovers()
    with create_pod(SPEC) as made:
        yield made


def run_both(mirrord: Mirrord, pod: LocalPod, argv: Sequence[str], *flags: str) -> tuple[str, str]:
    """(stdout through mirrord, stdout of the same command inside the pod)."""
    through = mirrord.run("run", "-t", f"pid/{pod.pid}", *flags, "--", *argv)
    assert through.returncode == 0, through.stderr
    inside = pod.run_in_pod(list(argv), check=False)
    assert inside.returncode == 0, inside.stderr.decode()
    return through.stdout, inside.stdout.decode()


NODE_READ = """
const fs = require('fs');
const out = [];
const s = fs.statSync('/app/config.json');
out.push(['stat', s.size, s.isFile(), s.mode]);
const l = fs.lstatSync('/app/link.txt');
out.push(['lstat', l.isSymbolicLink(), l.size]);
out.push(['fstat', fs.fstatSync(fs.openSync('/app/big.bin', 'r')).size]);
out.push(['realpath', fs.realpathSync('/app/abslink/deep'), fs.realpathSync.native('/app/abslink/deep')]);
out.push(['recursive', fs.readdirSync('/app/sub', {recursive: true}).sort()]);
try { fs.statSync('/app/nope'); } catch (e) { out.push(['missing', e.code]); }
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_node_stat_realpath_and_recursive_readdir_match_the_pod(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # libuv calls statx through syscall() and glibc's realpath resolves with internal calls:
    # both used to answer ENOENT for every pod-only path
    script = tmp_path / "read.js"
    script.write_text(NODE_READ)
    through, inside = run_both(mirrord, files_pod, [str(NODE), str(script)])
    assert '["stat",33,true,33188]' in through
    assert through == inside


NODE_WRITE = """
const fs = require('fs');
const d = process.argv[2];
fs.writeFileSync(d + '/f.json', '{"a":1}');
fs.appendFileSync(d + '/f.json', '\\n');
console.log(fs.statSync(d + '/f.json').size, JSON.stringify(fs.readFileSync(d + '/f.json', 'utf8')));
const ws = fs.createWriteStream(d + '/stream.log', {flags: 'a'});
for (let i = 0; i < 100; i++) ws.write(`line ${i}\\n`);
// 'finish' comes before the fd is closed: the file is read back while still open for writing
ws.end(() => console.log(fs.readFileSync(d + '/stream.log', 'utf8').split('\\n').length - 1));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_node_write_then_append_lands_whole_in_the_pod(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # libuv closes through syscall(): the write-back at close was skipped, so the append
    # fetched the still-empty remote file and the pod kept only "\n"
    script = tmp_path / "write.js"
    script.write_text(NODE_WRITE)
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--",
        str(NODE), str(script), "/app/w",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == '8 "{\\"a\\":1}\\n"\n100\n'
    assert files_pod.run_in_pod(["cat", "/app/w/f.json"]).stdout == b'{"a":1}\n'


PY_FILES = """
import ctypes, hashlib, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.realpath.restype = ctypes.c_char_p
for p in (b"/app/abslink/deep/../deep/c.txt", b"/app/link.txt", b"/app/nope", b"/app/config.json/x"):
    r = libc.realpath(p, None)
    print("realpath", p.decode(), r.decode() if r else os.strerror(ctypes.get_errno()))
with open("/app/big.bin", "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print("mmap", len(m), hashlib.md5(m[:]).hexdigest(), m[-4:])
import shutil
st = os.statvfs("/app")  # glibc's statvfs calls its internal statfs
print("statvfs", st.f_bsize, st.f_namemax, st.f_flag, shutil.disk_usage("/app").total > 0)
"""


def test_libc_realpath_mmap_of_a_file_over_fetch_limit_and_statvfs(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    script = tmp_path / "files.py"
    script.write_text(PY_FILES)
    through, inside = run_both(mirrord, files_pod, [sys.executable, str(script)])
    assert "realpath /app/link.txt /app/config.json" in through
    assert "realpath /app/nope No such file or directory" in through
    assert "realpath /app/config.json/x Not a directory" in through
    assert "mmap 9437188" in through and "b'tail'" in through  # was SIGBUS
    assert "statvfs 4096 255" in through and through.rstrip().endswith("True")
    assert through == inside


def test_ls_of_a_symlink_to_a_directory_with_a_trailing_slash_lists_the_directory(
    mirrord: Mirrord, files_pod: LocalPod
) -> None:
    argv = ["sh", "-c", "ls /app/abslink/; stat -c %F /app/abslink /app/abslink/"]
    through, inside = run_both(mirrord, files_pod, argv)
    assert through == "deep\nsymbolic link\ndirectory\n"
    assert through == inside


def test_sed_in_place_and_mktemp_in_a_pod_directory(mirrord: Mirrord, files_pod: LocalPod) -> None:
    # sed -i and mktemp create their temporary file with glibc's mkstemp/mkdtemp, whose
    # open/mkdir no hook sees
    script = (
        "set -e; mkdir -p /app/w/sed; printf 'a=1\\nb=2\\n' > /app/w/sed/s.conf; "
        "sed -i s/1/X/ /app/w/sed/s.conf; cat /app/w/sed/s.conf; "
        "f=$(mktemp -p /app/w/sed); d=$(mktemp -d -p /app/w/sed); "
        "test -f $f && test -d $d && echo made; rm -r $f $d; ls /app/w/sed"
    )
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--", "sh", "-c", script
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a=X\nb=2\nmade\ns.conf\n"
    inside = files_pod.run_in_pod(["cat", "/app/w/sed/s.conf"]).stdout
    assert inside == b"a=X\nb=2\n"


PY_COPY = """
import os, shutil, sys
src = sys.argv[1]
open(src, "w").write("moved")
os.utime(src, (1577836800, 1577836800))
shutil.move(src, "/app/w/moved.txt")
print(os.path.exists(src), int(os.stat("/app/w/moved.txt").st_mtime))
"""


def test_times_owner_and_mode_reach_the_pod_in_write_mode(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # utimensat/futimens/fchown had no message (they acted on the local placeholder or
    # failed with ENOENT), and cp -p set the mode through an ACL xattr on the placeholder
    script = (
        "set -e; mkdir -p /app/w/t; touch -d 2020-01-02 /app/w/t/a; "
        "cp -p /app/config.json /app/w/t/c; chown 1000:1000 /app/w/t/c; "
        "stat -c '%n %a %u %y' /app/w/t/a /app/w/t/c | cut -c1-40"
    )
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--", "sh", "-c", script
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("/app/w/t/a 644 0 2020-01-02"), lines
    assert lines[1].startswith("/app/w/t/c 644 1000 "), lines
    inside = files_pod.run_in_pod(
        ["sh", "-c", "stat -c '%n %a %u %y' /app/w/t/a /app/w/t/c | cut -c1-40"]
    )
    assert inside.stdout.decode() == result.stdout
    # shutil.move from this machine into the pod: rename gives EXDEV, then copy2 + utime
    app = tmp_path / "copy.py"
    app.write_text(PY_COPY)
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--",
        sys.executable, str(app), str(tmp_path / "src.txt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False 1577836800\n"
    assert files_pod.run_in_pod(["cat", "/app/w/moved.txt"]).stdout == b"moved"


def test_tar_of_a_pod_directory_and_extracting_it_into_another(
    mirrord: Mirrord, files_pod: LocalPod
) -> None:
    # tar fstat()s a directory's fd after fdopendir() on it: the agent's DirOpen took the
    # file handle away ("Cannot stat: Bad file descriptor", exit 2)
    script = (
        "set -e; tar cf /app/w/sub.tar -C /app sub; mkdir -p /app/w/x; "
        "tar xf /app/w/sub.tar -C /app/w/x; find /app/w/x | sort; cat /app/w/x/sub/deep/c.txt"
    )
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--", "sh", "-c", script
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "/app/w/x\n/app/w/x/sub\n/app/w/x/sub/deep\n/app/w/x/sub/deep/c.txt\ndeep file\n"
    )
    inside = files_pod.run_in_pod(["find", "/app/w/x"]).stdout.decode().split()
    assert sorted(inside) == result.stdout.splitlines()[:4]


def test_symlinks_and_hard_links_are_made_in_the_pod_in_write_mode(
    mirrord: Mirrord, files_pod: LocalPod
) -> None:
    # symlink/link were not hooked: `ln -s` into a pod directory failed with ENOENT
    script = (
        "set -e; mkdir -p /app/w/l; echo hi > /app/w/l/f; ln -s f /app/w/l/rel; "
        "ln -s /app/sub /app/w/l/abs; ln /app/w/l/f /app/w/l/hard; "
        "readlink /app/w/l/rel /app/w/l/abs; cat /app/w/l/rel; ls /app/w/l/abs/; "
        "stat -c %h /app/w/l/f; ln /app/w/l/f /tmp/never 2>&1 | grep -c cross-device"
    )
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--", "sh", "-c", script
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "f\n/app/sub\nhi\ndeep\n2\n1\n"
    inside = files_pod.run_in_pod(["readlink", "/app/w/l/rel", "/app/w/l/abs"]).stdout
    assert inside == b"f\n/app/sub\n"


PY_ERRNO = """
import errno, os, shutil, sys
B = sys.argv[1]
def t(name, f):
    try:
        r = f()
    except OSError as e:
        r = errno.errorcode.get(e.errno)
    print(name, r)
os.makedirs(B + "/d/sub"); open(B + "/f", "w").write("x")
t("open O_DIRECTORY on a file", lambda: os.open(B + "/f", os.O_RDONLY | os.O_DIRECTORY))
t("open O_EXCL existing", lambda: os.open(B + "/f", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
t("open a directory for writing", lambda: os.open(B + "/d", os.O_WRONLY))
t("create below a missing directory", lambda: os.open(B + "/no/x", os.O_CREAT | os.O_WRONLY))
t("a file as a directory", lambda: os.open(B + "/f/x", os.O_RDONLY))
t("mkdir existing", lambda: os.mkdir(B + "/d"))
t("rmdir non-empty", lambda: os.rmdir(B + "/d"))
t("rmdir a file", lambda: os.rmdir(B + "/f"))
t("rmdir dir/.", lambda: os.rmdir(B + "/d/."))
t("unlink a directory", lambda: os.unlink(B + "/d"))
t("unlink missing", lambda: os.unlink(B + "/zz"))
t("rename into itself", lambda: os.rename(B + "/d", B + "/d/sub/x"))
t("rename a directory over a file", lambda: os.rename(B + "/d", B + "/f"))
t("rename a file over a directory", lambda: os.rename(B + "/f", B + "/d"))
t("listdir a file", lambda: os.listdir(B + "/f"))
t("readlink a file", lambda: os.readlink(B + "/f"))
t("stat file/", lambda: os.stat(B + "/f/"))
t("utime missing", lambda: os.utime(B + "/zz"))
t("symlink over a file", lambda: os.symlink("x", B + "/f"))
t("hard link a directory", lambda: os.link(B + "/d", B + "/dl"))
t("read a directory fd", lambda: os.read(os.open(B + "/d", os.O_RDONLY), 10))
t("write a read-only fd", lambda: os.write(os.open(B + "/f", os.O_RDONLY), b"x"))
t("read a write-only fd", lambda: os.read(os.open(B + "/f", os.O_WRONLY), 1))
shutil.rmtree(B)
"""


def test_errors_of_file_calls_in_write_mode_are_the_pods(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    script = tmp_path / "errno.py"
    script.write_text(PY_ERRNO)
    through = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--",
        sys.executable, str(script), "/app/w/e1",
    )  # fmt: skip
    assert through.returncode == 0, through.stderr
    inside = files_pod.run_in_pod([sys.executable, str(script), "/app/w/e2"])
    assert through.stdout == inside.stdout.decode()
    assert "rmdir dir/. EINVAL" in through.stdout  # the agent said EBUSY


PY_FOLLOW = """
import os, sys, time
f = open("/app/w/grow.log")
print("first", repr(f.read()), flush=True)
sys.stdin.readline()  # the test appended a line in the pod
time.sleep(1.1)  # a fetched file is looked at again once its snapshot is a second old
print("then", repr(f.read()), os.fstat(f.fileno()).st_size, flush=True)
"""


def test_a_file_kept_open_sees_what_the_pod_appends(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # a read-only open fetched a snapshot: tail -f and log followers never saw new lines
    files_pod.run_in_pod(["sh", "-c", "echo one > /app/w/grow.log"])
    script = tmp_path / "follow.py"
    script.write_text(PY_FOLLOW)
    proc = mirrord.popen(
        "run", "-t", f"pid/{files_pod.pid}", "--", sys.executable, str(script),
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "first 'one\\n'\n"
    files_pod.run_in_pod(["sh", "-c", "echo two >> /app/w/grow.log"])
    out, err = proc.communicate("go\n", timeout=30)
    assert out == "then 'two\\n' 8\n", err
    assert proc.returncode == 0


def test_redirections_of_external_commands_to_and_from_pod_files(
    mirrord: Mirrord, files_pod: LocalPod
) -> None:
    # the shell opens the file and execs the command: the new image did not know that its
    # stdout was a remote file (the output was lost) or that its stdin was one bigger than
    # fetch_limit (it read nothing)
    script = (
        "set -e; mkdir -p /app/w/r; /bin/echo ext > /app/w/r/o; /bin/echo more >> /app/w/r/o; "
        "ls /app/w/nope > /app/w/r/e 2>&1 || true; cat /app/w/r/o /app/w/r/e; "
        "md5sum < /app/big.bin; (head -c 5 > /dev/null; wc -c) < /app/big.bin"
    )
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--", "sh", "-c", script
    )
    assert result.returncode == 0, result.stderr
    inside = files_pod.run_in_pod(["sh", "-c", script.replace("/app/w/r", "/app/w/r2")])
    assert result.stdout == inside.stdout.decode()
    assert result.stdout.startswith("ext\nmore\nls: cannot access '/app/w/nope'")
    assert result.stdout.endswith(f"{len(BIG) - 5}\n")
    assert files_pod.run_in_pod(["cat", "/app/w/r/o"]).stdout == b"ext\nmore\n"


C_STDIO = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <glob.h>
#include <stdio.h>
int main(int argc, char **argv) {
    FILE *f = fdopen(open("/app/big.bin", O_RDONLY), "r");
    long n = 0;
    while (fgetc(f) != EOF) n++;
    fclose(f);
    printf("fdopen read %ld\n", n);
    f = fdopen(open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644), "w");
    fprintf(f, "via fdopen\n");
    fclose(f);
    char line[64] = "";
    f = fopen(argv[1], "r");
    fgets(line, sizeof line, f);
    fclose(f);
    printf("read back %s", line);
    glob_t g;
    int rc = glob("/app/s*/*/*.txt", 0, NULL, &g);
    printf("glob %d %s\n", rc, rc == 0 ? g.gl_pathv[0] : "-");
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_c_stdio_over_fdopen_and_glob3_on_pod_paths(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # stdio on an fdopen()ed fd and glob(3) use libc's internal read/write/close/opendir: a
    # file over fetch_limit read as empty, the written file reached the pod only at exit,
    # and glob found nothing
    (tmp_path / "stdio.c").write_text(C_STDIO)
    program = tmp_path / "stdio"
    subprocess.run(["gcc", "-o", str(program), str(tmp_path / "stdio.c")], check=True)
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--",
        str(program), "/app/w/fdopen.txt",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"fdopen read {len(BIG)}\nread back via fdopen\nglob 0 /app/sub/deep/c.txt\n"
    )
    inside = files_pod.run_in_pod([str(program), "/app/w/fdopen2.txt"]).stdout.decode()
    assert inside == result.stdout


PY_LOGGERS = """
import logging, sys
logging.basicConfig(filename="/app/w/shared.log", format="%(message)s", level=logging.INFO)
for j in range(50):
    logging.info("proc %s line %d", sys.argv[1], j)
"""


def test_appends_from_several_processes_and_shell_builtins_all_land(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # O_WRONLY|O_APPEND opens were write-back caches of the whole file: concurrent appenders
    # overwrote each other's lines, a builtin's `>>` to a file over fetch_limit went to the
    # placeholder (stdio's internal write), and a subshell's last line was lost at its _exit
    files_pod.run_in_pod(["sh", "-c", "cp /app/big.bin /app/w/big.log; : > /app/w/shared.log"])
    script = tmp_path / "logger.py"
    script.write_text(PY_LOGGERS)
    shell = (
        f"for i in 1 2 3 4; do {sys.executable} {script} $i & done; wait; "
        "printf 'x%.0s' 1 2 3 >> /app/w/big.log; /bin/echo appended >> /app/w/big.log; "
        "(echo a; /bin/echo b; echo c) >> /app/w/sub.log; cat /app/w/sub.log; "
        "tail -c 12 /app/w/big.log; wc -l < /app/w/shared.log"
    )
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--", "sh", "-c", shell
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a\nb\nc\nxxxappended\n200\n"
    lines = files_pod.run_in_pod(["cat", "/app/w/shared.log"]).stdout.decode().splitlines()
    assert sorted(lines) == sorted(f"proc {i} line {j}" for i in range(1, 5) for j in range(50))
    size = files_pod.run_in_pod(["stat", "-c", "%s", "/app/w/big.log"]).stdout
    assert int(size) == len(BIG) + 12


PY_TIMES = """
import os, pathlib, sys
p = pathlib.Path(sys.argv[1])
p.parent.mkdir(parents=True, exist_ok=True)
p.touch()
os.utime(p, (1000000000, 1000000000))
print(int(p.stat().st_mtime))
fd = os.open(p, os.O_RDONLY)  # fetched: no handle; utime and fchmod through the fd
os.utime(fd, (2000000000, 2000000000))
os.fchmod(fd, 0o600)
st = os.fstat(fd)
print(int(st.st_mtime), oct(st.st_mode))
os.close(fd)
os.utime(p, ns=(5, 7))
st = p.stat()
print(st.st_atime_ns, st.st_mtime_ns)
"""


def test_python_times_and_mode_by_path_and_by_fd_match_the_pod(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # a fetched read-only fd refused fchmod (EPERM) and its fstat kept the times of its open
    script = tmp_path / "times.py"
    script.write_text(PY_TIMES)
    through = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--",
        sys.executable, str(script), "/app/w/times/t",
    )  # fmt: skip
    assert through.returncode == 0, through.stderr
    assert through.stdout == "1000000000\n2000000000 0o100600\n5 7\n"
    inside = files_pod.run_in_pod([sys.executable, str(script), "/app/w/times/t2"])
    assert inside.stdout.decode() == through.stdout


def test_fs_mapping_in_a_config_file_reads_the_mapped_pod_file(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # mirrord's feature.fs.mapping: code written for this machine's layout reads the target's
    # file at the mapped path
    cfg = tmp_path / "mirrord.json"
    cfg.write_text(
        '{"feature": {"fs": {"mapping": {"^/home/dev/(?<proj>[^/]+)/(.*)$": "/app/$2"}}}}'
    )
    result = mirrord.run(
        "run",
        "-t",
        f"pid/{files_pod.pid}",
        "-f",
        str(cfg),
        "--",
        "cat",
        "/home/dev/shop/config.json",
        "/home/dev/shop/sub/deep/c.txt",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"db": "postgres://pod", "n": 3}\ndeep file\n'


# Opens a pod-only file to read and one to write, and reports what the fds are.
HANDOVER_APP = """
import os
fd = os.open("/app/config.json", os.O_RDONLY)
memfd = os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
print(os.fstat(fd).st_ino, memfd, os.get_inheritable(fd), os.read(fd, 100).decode().strip())
w = os.open("/app/w/handed.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
os.write(w, b"one ")
os.write(w, b"two\\n")
print(os.fstat(w).st_size, oct(os.fstat(w).st_mode & 0o777), os.lseek(w, 0, os.SEEK_CUR))
os.close(w)
os.close(fd)
"""


@pytest.mark.parametrize("handover", [True, False])
def test_a_local_targets_files_are_handed_over_unless_switched_off(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path, handover: bool
) -> None:
    # hand-over: the fd the app gets is the pod's file itself (its inode, no memfd copy), so
    # reads and writes are the kernel's; feature.fs.handover false keeps the relayed path
    cfg = tmp_path / "mirrord.json"
    cfg.write_text(json.dumps({"feature": {"fs": {"mode": "write", "handover": handover}}}))
    script = tmp_path / "handover.py"
    script.write_text(HANDOVER_APP)
    result = mirrord.run(
        "run", "-t", f"pid/{files_pod.pid}", "-f", str(cfg), "--", sys.executable, str(script)
    )
    assert result.returncode == 0, result.stderr
    inode = files_pod.run_in_pod(["stat", "-c", "%i", "/app/config.json"]).stdout.decode()
    first, second = result.stdout.splitlines()
    ino, memfd, inheritable, content = first.split(" ", 3)
    assert content == '{"db": "postgres://pod", "n": 3}'
    assert inheritable == "False"  # os.open's O_CLOEXEC held on the handed fd too
    assert ino == inode.strip()  # what fstat says either way (the layer's view when relayed)
    assert memfd == str(not handover)  # relayed: a copy in a memfd
    assert second == "8 0o640 8"
    written = files_pod.run_in_pod(["cat", "/app/w/handed.txt"]).stdout
    assert written == b"one two\n"


SPLICED_APP = """
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
def h(b):
    return f"{len(b)}:{hashlib.sha256(b).hexdigest()}"
parts = []
while chunk := os.read(fd, 1 << 20):
    parts.append(chunk)
print(h(b"".join(parts)))
for offset, size in ((5, 3 << 20), (12345, 2 << 20), (4096, 1 << 20), (1 << 20, 70000)):
    print(h(os.pread(fd, size, offset)))
os.lseek(fd, 777, os.SEEK_SET)
print(h(os.read(fd, 1 << 20)), os.lseek(fd, 0, os.SEEK_CUR))
"""


def test_a_relayed_large_read_goes_through_pipes_and_leaves_none_behind(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # a local target with hand-over off: the relayed path; its large reads' bytes go from the
    # file through the agent's and the daemon's pipes to the layer, not through their memory
    # 9 MiB and a bit: past the layer's whole-file fetch (8 MiB), so read with FileRead
    content = bytes(range(256)) * (9 * 4096 + 17)
    (Path(f"/proc/{files_pod.pid}/root/app") / "spliced.bin").write_bytes(content)
    mirrord.env["MIRRORD_FILE_HANDOVER"] = "false"
    script = tmp_path / "spliced.py"
    script.write_text(SPLICED_APP)

    def expected(data: bytes) -> str:
        return f"{len(data)}:{hashlib.sha256(data).hexdigest()}"

    want = [
        expected(content),
        *(expected(content[o : o + n]) for o, n in ((5, 3 << 20), (12345, 2 << 20))),
        *(expected(content[o : o + n]) for o, n in ((4096, 1 << 20), (1 << 20, 70000))),
        f"{expected(content[777 : 777 + (1 << 20)])} {777 + (1 << 20)}",
    ]

    pipes, spliced = [], [0]
    for _ in range(4):
        result = mirrord.run(
            "run", "-t", f"pid/{files_pod.pid}", "--", sys.executable, str(script),
            "/app/spliced.bin",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == want
        status = mirrord.status()
        [agent] = [a for a in status["agents"] if a["link"]["spliced"]]
        pipes.append((open_pipes(status["daemon"]["pid"]), open_pipes(agent["pid"])))
        spliced.append(agent["link"]["spliced"])
    # each run: the 3 MiB read alone is three FileData of 1 MiB
    assert all(b - a >= 3 for a, b in itertools.pairwise(spliced)), spliced
    # pooled, not leaked: each run passes more than a dozen replies through pipes, and the
    # daemon and the agent keep at most 8 free pipes (16 fds) per pool from one run to the next
    assert all(b - a <= 16 for a, b in zip(pipes[0], pipes[-1], strict=True)), pipes


SPLICED_WRITE_APP = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
data = bytes(range(256)) * (9 * 4096) + b"tail"
for at in range(0, len(data), 4096):
    os.write(fd, data[at : at + 4096])
os.pwrite(fd, b"\\x01" * (2 << 20), 12345)  # a large write: straight through
os.close(fd)
"""


def test_a_relayed_large_write_goes_through_pipes_and_leaves_none_behind(
    mirrord: Mirrord, files_pod: LocalPod, tmp_path: Path
) -> None:
    # the layer's write-behind sends its 1 MiB FileWrites; their bytes go from the layer's
    # socket through the daemon's pipes to the agent's socket, and from it through the
    # agent's pipes into the file, copied by the kernel only into the page cache
    target = Path(f"/proc/{files_pod.pid}/root/app") / "spliced-w.bin"
    target.write_bytes(bytes(10 << 20))  # past the whole-file fetch: written through
    mirrord.env["MIRRORD_FILE_HANDOVER"] = "false"
    script = tmp_path / "spliced_w.py"
    script.write_text(SPLICED_WRITE_APP)
    want = bytearray(bytes(range(256)) * (9 * 4096) + b"tail")
    want[12345 : 12345 + (2 << 20)] = b"\x01" * (2 << 20)
    want += bytes((10 << 20) - len(want))

    pipes, spliced = [], [0]
    for _ in range(3):
        result = mirrord.run(
            "run", "-t", f"pid/{files_pod.pid}", "--fs-mode", "write", "--", sys.executable,
            str(script), "/app/spliced-w.bin",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert target.read_bytes() == want
        target.write_bytes(bytes(10 << 20))
        status = mirrord.status()
        [agent] = [a for a in status["agents"] if a["link"]["spliced_writes"]]
        pipes.append((open_pipes(status["daemon"]["pid"]), open_pipes(agent["pid"])))
        spliced.append(agent["link"]["spliced_writes"])
    # each run: 9 MiB in FileWrites of 1 MiB less a page, then the 2 MiB write in two
    assert all(b - a >= 10 for a, b in itertools.pairwise(spliced)), spliced
    assert all(b - a <= 16 for a, b in zip(pipes[0], pipes[-1], strict=True)), pipes
