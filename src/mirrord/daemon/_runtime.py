"""The per-user runtime directory (docs/commands.md) and the files the daemon keeps in it.

Owns: where the runtime directory is, creating it 0700 and refusing one of another user, the
names of the files in it (control socket, layer socket, log, pid lock, start lock), and who
may be trusted at the other end of its sockets (`peer_credentials`, `trusted_peer`). Does not
own what the files hold.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mirrord.daemon._exceptions import DaemonError

__all__ = ["RuntimePaths", "peer_credentials", "runtime_dir", "runtime_paths", "trusted_peer"]


def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """`$MIRRORD_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/mirrord`, else `~/.mirrord`."""
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

        Only its owner talks to the daemon: everything in the directory (the control and layer
        sockets, agent secrets) is trusted because nobody else can create or replace it, so a
        directory owned by another user is refused, whatever its mode (root too: a user's
        directory handed to `sudo -E` is that user's, not root's).

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
            st = self.root.stat()
            if stat.S_ISDIR(st.st_mode) and st.st_uid != os.geteuid():
                raise DaemonError(
                    f"the mirrord runtime directory {self.root} belongs to {_user(st.st_uid)}, "
                    f"not to you ({_user(os.geteuid())}): only its owner may talk to a mirrord "
                    "daemon, so another user's directory is never used. Point "
                    "$MIRRORD_RUNTIME_DIR at a directory of yours (or unset it; with `sudo -E`, "
                    "unset XDG_RUNTIME_DIR too)"
                )
            if (st.st_mode & 0o777) != 0o700:
                os.chmod(self.root, 0o700)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(self.root))
        except OSError as exc:
            what = "is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
            raise DaemonError(
                f"cannot use the mirrord runtime directory {self.root} ({exc.filename or self.root}: "
                f"{what}): point $MIRRORD_RUNTIME_DIR at a directory of yours, or fix that path"
            ) from None


def _user(uid: int) -> str:
    """`uid 65534 (nobody)`, or `uid N` for a uid without a name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def runtime_paths(env: Mapping[str, str] | None = None) -> RuntimePaths:
    return RuntimePaths(runtime_dir(env))


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected unix socket (SO_PEERCRED:
    the kernel's record of who called listen()/connect(), which the peer cannot forge)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


def trusted_peer(uid: int) -> bool:
    """A peer the daemon serves: its own user, or root (who could read its sockets anyway)."""
    return uid in (os.geteuid(), 0)
