"""Every file hook from a C program: the same checks pass on a remote directory (each
call reaching the daemon and its agent) and on a local one (no message sent)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import TEST_FILE, Runner, build_c

HERE = Path(__file__).resolve().parent
WRITE = LayerSettings(fs_mode="write", timeout_ms=5000)


@pytest.fixture(scope="module")
def hooks_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cbuild") / "hooks"
    subprocess.run(
        ["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(HERE / "c" / "hooks.c"), "-ldl"],
        check=True,
        timeout=60,
    )
    return out


def _failures(stdout: bytes) -> list[str]:
    return [line for line in stdout.decode().splitlines() if "FAIL" in line or "errno" in line]


@pytest.mark.parametrize("fetch_limit", [0, 1 << 20], ids=["handles", "memfd"])
def test_file_hooks_go_remote(
    run: Runner, daemon: LayerDaemon, hooks_program: Path, fetch_limit: int
) -> None:
    """With fetch_limit 0 every file is handle-backed (each read/write/seek is a request);
    otherwise files are fetched into memfds (read natively, written back on close)."""
    daemon.add_file("/srv/t/test.txt", TEST_FILE)
    daemon.add_symlink("/srv/t/link", "/srv/t/test.txt")
    # the relayed path (a local target's agent would hand the files over: test_handover)
    settings = LayerSettings(
        fs_mode="write", timeout_ms=5000, fetch_limit=fetch_limit, fs_handover=False
    )
    extra = {"EXPECT_REMOTE": "1"}
    if fetch_limit == 0:
        extra["EXPECT_FREOPEN_ENOTSUP"] = "1"
    out = run(
        [str(hooks_program), "/srv/t", "db.svc.cluster.local"],
        settings=settings,
        check=False,
        extra_env=extra,
    )
    assert _failures(out.stdout) == [], out.stdout.decode()
    assert out.returncode == 0
    assert b"address 192.0.2.77" in out.stdout
    assert b"hostname target-pod" in out.stdout
    kinds = set(daemon.kinds())
    expected = {
        "FileOpen",  # truncate() and chmod() open without fetching
        "FileFetch",  # every other open: open + stat (+ a small file's content) at once
        "FileWrite",
        "FileClose",
        "FileStat",
        "StatFs",
        "FileAccess",
        "ReadLink",
        "DirOpen",
        "DirRead",
        "DirClose",
        "Mkdir",
        "Rmdir",
        "Unlink",
        "Rename",
        "Ftruncate",
        "Fchmod",
        "Fsync",
        "DnsLookup",
        "HostnameRequest",
    }
    if fetch_limit == 0:
        # nothing is fetched whole: read via the handle (the offset is the layer's own while it
        # reads ahead or writes behind, so lseek needs no FileSeek)
        expected |= {"FileRead"}
    assert expected <= kinds, expected - kinds
    # what the program wrote is on the target
    assert daemon.files["/srv/t/w.txt"] == b"written\n"
    assert "/srv/t/e.txt" not in daemon.files


def test_file_hooks_bypassed_locally(run: Runner, daemon: LayerDaemon, hooks_program: Path) -> None:
    local = run.cwd / "t"
    local.mkdir()
    (local / "test.txt").write_bytes(TEST_FILE)
    (local / "link").symlink_to(local / "test.txt")
    out = run([str(hooks_program), str(local), "localhost"], settings=WRITE, check=False)
    assert _failures(out.stdout) == [], out.stdout.decode()
    assert out.returncode == 0
    assert (local / "w.txt").read_bytes() == b"written\n"
    # localhost resolves locally, and gethostname asks the target (hostname is on): that is
    # the only request
    assert daemon.kinds() == ["HostnameRequest"]


def test_gethostname_stays_local_when_hostname_is_off(run: Runner, daemon: LayerDaemon) -> None:
    import socket

    out = run.py(
        "import socket; print(socket.gethostname())", settings=LayerSettings(hostname=False)
    )
    assert out.stdout.decode().strip() == socket.gethostname()
    assert daemon.requests() == []


@pytest.fixture(scope="module")
def fortified_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(tmp_path_factory, "fortified", "-O2", "-D_FORTIFY_SOURCE=2")


def test_a_fortified_program_reads_the_target(
    run: Runner, daemon: LayerDaemon, fortified_program: Path
) -> None:
    """glibc's __*_chk functions call its internal read/readlink/getcwd/gethostname, which no
    hook sees: a fortified program read the empty placeholder of a handle-backed file, the
    local symlink, cwd and hostname, and saw a relayed datagram come from its relay."""
    symbols = subprocess.run(
        ["nm", "-D", str(fortified_program)], capture_output=True, text=True, check=True
    ).stdout
    for name in ("__read_chk", "__pread_chk", "__readlink_chk", "__getcwd_chk"):
        assert name in symbols  # the compiler really called the fortified variants
    assert "__gethostname_chk" in symbols and "__recvfrom_chk" in symbols
    content = b"0123456789ABCD" + b"z" * 20000
    daemon.add_file("/srv/f/big.bin", content)
    daemon.add_symlink("/srv/f/link", "/srv/f/elsewhere")
    settings = LayerSettings(fs_mode="read", timeout_ms=5000, fetch_limit=1000, fs_handover=False)
    out = run(
        [str(fortified_program), "/srv/f/big.bin", "/srv/f/link", "/srv/f"], settings=settings
    )
    assert out.stdout.decode().splitlines() == [
        f"read {len(content)}, pread 4096: ABCD",
        "readlink /srv/f/elsewhere",
        "getcwd /srv/f",
        "hostname target-pod",
        "udp udp:ping from 192.0.2.55:53",
    ]


_TREE = {
    "w/a.txt": b"aaaaa",
    "w/sub/b.txt": b"bbbbb",
    "w/sub/deeper/c.txt": b"ccccc",
    "w/skip/hidden.txt": b"hhhhh",
}
_LINKS = {"w/link": "a.txt", "w/dangling": "nowhere"}


@pytest.fixture(scope="module")
def walk_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(tmp_path_factory, "walk")


def test_nftw_and_ftw_walk_a_pod_directory_as_a_local_one(
    run: Runner, daemon: LayerDaemon, walk_program: Path, tmp_path: Path
) -> None:
    """glibc's nftw/ftw read directories with its internal calls: from a directory only the
    pod has, nftw failed. The same program through the layer on the pod's tree and directly on
    a local copy: the same callbacks (flags, levels, bases, sizes; FTW_PHYS, FTW_DEPTH,
    FTW_CHDIR, FTW_ACTIONRETVAL, a dangling symlink)."""
    for path, content in _TREE.items():
        daemon.add_file(f"/srv/t/{path}", content)
    for path, target in _LINKS.items():
        daemon.add_symlink(f"/srv/t/{path}", target)
    local = tmp_path / "t"
    for path, content in _TREE.items():
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(content)
    for path, target in _LINKS.items():
        (local / path).symlink_to(target)
    through = run([str(walk_program), "/srv/t", "w"], settings=WRITE).stdout.decode()
    direct = subprocess.run(
        [str(walk_program), str(local), "w"], capture_output=True, check=True, timeout=60
    ).stdout.decode()
    # readdir's order is the file system's: compare as sets, and the depth-first order apart
    missing = sorted(set(direct.splitlines()) - set(through.splitlines()))
    extra = sorted(set(through.splitlines()) - set(direct.splitlines()))
    assert (missing, extra) == ([], []), f"missing {missing} extra {extra}"
    assert sorted(through.splitlines()) == sorted(direct.splitlines())
    lines = through.splitlines()
    assert "plain 0 1 2 w/a.txt 5" in lines and "plain 6 1 2 w/dangling" in lines  # FTW_SLN
    assert "phys 4 1 2 w/link" in lines and "ftw 3 w/dangling" in lines  # FTW_SL, FTW_NS
    assert "depth rc 0, back in the start" in lines and "chdir 0 2 6 w/sub/b.txt 5 found" in lines
    assert not [x for x in lines if x.startswith("action") and "hidden" in x]  # skipped subtree
    assert "action 1 1 2 w/skip" in lines and "action rc 0, back in the start" in lines
    assert [x for x in lines if x.startswith("stop")] == [
        "stop 1 0 0 w",
        "stop rc 1, back in the start",
    ]
    assert "missing rc -1" in lines
    depth = [x.split()[-1] for x in lines if x.startswith("depth 5 ")]  # FTW_DP, in order
    seen = [x.split()[4] for x in lines if x.startswith("depth ") and " rc " not in x]
    for directory in depth:
        inside = [i for i, p in enumerate(seen) if p.startswith(directory + "/")]
        assert all(i < seen.index(directory) for i in inside)  # after everything in it
