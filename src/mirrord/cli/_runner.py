"""What `mirrord run` does once its arguments are parsed, without typer.

Owns: opening the session, starting CMD with the session's env, forwarding SIGINT/SIGTERM/SIGHUP
(and the other signals that would end `mirrord run`) to it exactly once, closing the session,
and the exit code (CMD's, 128+N when a signal N ended it). CMD dies with `mirrord run` (a
parent-death signal), as it would if mirrord ran it in its own process. It must
not import typer (or anything that does): the fast path of `mirrord run` (`_main.py`) calls it
without loading typer and the pydantic typer uses to coerce arguments.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from mirrord.cli._sessions import Progress, child_env, fail, open_session, session_request
from mirrord.daemon import (
    AgentLostEvent,
    ControlEvent,
    DisconnectedEvent,
    ProgressEvent,
    WarningEvent,
)

__all__ = ["run_command"]

# Whatever would end `mirrord run` by default is passed on, so CMD is never left running
# without it (SIGUSR1/2 often mean "reload" or "dump" to the app).
_FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _terminal_foreground() -> bool:
    """Whether this process's group is the foreground group of its controlling terminal: then
    Ctrl-C / Ctrl-\\ on that terminal reach every process of the group, CMD included."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal (IDE, CI, a service)
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, *, block_sigint: bool = False) -> Callable[[], None]:
    """A preexec function: CMD gets SIGKILL when `mirrord run` dies (a `kill -9` of it must not
    leave CMD running without its session). libc is looked up before the fork. With
    `block_sigint`, CMD starts with SIGINT blocked (the mask survives exec): a Ctrl-C stays
    pending until CMD unblocks it, once it is ready to handle it. The fork itself happens with
    SIGINT blocked (`_start_command`): a Ctrl-C right then would raise KeyboardInterrupt in the
    child's after-fork hooks, printed as a traceback, before CMD even runs; here, without
    `block_sigint`, the child drops Python's handler and unblocks it, so such a Ctrl-C ends the
    child as it would end CMD."""
    import ctypes  # here: the fast path of `mirrord run` keeps its imports few

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # mirrord run died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
        if not block_sigint:
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored: stays so
                signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    return preexec


def _check_command(name: str) -> None:
    """Exit 127 / 126 before the session opens (an agent may take seconds to start, in a
    cluster) when CMD cannot run. PATH is the user's own (never the target's), so the lookup
    here is the one `Popen` does; Popen's own errors below stay for a command that changes in
    between."""
    if "/" in name:
        if not os.path.exists(name):
            fail(f"command not found: {name}", code=127)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            fail(f"command not executable: {name}", code=126)
    elif shutil.which(name) is None:
        if shutil.which(name, mode=os.F_OK) is not None:
            fail(f"command not executable: {name}", code=126)
        fail(f"command not found: {name} (not in PATH)", code=127)


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True}
_BOOL_WORDS.update({"false": False, "0": False, "no": False, "off": False})


class _SupervisorDone:
    """A pipe whose write end only the supervisor (and its fallback) keep: its end of file
    says the supervisor is done, remote files the program wrote written back (docs/layer.md).
    The session stays open until then (at most the layer's timeout)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()

    def started(self) -> None:
        os.close(self.write)

    def wait(self, timeout: float = 30.0) -> None:
        import select

        try:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if select.select([self.read], [], [], left)[0] and not os.read(self.read, 64):
                    return
        finally:
            os.close(self.read)


def _supervised(
    command: list[str], env: dict[str, str]
) -> tuple[list[str], _SupervisorDone | None]:
    """`command`, under the system-call supervisor when asked (`--syscalls`,
    `experimental.syscall_supervisor: true`), or when unset and the executable is statically
    linked (the layer cannot load into it) or built by Go (which bypasses it); docs/layer.md.
    The layer stays inactive in the supervisor's launcher (MIRRORD_DONT_LOAD, which the
    launcher takes away again before the command's exec, unless the user had set it)."""
    asked = env.get("MIRRORD_LAYER_SYSCALLS")
    options = []
    if asked is None:
        from mirrord.cli._elf import needs_supervisor

        name = command[0]
        if "/" not in name:
            found = shutil.which(name, path=os.pathsep.join(os.get_exec_path(env)))
            if found is None:
                return command, None  # Popen reports it
            name = found
        if not needs_supervisor(Path(name)):
            return command, None
        # automatic: a kernel without seccomp user notification runs the command as before
        options.append("--auto")
    elif asked != "1":
        return command, None
    from mirrord.layer import supervisor_path

    if "MIRRORD_DONT_LOAD" in env:
        options.append("--keep-dont-load")
    env.setdefault("MIRRORD_DONT_LOAD", "1")
    done = _SupervisorDone()
    options.append(f"--done-fd={done.write}")
    return [str(supervisor_path()), *options, "--", *command], done


def _accept_invalid_certificates(value: str | None) -> bool | None:
    """`--accept-invalid-certificates[=BOOL]` as a setting (None: not given)."""
    if value is None:
        return None
    certs = _BOOL_WORDS.get(value.strip().lower())
    if certs is None:
        fail(
            f"--accept-invalid-certificates={value}: expected true or false (`-c` alone means "
            "true)",
            code=2,
        )
    return certs


def _start_command(
    command: list[str],
    argv: list[str],
    env: dict[str, str],
    *,
    shared_group: bool,
    pass_fds: tuple[int, ...] = (),
    block_sigint: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `argv` (`command`, maybe under the supervisor); exit 127 / 126 when it cannot run,
    as a shell would."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # see _die_with_parent
    blocked = block_sigint or signal.SIGINT in mask  # CMD inherits a blocked SIGINT as before
    preexec = _die_with_parent(os.getpid(), block_sigint=blocked)
    try:
        return subprocess.Popen(
            argv,
            env=env,
            process_group=None if shared_group else 0,
            # The other threads here (the control connection's reader) hold nothing the
            # preexec function needs: it calls prctl, getppid and kill, all prepared.
            preexec_fn=preexec,  # noqa: PLW1509
            pass_fds=pass_fds,
        )
    except FileNotFoundError:
        if shutil.which(command[0]) is not None:  # the file is there: its #! is not
            fail(
                f"cannot run {command[0]}: the interpreter named on its #! line was not found",
                code=127,
            )
        fail(f"command not found: {command[0]}", code=127)
    except PermissionError:
        fail(f"command not executable: {command[0]}", code=126)
    except OSError as exc:  # ENOEXEC (a script without #!), ELIBBAD, E2BIG, ...
        hint = ""
        if exc.errno == errno.ENOEXEC:
            hint = f" (a script needs a #! line, or run it as `sh {command[0]}`)"
        fail(f"cannot run {command[0]}: {exc.strerror}{hint}", code=126)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _wait_forwarding_signals(child: subprocess.Popen[bytes], *, shared_group: bool) -> int:
    """Wait for `child`, passing on the signals that would end `mirrord run` (but not the
    terminal's Ctrl-C / Ctrl-\\ when it reached `child` by itself); its exit code."""

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        if not (shared_group and signum in (signal.SIGINT, signal.SIGQUIT)):
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        returncode = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return _exit_code(returncode)


def run_command(
    *,
    command: list[str],
    target: str | None = None,
    config_file: Path | None = None,
    quiet: bool = False,
    accept_invalid_certificates: str | None = None,
    no_telemetry: bool = False,
    disable_version_check: bool = False,
    block_sigint: bool = False,
    **flags: Any,
) -> int:
    """Open a session, run `command` in it, close the session; returns the exit code.

    `block_sigint` starts `command` with SIGINT blocked, for a command that unblocks it once
    its own handler is in place (the demo app: a Ctrl-C during its start-up then ends it
    quietly instead of with a KeyboardInterrupt traceback from an import).

    `flags` are `mirrord.config.cli_overrides` keywords (the options of `mirrord run`).
    `no_telemetry` and `disable_version_check` are accepted for mirrord's scripts: there is
    no telemetry and no version check to turn off."""
    del no_telemetry, disable_version_check
    if not command:
        fail("no command to run: `mirrord run [OPTIONS] -- CMD [ARGS]`", code=2)
    certs = _accept_invalid_certificates(accept_invalid_certificates)
    _check_command(command[0])
    progress = Progress(quiet=quiet)
    request = session_request(
        target=target,
        config_file=config_file,
        accept_invalid_certificates=certs,
        **flags,
    )
    running = [False]

    def on_event(event: ControlEvent) -> None:
        if isinstance(event, ProgressEvent):
            progress.step(event.message)
        elif isinstance(event, WarningEvent | AgentLostEvent):
            progress.warn(event.message)
        elif isinstance(event, DisconnectedEvent) and running[0]:
            progress.warn("the mirrord daemon went away: remote calls of the command now fail")

    with progress:
        session = open_session(
            request,
            progress=progress.step,
            on_event=on_event,
            warn=progress.warn,
            label=" ".join(command)[:200],
        )
        progress.step(f"session {session.session} on {session.agent}: running {command[0]}")
    try:
        env = child_env(session.env, unset=session.unset)
        argv, done = _supervised(command, env)
        # In the terminal's foreground group, CMD shares it, so the terminal's Ctrl-C reaches
        # CMD by itself and is not forwarded. Anywhere else (IDE, CI, `timeout`, a script), CMD
        # gets a group of its own: a signal sent to mirrord run's group (killpg) then reaches
        # CMD once, through the forwarding, not twice.
        shared_group = _terminal_foreground()
        pass_fds = (done.write,) if done is not None else ()
        child = _start_command(
            command,
            argv,
            env,
            shared_group=shared_group,
            pass_fds=pass_fds,
            block_sigint=block_sigint,
        )
        running[0] = True
        if done is not None:
            done.started()
        code = _wait_forwarding_signals(child, shared_group=shared_group)
        running[0] = False
        if done is not None:
            done.wait()  # the supervisor's write-backs, before the session closes
        return code
    finally:
        session.close()
