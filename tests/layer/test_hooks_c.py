"""Every file hook from a C program: the same checks pass on a remote directory (each
call reaching the daemon and its agent) and on a local one (no message sent)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings
from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import TEST_FILE, Runner

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
    out = tmp_path_factory.mktemp("cbuild") / "fortified"
    src = HERE / "c" / "fortified.c"
    subprocess.run(
        ["gcc", "-O2", "-D_FORTIFY_SOURCE=2", "-Wall", "-Werror", "-o", str(out), str(src)],
        check=True,
        timeout=60,
    )
    return out


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
