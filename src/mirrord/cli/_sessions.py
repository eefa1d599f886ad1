"""What `mirrord run`, `exec`, `ext` and `demo` share: loading the config, reporting progress,
opening a session in the daemon, and the child's environment.

Owns: the progress display (rich on a terminal, plain `mirrord: ...` lines otherwise, always on
stderr so nothing mixes into the user app's stdout; `MIRRORD_PROGRESS_MODE` chooses: `std` the
former, `simple` plain lines, `json` mirrord's JSON progress lines, `off` nothing), error messages that end with what to do,
and merging the session's env with the user's own. Does not own session state (the daemon).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mirrord.cli._progress import JsonProgress, ProgressMode, progress_mode, write_error
from mirrord.daemon import (
    CloseSession,
    ConfigRefused,
    ControlClient,
    ControlEvent,
    CreateSession,
    DaemonDisconnected,
    DaemonError,
    DaemonNotRunning,
    DaemonStopping,
    RuntimePaths,
    check_layer_env,
    ensure_daemon,
    live_daemon_pid,
    runtime_paths,
    wait_daemon_gone,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

__all__ = [
    "EXIT_BAD_USAGE",
    "EXIT_MIRRORD_ERROR",
    "OpenSession",
    "Progress",
    "check_before_daemon",
    "child_env",
    "fail",
    "open_session",
    "session_request",
]

EXIT_MIRRORD_ERROR = 1  # mirrord itself failed before the user command ran
EXIT_BAD_USAGE = 2  # bad arguments or configuration (like click's usage errors)
# The daemon bounds every wait of a session start itself (agent startup_timeout, handshake):
# this only guards against a daemon that stopped answering.
CREATE_SESSION_TIMEOUT = 900.0


def _terminal_console() -> Console | None:
    """A rich console on stderr if stderr is a terminal (as rich decides it), else None.

    rich costs ~20 ms to import, which every `mirrord run` in a script would pay for nothing:
    it is imported only when stderr may be a terminal. rich treats a stream as a terminal only
    if it is a tty or TTY_COMPATIBLE / FORCE_COLOR say so, so without those rich is not needed
    to know the answer is no."""
    if not ("TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ or _isatty(sys.stderr)):
        return None
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    return console if console.is_terminal else None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def fail(message: str, code: int = EXIT_MIRRORD_ERROR) -> NoReturn:
    """Print `mirrord: error: ...` (or in JSON progress mode mirrord's `Error: {...}` line) on
    stderr and exit."""
    mode = progress_mode()
    err = None if mode in (ProgressMode.JSON, ProgressMode.SIMPLE) else _terminal_console()
    if mode is ProgressMode.JSON:
        write_error(message, help="`mirrord daemon logs` shows what the mirrord daemon did.")
    elif err is not None:
        err.print(f"[bold red]mirrord: error:[/] {_escape(message)}")
    else:
        print(f"mirrord: error: {message}", file=sys.stderr, flush=True)
    import typer  # only on failure: `mirrord run`'s fast path never loads typer otherwise

    raise typer.Exit(code)


class Progress:
    """Steps while the session starts: a rich spinner on a terminal, plain lines otherwise;
    or as `MIRRORD_PROGRESS_MODE` says (`json`: a task `title` with a sub-task per step)."""

    def __init__(self, *, quiet: bool = False, title: str = "mirrord exec") -> None:
        mode = progress_mode()
        self.off = mode is ProgressMode.OFF
        self.quiet = quiet or self.off
        self.json = JsonProgress(sys.stderr) if mode is ProgressMode.JSON else None
        simple = self.json is not None or mode is ProgressMode.SIMPLE
        self.console = None if simple else _terminal_console()
        self.title = title
        self._step: str | None = None
        self._status: Status | None = None

    def __enter__(self) -> Progress:
        if self.json is not None and not self.quiet:
            self.json.new_task(self.title)
        # The spinner needs a real terminal: FORCE_COLOR / TTY_COMPATIBLE (set in many CI
        # setups) ask for colours, and an animation would fill the CI log with frames.
        if self.console is not None and not self.quiet and _isatty(sys.stderr):
            self._status = self.console.status("mirrord: starting", spinner="dots")
            self._status.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if self.json is not None and not self.quiet:
            self._finish_step(exc_type is None)
            self.json.finished_task(self.title, success=exc_type is None)

    def _finish_step(self, success: bool) -> None:
        if self.json is not None and self._step is not None:
            self.json.finished_task(self._step, success=success)
        self._step = None

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def step(self, text: str) -> None:
        if self.quiet:
            return
        if self.json is not None:
            self._finish_step(True)
            self._step = text
            self.json.new_task(text, self.title)
        elif self._status is not None and self.console is not None:
            self.console.print(f"[dim]mirrord:[/] {_escape(text)}")
            self._status.update(f"mirrord: {_escape(text)}")
        else:
            print(f"mirrord: {text}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        if self.off:
            return
        if self.json is not None:
            self.json.warning(text)
        elif self.console is not None:
            self.console.print(f"[yellow]mirrord: warning:[/] {_escape(text)}")
        else:
            print(f"mirrord: warning: {text}", file=sys.stderr, flush=True)


def session_request(
    *, target: str | None, config_file: Path | None, **flags: Any
) -> dict[str, Any]:
    """What the daemon resolves the session's configuration from (`load_config` +
    `cli_overrides`): the config file, the flags given (`cli_overrides` keywords; None and
    False mean "not given", except an explicit `accept_invalid_certificates=False`), this
    environment and directory. The daemon resolves it because it has the config package
    loaded; importing it here would cost every `mirrord run` a few hundred milliseconds."""
    given = {"target": target, **flags}
    return {
        "config_file": str(config_file.absolute()) if config_file is not None else None,
        "flags": {
            k: v
            for k, v in given.items()
            if v is not None and (v is not False or k == "accept_invalid_certificates")
        },
        "env": dict(os.environ),
        "cwd": os.getcwd(),
    }


def check_before_daemon(request: dict[str, Any]) -> None:
    """What the daemon would refuse at once, checked here (it costs importing the config
    package, so only when no daemon runs yet): the config resolves, and the target is one a
    session can have (`check_session_target`). Raises `DaemonError` as the daemon would."""
    from mirrord.daemon import check_session_target, resolve_session_config

    config, _, _ = resolve_session_config(request)
    check_session_target(config, request.get("env") or {})


@dataclass
class OpenSession:
    client: ControlClient
    session: str
    env: dict[str, str]
    agent: str
    paths: RuntimePaths
    unset: list[str] = field(default_factory=list)  # feature.env.unset: not from the user either

    def close(self) -> None:
        try:
            if not self.client.closed:
                self.client.call(CloseSession(session=self.session), timeout=10)
        except DaemonError:
            pass  # the daemon is gone: the session went with it
        finally:
            self.client.close()


def open_session(
    request: dict[str, Any],
    *,
    progress: Callable[[str], None],
    on_event: Callable[[ControlEvent], None],
    warn: Callable[[str], None],
    label: str = "",
    paths: RuntimePaths | None = None,
    on_error: Callable[[DaemonError], None] | None = None,
) -> OpenSession:
    """Start the daemon if needed and open a session (the daemon resolves the config).

    On failure `on_error` (if given) sees the error first (`mirrord ext` reports it as JSON),
    then the message is printed and the command exits: 2 for a configuration error, else 1."""
    paths = paths or runtime_paths()

    def failed(exc: DaemonError, code: int = EXIT_MIRRORD_ERROR) -> NoReturn:
        if on_error is not None:
            on_error(exc)
        fail(str(exc), code=code)

    # When no daemon runs yet, this command is about to start one. What the daemon would
    # refuse at once (a bad config, no target, a local target without root) is checked here
    # while its process starts (the config package, ~180 ms, against the daemon's ~150 ms and
    # its own import of that package); a refusal stops that daemon again, unannounced, before
    # it is reported.
    check = None
    if live_daemon_pid(paths) is None:
        check = lambda: check_before_daemon(request)  # noqa: E731
    # A daemon started for a local target starts its agent at once (it loads its code while
    # this command and the daemon get ready; the daemon's local backend decides whether the
    # target is one); a target from the config file is not known here.
    standby = request.get("flags", {}).get("target") or None
    for attempt in (1, 2):
        try:
            ensure_daemon(paths, progress, meanwhile=check, standby_agent=standby)
            client = ControlClient(paths.control_socket, on_event=on_event)
        except DaemonNotRunning as exc:
            if attempt == 1:
                # It answered ensure_daemon, then went (daemon.idle_timeout ran out, or
                # `mirrord daemon stop`) before this connection: start a new one.
                wait_daemon_gone(paths)
                continue
            failed(exc)
        except DaemonError as exc:
            failed(exc, _exit_code(exc))
        try:
            create = CreateSession(
                config_request=request,
                client_pid=os.getpid(),
                cwd=os.getcwd(),
                label=label,
                debug=layer_debug_requested(os.environ),
            )
            result = client.call(create, timeout=CREATE_SESSION_TIMEOUT)
        except DaemonError as exc:
            client.close()
            if attempt == 1 and isinstance(exc, DaemonStopping | DaemonDisconnected):
                # The daemon was exiting (daemon.idle_timeout ran out as we connected, or
                # `mirrord daemon stop`): once it is gone, start a new one and ask again.
                wait_daemon_gone(paths)
                continue
            failed(exc, _exit_code(exc))
        break
    try:
        check_layer_env(result.env, paths)
    except DaemonError as exc:
        client.close()
        failed(exc)
    for warning in result.warnings:
        warn(warning)
    return OpenSession(
        client=client,
        session=result.session,
        env=result.env,
        agent=result.agent_description or result.agent,
        paths=paths,
        unset=result.unset,
    )


_LEVELS = ("off", "error", "warn", "info", "debug", "trace")


def layer_debug_requested(environ: Mapping[str, str]) -> bool:
    """Whether the user app's layer prints its debug lines on stderr: `MIRRORD_LAYER_DEBUG`
    set, or `MIRRORD_LOG` (a tracing filter, as mirrord reads it: `debug`, `mirrord=debug`,
    `warn,mirrord=trace`, `mirrord_layer`) enabling debug or trace for mirrord's targets.
    Among the lines is `daemon subscribed port N` once a listener's port is subscribed."""
    if environ.get("MIRRORD_LAYER_DEBUG"):
        return True
    for directive in environ.get("MIRRORD_LOG", "").split(","):
        target, _, level = directive.strip().rpartition("=")
        if not level:
            continue
        if not target and level.lower() not in _LEVELS:
            target, level = level, "trace"  # a bare target: everything it logs
        target = target.split("[", 1)[0]  # span filters narrow, never widen
        if level.lower() in ("debug", "trace") and (not target or target.startswith("mirrord")):
            return True
    return False


def _exit_code(exc: DaemonError) -> int:
    """2 for the user's configuration, else 1."""
    return EXIT_BAD_USAGE if isinstance(exc, ConfigRefused) else EXIT_MIRRORD_ERROR


def child_env(
    session_env: Mapping[str, str],
    base: Mapping[str, str] | None = None,
    unset: Sequence[str] = (),
) -> dict[str, str]:
    """The user's environment without `unset` (`feature.env.unset`, case-insensitive) and with
    the session's on top; the layer is appended to any LD_PRELOAD the user already has."""
    env = dict(os.environ if base is None else base)
    for key in [k for k in env if k.startswith("MIRRORD_LAYER") or k == "MIRRORD_SESSION"]:
        del env[key]  # a session nested in another: only the new one applies
    gone = {name.upper() for name in unset}
    for key in [k for k in env if k.upper() in gone]:
        del env[key]
    layer = session_env.get("LD_PRELOAD", "")
    env.update({k: v for k, v in session_env.items() if k != "LD_PRELOAD"})
    if layer:
        existing = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
        existing = [p for p in existing if "libmirrord_layer" not in p]
        env["LD_PRELOAD"] = " ".join([*existing, layer])
    return env
