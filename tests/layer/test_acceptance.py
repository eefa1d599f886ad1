"""The issue's acceptance: real programs read the target's files; local paths stay local."""

from __future__ import annotations

from tests.layer._daemon import LayerDaemon
from tests.layer.conftest import TEST_FILE, Runner


def test_cat_reads_the_remote_file(run: Runner, daemon: LayerDaemon) -> None:
    assert run(["cat", "/app/test.txt"]).stdout == TEST_FILE
    assert "FileFetch" in daemon.kinds()


def test_python_open_reads_the_remote_file(run: Runner) -> None:
    out = run.py("print(open('/app/test.txt').read(), end='')")
    assert out.stdout == TEST_FILE


def test_ls_lists_the_remote_directory(run: Runner) -> None:
    out = run(["ls", "/app"])
    assert out.stdout.split() == [b"config", b"empty", b"link", b"test.txt"]


def test_bash_test_r_sees_the_remote_file(run: Runner) -> None:
    out = run(["bash", "-c", "[[ -r /app/test.txt ]] && echo yes"])
    assert out.stdout == b"yes\n"


def test_etc_passwd_and_the_working_directory_stay_local(run: Runner, daemon: LayerDaemon) -> None:
    (run.cwd / "mine.txt").write_text("local content")
    out = run(["cat", "/etc/passwd", str(run.cwd / "mine.txt"), "mine.txt"])
    assert out.stdout.startswith(b"root:")
    assert out.stdout.endswith(b"local contentlocal content")
    run(["ls", str(run.cwd), "/etc"])
    run.py("import os; open('/etc/passwd').read(); os.listdir('.'); os.stat('mine.txt')")
    assert daemon.requests() == []
