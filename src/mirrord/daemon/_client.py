"""The control API's client side (synchronous, for the CLI) and starting the daemon.

Owns: talking the control API (`_control.py`'s messages) to `mirrordd.sock` (only to a listener of this user: SO_PEERCRED, a
status with a build id, a session whose layer is this install's), starting a detached daemon
when none answers (a start lock so two concurrent `mirrord run` never start two; a stale
socket left by a dead daemon is replaced by the new daemon, which holds the pid lock), and
waiting until it answers.
Does not own the daemon's behaviour or anything printed to the user.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mirrord.daemon._control import (
    ControlEvent,
    ControlRequest,
    DisconnectedEvent,
    Shutdown,
    Status,
    decode_event,
    decode_line,
    decode_reply,
    encode_request,
)
from mirrord.daemon._exceptions import (
    ControlError,
    DaemonDisconnected,
    DaemonError,
    DaemonNotRunning,
    UntrustedDaemon,
)
from mirrord.daemon._runtime import RuntimePaths, peer_credentials

__all__ = [
    "ControlClient",
    "check_layer_env",
    "checked_status",
    "daemon_env",
    "daemon_status",
    "ensure_daemon",
    "live_daemon_pid",
    "start_daemon",
    "stop_daemon",
    "wait_daemon_gone",
]

A = TypeVar("A")
EventCallback = Callable[[ControlEvent], None]
DAEMON_START_TIMEOUT = 20.0
START_LOCK_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0
# How long a daemon that is shutting down may take to exit before it counts as stuck: it stops
# its agents first (SIGTERM, then SIGKILL after 5 s each).
SHUTDOWN_WAIT = 15.0
# How long a daemon that accepted a connection may take to answer `status` before it counts
# as stuck (`mirrord run` and `mirrord daemon status` alike).
STATUS_TIMEOUT = 5.0
_LAYER_VARS = ("MIRRORD_LAYER_SOCKET", "MIRRORD_SESSION", "MIRRORD_LAYER_CONFIG")


class ControlClient:
    """One control connection. A reader thread dispatches replies to callers and events to
    `on_event` (progress, warnings, agent loss of the sessions this connection opened)."""

    def __init__(self, socket_path: Path, on_event: EventCallback | None = None) -> None:
        self.socket_path = socket_path
        self.on_event = on_event
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(str(socket_path))
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno_mod.ENOENT, errno_mod.ECONNREFUSED, errno_mod.ENOTSOCK):
                raise DaemonNotRunning(str(socket_path)) from None
            raise DaemonNotRunning(str(socket_path)) from exc
        try:
            self.peer_pid, peer_uid = peer_credentials(sock)
        except OSError as exc:
            sock.close()
            raise UntrustedDaemon(
                f"cannot tell who answers on {socket_path} (SO_PEERCRED: {exc.strerror}); "
                "nothing it says is used"
            ) from None
        if peer_uid != os.geteuid():
            # The runtime directory is the user's own (RuntimePaths.ensure), so only root or a
            # misconfigured directory can put another user's listener here: never trust it,
            # since the daemon's answer decides what is preloaded into the user's command.
            sock.close()
            raise UntrustedDaemon(
                f"the process answering on {socket_path} (pid {self.peer_pid}) runs as uid "
                f"{peer_uid}, not as you (uid {os.geteuid()}): it is not your mirrord daemon "
                f"and nothing it says is used. Stop it (`kill {self.peer_pid}` as its owner or "
                "root) and remove the socket, or point $MIRRORD_RUNTIME_DIR at a directory of "
                "yours"
            )
        self._sock = sock
        self._ids = itertools.count(1)
        self._replies: dict[int, queue.Queue[dict[str, Any] | None]] = {}
        self._lock = threading.Lock()
        self.closed = False
        # A malformed event from the daemon (a bug, `_control.decode_event`): it ends the
        # connection and is raised by the pending and every later `call` in the caller's
        # thread, where the CLI reports it, instead of dying in the reader thread.
        self._malformed: KeyError | TypeError | None = None
        self._reader = threading.Thread(target=self._read, name="mirrord-control", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<ControlClient {self.socket_path} closed={self.closed}>"

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Also once the reader saw the end (it sets `closed`): the socket is still ours to close.
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._dispatch(decode_line(line))
        except (OSError, ValueError):
            pass
        except (KeyError, TypeError) as exc:
            self._malformed = exc
        finally:
            self.closed = True
            with self._lock:
                waiting = list(self._replies.values())
            for q in waiting:
                q.put(None)
            if self.on_event is not None:
                self.on_event(DisconnectedEvent())

    def _dispatch(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        if "event" in obj:
            event = decode_event(obj)
            if self.on_event is not None and event is not None:
                self.on_event(event)
            return
        with self._lock:
            q = self._replies.get(obj.get("id", -1))
        if q is not None:
            q.put(obj)

    def call(self, request: ControlRequest[A], *, timeout: float | None = CALL_TIMEOUT) -> A:
        """Send `request` and wait for its answer; an error answer raises the `DaemonError`
        subclass its code names, with the daemon's message."""
        op = request.op
        if self._malformed is not None:
            raise self._malformed
        rid = next(self._ids)
        q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self._lock:
            self._replies[rid] = q
        try:
            line = encode_request(rid, request)
            try:
                self._sock.sendall(line)
            except OSError as exc:
                # closed before it read the request: it exited (daemon.idle_timeout ran out as
                # we connected, `mirrord daemon stop`), as when it closes before answering
                raise DaemonDisconnected(
                    f"the mirrord daemon closed the connection ({exc})"
                ) from None
            try:
                reply = q.get(timeout=timeout)
            except queue.Empty:
                raise ControlError(
                    f"the mirrord daemon did not answer {op} within {timeout:g} s; see "
                    "`mirrord daemon logs`"
                ) from None
        finally:
            with self._lock:
                self._replies.pop(rid, None)
        if reply is None:
            if self._malformed is not None:
                raise self._malformed
            raise DaemonDisconnected(
                f"the mirrord daemon closed the connection during {op}; see `mirrord daemon logs`"
            )
        return decode_reply(request, reply)


def check_layer_env(env: Mapping[str, str], paths: RuntimePaths) -> None:
    """Refuse a session environment whose layer is not the one this install ships, or whose
    layer socket is not this runtime directory's: the user's command would load (or talk to)
    whatever the answering process chose. `ControlClient` already refuses another user's
    process; this is the second lock, for anything else listening on the control socket."""
    from mirrord.layer import library_path

    ours = str(library_path())
    preload = env.get("LD_PRELOAD", "")
    if preload != ours:
        raise UntrustedDaemon(
            f"the daemon on {paths.control_socket} asked to preload {preload!r}, not this "
            f"install's layer ({ours}): the command was not run. Stop that daemon (`mirrord "
            "daemon stop`, or kill the process listening there) and run again"
        )
    socket_path = env.get("MIRRORD_LAYER_SOCKET", "")
    if socket_path != str(paths.layer_socket):
        raise UntrustedDaemon(
            f"the daemon on {paths.control_socket} named the layer socket {socket_path!r}, "
            f"not {paths.layer_socket}: the command was not run. Stop that daemon (`mirrord "
            "daemon stop`) and run again"
        )


def daemon_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment: the caller's without the layer (a daemon started from inside
    a mirrord session must not preload the layer into itself)."""
    result = dict(os.environ if env is None else env)
    for name in _LAYER_VARS:
        result.pop(name, None)
    preload = result.get("LD_PRELOAD", "")
    if preload:
        kept = [p for p in preload.replace(":", " ").split() if "libmirrord_layer" not in p]
        if kept:
            result["LD_PRELOAD"] = " ".join(kept)
        else:
            result.pop("LD_PRELOAD")
    return result


class _NoAnswer(DaemonError):
    """A daemon accepted the control connection but did not answer `status`."""


def _status(paths: RuntimePaths, *, stuck_is_error: bool = False) -> dict[str, Any] | None:
    """The daemon's status, or None when none answers. With `stuck_is_error`, a daemon that
    accepts the connection but does not answer raises `_NoAnswer` instead."""
    try:
        client = ControlClient(paths.control_socket)
    except UntrustedDaemon:
        raise
    except DaemonError:
        return None
    try:
        with client:
            status = client.call(Status(), timeout=STATUS_TIMEOUT).status
    except DaemonError:
        if stuck_is_error:
            raise _NoAnswer("no answer") from None
        return None
    return checked_status(status, client)


def checked_status(status: Any, client: ControlClient) -> dict[str, Any]:
    """A `status` result, refused (`UntrustedDaemon`) unless it carries a build id: every
    daemon of this project says it, so whatever answered without one is something else."""
    daemon = status.get("daemon") if isinstance(status, dict) else None
    if not isinstance(daemon, dict) or not daemon.get("build_id"):
        raise UntrustedDaemon(
            f"the process answering on {client.socket_path} (pid {client.peer_pid}) did not "
            "say its build id: it is not a mirrord daemon this command can use. Stop it "
            f"(`kill {client.peer_pid}`) and run again"
        )
    return dict(status)


def _stuck(pid: int, paths: RuntimePaths) -> DaemonError:
    # A new daemon would only fail on the pid lock: say which process to deal with.
    return DaemonError(
        f"the mirrord daemon (pid {pid}) in {paths.root} does not answer (stopped or stuck?): "
        f"`kill {pid}` (or `kill -9 {pid}`) and run again; its log: `mirrord daemon logs`"
    )


def daemon_status(paths: RuntimePaths) -> dict[str, Any]:
    """The daemon's status (`checked_status`). Raises `DaemonNotRunning` when none listens,
    and, for a daemon that accepts the connection but does not answer within
    `STATUS_TIMEOUT`, the error that names its pid, as `mirrord run` does."""
    with ControlClient(paths.control_socket) as client:
        try:
            status = client.call(Status(), timeout=STATUS_TIMEOUT).status
        except DaemonNotRunning:
            raise
        except DaemonError:
            pid = live_daemon_pid(paths)
            if pid is not None:
                raise _stuck(pid, paths) from None
            raise
        return checked_status(status, client)


def _ping(paths: RuntimePaths) -> bool:
    return _status(paths) is not None


def _same_build(status: dict[str, Any]) -> bool:
    """The daemon comes from this install: the same layer build and the same layer file (an
    install elsewhere with the same native sources has the same build id, but its sessions
    would preload its own library, which `check_layer_env` refuses)."""
    from mirrord.layer import build_id, library_path

    daemon = status.get("daemon", {})
    theirs = daemon.get("build_id")
    return (
        bool(theirs) and theirs == build_id() and daemon.get("layer_library") == str(library_path())
    )


@contextlib.contextmanager
def _start_lock(paths: RuntimePaths) -> Iterator[None]:
    fd = os.open(paths.start_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + START_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DaemonError(
                        f"another mirrord command has been starting the daemon for "
                        f"{START_LOCK_TIMEOUT:g} s ({paths.start_lock}); check `mirrord daemon "
                        "logs`"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def start_daemon(
    paths: RuntimePaths,
    *,
    idle_timeout: float | None = None,
    log_level: str | None = None,
    meanwhile: Callable[[], None] | None = None,
    standby_agent: str | None = None,
) -> int:
    """Start a detached daemon (double fork: it is nobody's child and nobody's zombie) and
    wait until it answers. Returns its pid. `meanwhile` runs while the daemon starts (in this
    thread, once the daemon's process exists); if it raises, the daemon is stopped again once
    it answers, and the exception propagates. `standby_agent`: the target whose agent the
    daemon starts at once, ahead of its first session, if it is local (`mirrordd
    --standby-agent`)."""
    paths.ensure()
    argv = [sys.executable, "-m", "mirrord.daemon", "--runtime-dir", str(paths.root)]
    if idle_timeout is not None:
        argv += ["--idle-timeout", str(idle_timeout)]
    if log_level is not None:
        argv += ["--log-level", log_level]
    if standby_agent:
        argv += ["--standby-agent", standby_agent]
    env = daemon_env()
    try:
        log_start = paths.log.stat().st_size  # what this daemon writes comes after
    except OSError:
        log_start = 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: start the daemon in its own session, report its pid, exit
        try:
            os.close(read_fd)
            fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd="/",
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            os.write(write_fd, str(proc.pid).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as r:
        text = r.read().decode()
    if not text.isdigit():
        raise DaemonError(f"could not start mirrordd; see {paths.log}")
    daemon_pid = int(text)
    if meanwhile is not None:
        try:
            meanwhile()
        except BaseException:
            _stop_started(paths, daemon_pid, log_start)
            raise
    _wait_ready(paths, daemon_pid, log_start)
    return daemon_pid


def _wait_ready(paths: RuntimePaths, daemon_pid: int, log_start: int) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    delay = 0.005
    while time.monotonic() < deadline:
        if _ping(paths):
            return
        if not _pid_alive(daemon_pid):
            raise DaemonError(
                f"mirrordd exited while starting: {_log_tail(paths.log, start=log_start)}"
            )
        time.sleep(delay)
        # a failed ping is one connect() to a missing socket: polling every 20 ms costs
        # nothing, and the daemon is ready in ~150 ms (a 100 ms step could waste most of it)
        delay = min(delay * 2, 0.02)
    raise DaemonError(f"mirrordd did not answer within {DAEMON_START_TIMEOUT:g} s; see {paths.log}")


def _stop_started(paths: RuntimePaths, daemon_pid: int, log_start: int) -> None:
    """Stop a daemon this command just started and no longer wants: once it answers, as
    `mirrord daemon stop` does (it removes its sockets); one that never answers, by SIGTERM."""
    try:
        _wait_ready(paths, daemon_pid, log_start)
        stop_daemon(paths)
    except DaemonError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon_pid, signal.SIGTERM)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def live_daemon_pid(paths: RuntimePaths) -> int | None:
    """The pid in `mirrordd.pid` if that process is alive and is a mirrord daemon (it holds
    the pid lock, so no new daemon can start in this directory)."""
    try:
        pid = int(paths.pid_lock.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    if not _pid_alive(pid) or not (b"mirrord.daemon" in cmdline or b"mirrordd" in cmdline):
        return None
    return pid


def wait_daemon_gone(paths: RuntimePaths, timeout: float = 10.0) -> None:
    """Until the daemon that holds the pid lock has exited (one that is shutting down), at
    most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while live_daemon_pid(paths) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def _log_tail(path: Path, lines: int = 5, start: int = 0) -> str:
    """The last lines the daemon logged after `start` (earlier daemons' lines are not its
    reason); its own error line (`mirrordd: ...`) alone when it wrote one."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return f"no log at {path}"
    tail = text.strip().splitlines()
    own = [line for line in tail if line.startswith("mirrordd: ")]
    if own:
        return own[-1].removeprefix("mirrordd: ")
    return " | ".join(tail[-lines:]) or f"nothing in {path}"


def _nothing() -> None:
    pass


def ensure_daemon(
    paths: RuntimePaths,
    progress: Callable[[str], None] | None = None,
    *,
    idle_timeout: float | None = None,
    log_level: str | None = None,
    meanwhile: Callable[[], None] | None = None,
    standby_agent: str | None = None,
) -> bool:
    """Make sure a daemon of this install answers on the runtime directory's control socket;
    returns True if this call started it. An idle daemon of another install (its layer would
    not match ours) is replaced; a busy one is an error that says what to do.

    `meanwhile` (a check of the caller's) runs once, in this thread: while the daemon this
    call starts is starting (its start is announced after it), else before returning. If it
    raises, a daemon this call started is stopped again and the exception propagates.
    `standby_agent`: see `start_daemon` (only for a daemon this call starts)."""
    check = meanwhile if meanwhile is not None else _nothing
    paths.ensure()  # refuses another user's directory before anything in it is trusted
    try:
        status = _status(paths, stuck_is_error=True)
    except _NoAnswer:
        stuck = live_daemon_pid(paths)
        if stuck is not None:
            raise _stuck(stuck, paths) from None
        status = None
    if status is not None and _same_build(status):
        check()
        return False
    with _start_lock(paths):
        status = _status(paths)
        if status is not None and not _same_build(status):
            if status.get("sessions"):
                raise DaemonError(
                    f"the mirrord daemon in {paths.root} comes from another mirrord install and "
                    "has sessions open: end them (or `mirrord daemon stop`), then run again"
                )
            if progress is not None:
                progress("replacing a mirrord daemon of another install")
            stop_daemon(paths)
            status = None
        if status is not None:  # another command started it while we waited for the lock
            check()
            return False
        # No control socket answers but the pid lock is held: a daemon shutting down (it
        # removes its sockets first, then stops its agents and exits). Wait for it to go.
        wait_daemon_gone(paths, timeout=SHUTDOWN_WAIT)
        stuck = live_daemon_pid(paths)
        if stuck is not None:
            raise _stuck(stuck, paths)

        def check_then_announce() -> None:
            check()
            if progress is not None:
                progress("starting the mirrord daemon")

        start_daemon(
            paths,
            idle_timeout=idle_timeout,
            log_level=log_level,
            meanwhile=check_then_announce,
            standby_agent=standby_agent,
        )
        return True


def stop_daemon(paths: RuntimePaths, timeout: float = 15.0) -> bool:
    """Ask the daemon to shut down and wait until it has; False if none was running."""
    try:
        with ControlClient(paths.control_socket) as client:
            pid = client.call(Shutdown(), timeout=5).pid
    except DaemonNotRunning:
        return False
    if pid <= 0:
        raise DaemonError(
            f"whatever listens on {paths.control_socket} answered shutdown without its pid: "
            "it is not a mirrord daemon of this install; stop it, remove the socket and run again"
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.02)
    if _pid_alive(pid):
        raise DaemonError(f"mirrordd (pid {pid}) did not exit within {timeout:g} s")
    return True
