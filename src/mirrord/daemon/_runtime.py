"""The per-user runtime directory (I7) and the files the daemon keeps in it.

Owns: where the runtime directory is, creating it 0700, and the names of the files in it
(control socket, layer socket, log, pid lock, start lock). Does not own what the files hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mirrord.daemon._exceptions import DaemonError

__all__ = ["RuntimePaths", "runtime_dir", "runtime_paths"]


def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """`$MIRRORD_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/mirrord`, else `~/.mirrord` (I7)."""
    env = os.environ if env is None else env
    if env.get("MIRRORD_RUNTIME_DIR"):
        # absolute: the daemon runs in / and the layer in the user app's directory
        return Path(env["MIRRORD_RUNTIME_DIR"]).absolute()
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "mirrord"
    return Path(env.get("HOME") or Path.home()) / ".mirrord"


# sun_path holds 108 bytes with the terminating NUL; the longest name kept in the directory is
# an agent's socket, `agent-<daemon pid>-<n>.sock` (the local backend's naming).
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET_NAME = "agent-4194304-99999.sock"


@dataclass(frozen=True, slots=True)
class RuntimePaths:
    root: Path

    @property
    def control_socket(self) -> Path:
        return self.root / "mirrordd.sock"

    @property
    def layer_socket(self) -> Path:
        return self.root / "layer.sock"

    @property
    def log(self) -> Path:
        return self.root / "mirrordd.log"

    @property
    def pid_lock(self) -> Path:
        """Held (flock) by the running daemon for its whole life; holds its pid."""
        return self.root / "mirrordd.pid"

    @property
    def start_lock(self) -> Path:
        """Held by a client while it starts a daemon, so two runs never start two."""
        return self.root / "mirrordd.start.lock"

    def ensure(self) -> None:
        """Create the directory (0700), and tighten it if it exists with looser modes.

        Raises `DaemonError` saying which directory is unusable and how to choose another
        (a path that is a file, a parent that cannot be created, a directory of another user,
        a path too long for the unix sockets in it)."""
        longest = len(os.fsencode(self.root / _LONGEST_SOCKET_NAME))
        if longest > _MAX_SOCKET_PATH:
            raise DaemonError(
                f"the mirrord runtime directory {self.root} is too long a path for the unix "
                f"sockets kept in it ({longest} bytes with a socket name; the limit is "
                f"{_MAX_SOCKET_PATH}): point $MIRRORD_RUNTIME_DIR at a shorter path"
            )
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if (self.root.stat().st_mode & 0o777) != 0o700:
                os.chmod(self.root, 0o700)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(self.root))
        except OSError as exc:
            what = "is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
            raise DaemonError(
                f"cannot use the mirrord runtime directory {self.root} ({exc.filename or self.root}: "
                f"{what}): point $MIRRORD_RUNTIME_DIR at a directory of yours, or fix that path"
            ) from None


def runtime_paths(env: Mapping[str, str] | None = None) -> RuntimePaths:
    return RuntimePaths(runtime_dir(env))
