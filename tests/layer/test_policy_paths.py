"""The file policy's default sets on the bypass path: a system directory is decided in a few
comparisons (path_fast_local) only where that cannot contradict the full policy: $HOME's
credentials inside a system directory, /etc's remote defaults, regex lists and "/" itself.
Each case is a real open, read and stat in a C program under the layer, with the daemon's
requests checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import Runner

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cbuild") / "paths"
    subprocess.run(
        ["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(HERE / "c" / "paths.c")],
        check=True,
        timeout=60,
    )
    return out


def _probe(
    run: Runner, probe: Path, paths: list[str], settings: LayerSettings, home: Path
) -> dict[str, tuple[int, int, str]]:
    """path -> (open errno, stat errno, first line read)."""
    proc = run([str(probe), *paths], settings=settings, extra_env={"HOME": str(home)})
    res = {}
    for line in proc.stdout.decode().splitlines():
        path, open_err, stat_err, text = line.split("\t")
        res[path] = (int(open_err), int(stat_err), text)
    assert set(res) == set(paths), proc.stdout
    return res


def _requested_paths(daemon: LayerDaemon) -> set[str]:
    paths = (getattr(msg, "path", None) for msg in daemon.requests())
    return {p.decode() for p in paths if isinstance(p, bytes)}


def test_system_directories_and_their_exceptions(
    run: Runner, daemon: LayerDaemon, probe: Path, tmp_path: Path
) -> None:
    # $HOME inside /tmp, a system directory: its credentials stay "not found" and the rest
    # of it local, while every other /tmp path is decided by the fast path
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("local secret\n")
    (home / "notes.txt").write_text("local notes\n")
    other = tmp_path / "other.txt"
    other.write_text("local other\n")
    cred, notes = str(home / ".aws" / "credentials"), str(home / "notes.txt")
    paths = [cred, notes, str(other), "/etc/hosts", "/etc/passwd", "/", "/tmpfoo/x"]
    res = _probe(run, probe, paths, LayerSettings(timeout_ms=5000), home)
    assert res[cred] == (2, 2, ""), res[cred]  # ENOENT, although the file is there
    assert res[notes] == (0, 0, "local notes")
    assert res[str(other)] == (0, 0, "local other")
    assert res["/etc/hosts"] == (0, 0, "192.0.2.9 db.target")  # remote although under /etc
    assert res["/etc/passwd"][2].startswith("root:")
    assert res["/"][1] == 0
    assert res["/tmpfoo/x"] == (2, 2, "")  # not /tmp: asked of the target, which lacks it
    assert _requested_paths(daemon) == {"/etc/hosts", "/tmpfoo/x"}


def test_a_regex_list_is_consulted_before_the_system_directories(
    run: Runner, daemon: LayerDaemon, probe: Path, tmp_path: Path
) -> None:
    shadowed = tmp_path / "shadowed.txt"
    shadowed.write_text("the local copy\n")
    daemon.add_file(str(shadowed), b"the target's copy\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("local plain\n")
    settings = LayerSettings(timeout_ms=5000, read_only=(r"shadowed\.txt$",))
    res = _probe(run, probe, [str(shadowed), str(plain)], settings, tmp_path)
    assert res[str(shadowed)] == (0, 0, "the target's copy")
    assert res[str(plain)] == (0, 0, "local plain")
    assert _requested_paths(daemon) == {str(shadowed)}


def test_file_patterns_match_case_insensitively_as_mirrord_does(
    run: Runner, daemon: LayerDaemon, probe: Path, tmp_path: Path
) -> None:
    daemon.add_file("/app/Config/Settings.JSON", b"from the target\n")
    daemon.add_file("/app/other.txt", b"target other\n")
    settings = LayerSettings(timeout_ms=5000, not_found=(r"(?i)^/APP/other\.TXT$",), fs_mode="read")
    res = _probe(run, probe, ["/app/Config/Settings.JSON", "/app/other.txt"], settings, tmp_path)
    assert res["/app/Config/Settings.JSON"] == (0, 0, "from the target")
    assert res["/app/other.txt"] == (2, 2, "")  # not_found matched despite the case
    assert _requested_paths(daemon) == {"/app/Config/Settings.JSON"}


def test_fs_mapping_rewrites_a_path_before_the_policy(
    run: Runner, daemon: LayerDaemon, probe: Path, tmp_path: Path
) -> None:
    # mirrord's feature.fs.mapping: the app asks for a path of this machine's layout, the
    # target's file at the mapped path answers
    daemon.add_file("/app/config/settings.yaml", b"mapped: yes\n")
    daemon.add_file("/srv/prod/db.conf", b"host=db\n")
    local = tmp_path / "local.txt"
    local.write_text("stays local\n")
    settings = LayerSettings(
        timeout_ms=5000,
        fs_mapping=(
            (r"^/home/dev/project/(.*)$", "/app/$1"),
            (r"^/etc/myapp/(?<env>[a-z]+)/(?P<file>.*)$", "/srv/${env}/${file}"),
        ),
    )
    paths = [
        "/home/dev/project/config/settings.yaml",
        "/etc/myapp/prod/db.conf",
        str(local),
    ]
    res = _probe(run, probe, paths, settings, tmp_path)
    assert res["/home/dev/project/config/settings.yaml"] == (0, 0, "mapped: yes")
    assert res["/etc/myapp/prod/db.conf"] == (0, 0, "host=db")
    assert res[str(local)] == (0, 0, "stays local")
    assert _requested_paths(daemon) == {"/app/config/settings.yaml", "/srv/prod/db.conf"}


MAPPED_LOCAL_CALLS = """
import os, sys
alias = sys.argv[1]
with open(alias + "/note.txt", "w") as f:  # created under the mapped name
    f.write("written through the alias\\n")
print("read", open(alias + "/note.txt").read().strip())
print("stat", os.stat(alias + "/note.txt").st_size, os.access(alias + "/note.txt", os.R_OK))
os.rename(alias + "/note.txt", alias + "/renamed.txt")
os.mkdir(alias + "/sub")
os.rmdir(alias + "/sub")
fd = os.open(alias + "/renamed.txt", os.O_RDONLY)
print("os.open", os.read(fd, 100).decode().strip())
os.close(fd)
os.unlink(alias + "/renamed.txt")
print("done")
"""


def test_fs_mapping_applies_to_a_path_that_stays_local(
    run: Runner, daemon: LayerDaemon, tmp_path: Path
) -> None:
    """A mapped path the policy keeps local is opened, stat'ed, renamed, made and unlinked
    under its mapped name (mirrord's behaviour), not under the name the app used."""
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"  # does not exist: every call must go to `real`
    settings = LayerSettings(
        timeout_ms=5000,
        local=(rf"^{tmp_path}/",),
        fs_mapping=((rf"^{alias}/(.*)$", f"{real}/$1"),),
    )
    proc = run([sys.executable, "-c", MAPPED_LOCAL_CALLS, str(alias)], settings=settings)
    lines = proc.stdout.decode().splitlines()
    assert lines == [
        "read written through the alias",
        "stat 26 True",
        "os.open written through the alias",
        "done",
    ], proc.stderr
    assert not alias.exists()
    assert list(real.iterdir()) == []  # renamed, then unlinked: all under `real`
    asked = {p for p in _requested_paths(daemon) if p.startswith(str(tmp_path))}
    assert asked == set()  # local: the daemon was never asked about them


MAPPED_LOCAL_PATH_CALLS = """
import ctypes, errno, os, sys
alias = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def p(name):
    return alias + "/" + name
with open(p("file"), "w") as f:
    f.write("0123456789\\n")
os.truncate(p("file"), 4)
os.chmod(p("file"), 0o640)
os.chown(p("file"), -1, -1)
os.utime(p("file"), (1000000000, 1000000000))
st = os.stat(p("file"))
print("attrs", st.st_size, oct(st.st_mode & 0o777), int(st.st_mtime))
os.symlink("file", p("link"))
print("readlink", os.readlink(p("link")))
os.link(p("file"), p("hard"))
print("listdir", sorted(os.listdir(p("."))))
os.symlink("nowhere", p("dangling"))
print("access nofollow", os.access(p("dangling"), os.F_OK, follow_symlinks=False))
print("access effective", os.access(p("file"), os.R_OK, effective_ids=True))
print("euidaccess", libc.euidaccess(p("file").encode(), os.R_OK))
libc.realpath.restype = ctypes.c_char_p
print("realpath", libc.realpath(p("link").encode(), None).decode().replace(sys.argv[2], "REAL"))
RENAME_NOREPLACE = 1
rc = libc.renameat2(-100, p("hard").encode(), -100, p("file").encode(), RENAME_NOREPLACE)
print("renameat2 noreplace", rc, errno.errorcode.get(ctypes.get_errno()))
libc.fopen.restype = libc.freopen.restype = ctypes.c_void_p
libc.freopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
libc.fgets.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
fp = libc.freopen(p("file").encode(), b"r", libc.fopen(b"/dev/null", b"r"))
buf = ctypes.create_string_buffer(16)
print("freopen", libc.fgets(buf, 16, ctypes.c_void_p(fp)) is not None and buf.value.decode())
print("statvfs", os.statvfs(p("file")).f_bsize > 0)
tmpl = ctypes.create_string_buffer(p("tmpXXXXXX").encode())
fd = libc.mkstemp(tmpl)
print("mkstemp", fd >= 0 and tmpl.value.decode().startswith(p("tmp")), os.path.exists(tmpl.value))
os.close(fd)
os.unlink(tmpl.value)
libc.mkdtemp.restype = ctypes.c_char_p
dtmpl = ctypes.create_string_buffer(p("dirXXXXXX").encode())
made = libc.mkdtemp(dtmpl)
print("mkdtemp", made is not None and made.decode().startswith(p("dir")), os.path.isdir(made))
os.rmdir(made)
try:
    os.listxattr(p("file"))
    print("xattr listed")
except OSError as e:
    print("xattr listed" if e.errno == errno.ENOTSUP else "xattr " + str(e))
os.mkdir(p("sub"))
os.chdir(p("sub"))
print("cwd", os.getcwd().replace(sys.argv[2], "REAL"))
os.chdir("/")
os.rmdir(p("sub"))
for name in ("file", "link", "hard", "dangling"):
    os.unlink(p(name))
print("done")
"""


def test_fs_mapping_applies_to_every_local_path_call(
    run: Runner, daemon: LayerDaemon, tmp_path: Path
) -> None:
    """Beyond open/stat/rename: truncate, chmod, chown, utimes, symlink, readlink, link,
    opendir, faccessat (its flags kept), euidaccess, realpath, renameat2's RENAME_NOREPLACE,
    freopen, statvfs, mkstemp/mkdtemp templates, xattrs and chdir on a mapped path that stays
    local all act on the mapped name."""
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"  # does not exist: every call must go to `real`
    settings = LayerSettings(
        timeout_ms=5000,
        local=(rf"^{tmp_path}/",),
        fs_mapping=((rf"^{alias}/(.*)$", f"{real}/$1"),),
    )
    proc = run(
        [sys.executable, "-c", MAPPED_LOCAL_PATH_CALLS, str(alias), str(real)], settings=settings
    )
    assert proc.stdout.decode().splitlines() == [
        "attrs 4 0o640 1000000000",
        "readlink file",
        "listdir ['file', 'hard', 'link']",
        "access nofollow True",  # the dangling link itself: AT_SYMLINK_NOFOLLOW kept
        "access effective True",
        "euidaccess 0",
        "realpath REAL/file",
        "renameat2 noreplace -1 EEXIST",  # not replaced
        "freopen 0123",
        "statvfs True",
        "mkstemp True True",  # the app's own template, filled: it names the mapped file
        "mkdtemp True True",
        "xattr listed",
        "cwd REAL/sub",
        "done",
    ], proc.stderr
    assert not alias.exists()
    assert list(real.iterdir()) == []
    asked = {p for p in _requested_paths(daemon) if p.startswith(str(tmp_path))}
    assert asked == set()  # local: the daemon was never asked about them
