"""Everyday programs under the layer: bash builtins and redirections, coreutils, Python's
io/os/subprocess; each with its remote case and a local bypass."""

from __future__ import annotations

from mirrord.layer import LayerSettings
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import TEST_FILE, Runner

WRITE = LayerSettings(fs_mode="write", timeout_ms=5000)


def test_bash_builtins_and_redirections_read_remote_files(run: Runner, daemon: LayerDaemon) -> None:
    script = """
x=$(</app/test.txt); echo "[$x]"
while read -r line; do echo "line: $line"; done < /app/config/settings.yaml
[[ -e /app/missing ]] || echo missing
[[ -d /app/config ]] && echo dir
[[ -L /app/link ]] && echo link
"""
    out = run(["bash", "-c", script])
    assert out.stdout.decode().splitlines() == [
        "[hello from the target]",
        "line: debug: true",
        "missing",
        "dir",
        "link",
    ]


def test_bash_redirection_writes_remotely_in_write_mode(run: Runner, daemon: LayerDaemon) -> None:
    run(["bash", "-c", "echo one > /app/out.txt; echo two >> /app/out.txt"], settings=WRITE)
    assert daemon.files["/app/out.txt"] == b"one\ntwo\n"


def test_bash_writes_stay_local_in_read_mode(run: Runner, daemon: LayerDaemon) -> None:
    # bash asks for the hostname at start: with hostname on, that would be the only request
    run(
        ["bash", "-c", "echo local > out.txt; cat out.txt > copy.txt"],
        settings=LayerSettings(hostname=False),
    )
    assert (run.cwd / "copy.txt").read_text() == "local\n"
    assert daemon.requests() == []


def test_coreutils_stat_ls_l_and_head(run: Runner, daemon: LayerDaemon) -> None:
    out = run(["stat", "-c", "%s %F %a", "/app/test.txt", "/app/config"])
    size = daemon.host_path("/app/config").stat().st_size  # the pod's directory's, not ours
    assert out.stdout == b"22 regular file 644\n%d directory 755\n" % size
    out = run(["ls", "-l", "/app/config"])
    assert b"settings.yaml" in out.stdout and b"12" in out.stdout
    assert run(["head", "-c", "5", "/app/test.txt"]).stdout == b"hello"
    assert run(["wc", "-c", "/app/test.txt"]).stdout == b"22 /app/test.txt\n"
    # sort checks its inputs with euidaccess (a stat inside libc)
    assert run(["sort", "/app/config/settings.yaml", "/app/test.txt"]).stdout == (
        b"debug: true\nhello from the target\n"
    )


def test_coreutils_cp_from_remote_to_local(run: Runner) -> None:
    run(["cp", "/app/test.txt", "copy.txt"])
    assert (run.cwd / "copy.txt").read_bytes() == TEST_FILE


def test_python_io_os_and_pathlib(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import io, os, pathlib
p = pathlib.Path('/app/test.txt')
print(p.exists(), p.is_file(), p.stat().st_size, p.read_bytes() == b'hello from the target\\n')
print(sorted(os.listdir('/app')), sorted(e.name for e in os.scandir('/app/config')))
print(os.path.isdir('/app/config'), os.path.exists('/app/nope'), os.readlink('/app/link'))
with io.open('/app/test.txt', 'rb', buffering=0) as f:
    print(f.read(5), f.seek(0, 2), f.tell())
fd = os.open('/app/test.txt', os.O_RDONLY)
print(os.fstat(fd).st_size, os.pread(fd, 4, 6))
os.close(fd)
print(sorted(d for d, _, _ in os.walk('/app')))
"""
    out = run.py(code).stdout.decode().splitlines()
    assert out == [
        "True True 22 True",
        "['config', 'empty', 'link', 'test.txt'] ['settings.yaml']",
        "True False /app/test.txt",
        "b'hello' 22 22",
        "22 b'from'",
        "['/app', '/app/config', '/app/empty']",
    ]


def test_python_writes_remote_files_in_write_mode(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import os
with open('/app/new.txt', 'w') as f:
    f.write('first\\n')
with open('/app/new.txt', 'a') as f:
    f.write('second\\n')
os.makedirs('/app/made/deeper', exist_ok=True)
os.rename('/app/new.txt', '/app/made/renamed.txt')
print(open('/app/made/renamed.txt').read(), end='')
os.remove('/app/made/renamed.txt')
print(os.path.exists('/app/made/renamed.txt'))
"""
    assert run.py(code, settings=WRITE).stdout == b"first\nsecond\nFalse\n"
    assert {"/app/made", "/app/made/deeper"} <= daemon.dirs


def test_user_regex_lists(run: Runner, daemon: LayerDaemon) -> None:
    (run.cwd / "here.txt").write_text("mine")
    settings = LayerSettings(
        fs_mode="localwithoverrides",
        read_only=(r"^/app/config/.*\.yaml$",),
        not_found=(r"^/app/secret",),
        read_write=(r"^/srv/rw/",),
    )
    daemon.add_file("/srv/rw/data", b"")
    code = """
import os
print(open('/app/config/settings.yaml').read(), end='')
print(os.path.exists('/app/test.txt'), os.path.exists('/app/secret.key'))
open('/srv/rw/data', 'w').write('rw')
print(open('here.txt').read())
"""
    assert run.py(code, settings=settings).stdout == b"debug: true\nFalse False\nmine\n"
    assert daemon.files["/srv/rw/data"] == b"rw"
    # /app/test.txt is not in any list: local (and absent here) in localwithoverrides
    assert all(getattr(m, "path", b"") != b"/app/test.txt" for m in daemon.requests())


def test_fs_mode_local_sends_nothing(run: Runner, daemon: LayerDaemon) -> None:
    out = run(
        ["bash", "-c", "cat /app/test.txt 2>/dev/null || echo absent"],
        settings=LayerSettings(fs_mode="local", hostname=False),
    )
    assert out.stdout == b"absent\n"
    assert daemon.requests() == []


def test_threads_use_their_own_connections(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import threading
results = []
def work():
    for _ in range(20):
        results.append(open('/app/test.txt').read())
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(results), set(results) == {'hello from the target\\n'})
"""
    assert run.py(code).stdout == b"160 True\n"
    assert len(daemon.processes) == 1
    assert (
        len(daemon.hellos) >= 2
    )  # threads that found the process connection busy opened their own


def test_listing_a_large_remote_directory_in_batches(run: Runner, daemon: LayerDaemon) -> None:
    for i in range(600):
        daemon.add_file(f"/app/many/f{i:04d}", b"")
    out = run.py(
        "import os; names = os.listdir('/app/many'); print(len(names), min(names), max(names))"
    )
    assert out.stdout == b"600 f0000 f0599\n"
    assert run(["ls", "/app/many"]).stdout.count(b"\n") == 600
    reads = [m for m in daemon.requests() if type(m).__name__ == "DirRead"]
    assert len(reads) >= 6  # 602 entries with . and .., 256 a batch, twice


def test_files_over_the_fetch_limit_are_read_through_the_handle(
    run: Runner, daemon: LayerDaemon
) -> None:
    content = bytes(range(256)) * 20  # 5120 bytes
    daemon.add_file("/app/big.bin", content)
    code = """
import hashlib
data = open('/app/big.bin', 'rb').read()
with open('/app/big.bin', 'rb') as f:
    f.seek(4000)
    tail = f.read()
print(len(data), hashlib.sha256(data).hexdigest(), len(tail))
"""
    out = (
        run.py(code, settings=LayerSettings(fetch_limit=1000, fs_handover=False))
        .stdout.decode()
        .split()
    )
    import hashlib

    assert out == ["5120", hashlib.sha256(content).hexdigest(), "1120"]
    assert "FileRead" in daemon.kinds()
    settings = LayerSettings(fetch_limit=1000, fs_handover=False)
    assert run(["cat", "/app/big.bin"], settings=settings).stdout == content


def test_python_stdlib_tools_on_remote_trees(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import errno, glob, mmap, os, shutil
print(sorted(glob.glob('/app/**/*.yaml', recursive=True)))
shutil.copytree('/app', 'copy')  # copy2 asks for xattrs: "not supported" on remote paths
print(sorted(os.listdir('copy')))
print(open('copy/link').read(), end='')
try:
    os.listxattr('/app/test.txt')
except OSError as e:
    print(errno.errorcode[e.errno])
with open('/app/test.txt', 'rb') as f:
    print(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)[:5])
"""
    out = run.py(code).stdout.decode().splitlines()
    assert out == [
        "['/app/config/settings.yaml']",
        "['config', 'empty', 'link', 'test.txt']",
        "hello from the target",
        "ENOTSUP",
        "b'hello'",
    ]


def test_sqlite_and_mv_on_remote_files_in_write_mode(run: Runner, daemon: LayerDaemon) -> None:
    code = """
import sqlite3
c = sqlite3.connect('/app/db.sqlite')
c.execute('create table t(x)')
c.execute('insert into t values (42)')
c.commit()
c.close()
print(sqlite3.connect('/app/db.sqlite').execute('select x from t').fetchall())
"""
    assert run.py(code, settings=WRITE).stdout == b"[(42,)]\n"
    assert daemon.files["/app/db.sqlite"].startswith(b"SQLite format 3\0")
    # coreutils mv renames with renameat2(RENAME_NOREPLACE)
    run(["mv", "/app/db.sqlite", "/app/moved.sqlite"], settings=WRITE)
    assert "/app/moved.sqlite" in daemon.files and "/app/db.sqlite" not in daemon.files
    out = run(["mv", "-n", "/app/test.txt", "/app/moved.sqlite"], settings=WRITE, check=False)
    assert "/app/test.txt" in daemon.files  # -n: the existing target is kept
    assert out.returncode in (0, 1)


def test_a_remote_working_directory(run: Runner, daemon: LayerDaemon) -> None:
    """chdir into a remote directory: relative paths are then remote, getcwd reports it, and
    children (exec, subprocess cwd=) start there."""
    out = run(
        ["bash", "-c", "cd /app && pwd && cat test.txt && ls && cd config && cat settings.yaml"]
    )
    assert out.stdout.decode().splitlines() == [
        "/app",
        "hello from the target",
        "config",
        "empty",
        "link",
        "test.txt",
        "debug: true",
    ]
    code = """
import os, subprocess
os.chdir('/app/config')
print(os.getcwd(), sorted(os.listdir('.')), open('../test.txt').read(), end='')
print(subprocess.run(['cat', 'settings.yaml'], capture_output=True).stdout.decode(), end='')
os.chdir(os.environ['HOME'])
print(os.getcwd() == os.environ['HOME'])
print(subprocess.run(['cat', 'test.txt'], cwd='/app', capture_output=True).stdout.decode(), end='')
"""
    assert run.py(code).stdout.decode().splitlines() == [
        "/app/config ['settings.yaml'] hello from the target",
        "debug: true",
        "True",
        "hello from the target",
    ]


def test_mkdir_p_walks_a_remote_tree_in_write_mode(run: Runner, daemon: LayerDaemon) -> None:
    run(["mkdir", "-p", "/app/x/y/z"], settings=WRITE)
    assert {"/app/x", "/app/x/y", "/app/x/y/z"} <= daemon.dirs


def test_chdir_to_a_local_directory_sends_nothing(run: Runner, daemon: LayerDaemon) -> None:
    (run.cwd / "sub").mkdir()
    (run.cwd / "sub" / "f").write_text("local")
    code = "import os; os.chdir('sub'); print(os.getcwd().endswith('/sub'), open('f').read())"
    assert run.py(code).stdout == b"True local\n"
    assert daemon.requests() == []
