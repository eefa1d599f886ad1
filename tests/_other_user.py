"""Running code as another local user, for the checks that a session is its own user's only."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["OTHER_UID", "listening_as", "python_for_the_other_user"]

OTHER_UID = 65534  # nobody: a user with no rights over root's processes or files


def python_for_the_other_user() -> str:
    """A python the other user may run (the virtualenv's is usually under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        probe = (
            subprocess.run(
                [candidate, "-c", "import os; print(os.getuid())"],
                user=OTHER_UID,
                group=OTHER_UID,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if os.path.exists(candidate)
            else None
        )
        if probe is not None and probe.stdout.strip() == str(OTHER_UID):
            return candidate
    pytest.skip(f"no python that uid {OTHER_UID} may run")


@contextlib.contextmanager
def listening_as(uid: int, path: Path, serve: Callable[[socket.socket], None]) -> Iterator[int]:
    """A forked child that binds the unix socket `path`, becomes `uid` and only then listen()s
    (SO_PEERCRED records the listening process's uid), then runs `serve(server)` and exits.
    Yields the child's pid once it listens; kills it and removes `path` at the end."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(ready_r)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            server.listen(8)
            os.write(ready_w, b"1")
            os.close(ready_w)
            serve(server)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1", "the listener of the other user did not start"
        os.close(ready_r)
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        path.unlink(missing_ok=True)
