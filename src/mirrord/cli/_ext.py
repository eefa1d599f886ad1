"""`mirrord ext`: what an IDE runs before starting its debuggee under mirrord.

Owns: the command's output, mirrord's IDE protocol (`_progress`): with `MIRRORD_PROGRESS_MODE`
`json` or unset, JSON lines only on stdout. First `NewTask` "mirrord preparing to launch", then
each step of the session start as a sub-task (`NewTask` with that parent, then its
`FinishedTask`), warnings as `Warning`, and last the ready line: `FinishedTask` "mirrord
preparing to launch" with `success: true` and `message` the JSON *string* of
`{"environment", "patched_path": null, "env_to_unset", "uses_operator": false}` (the variables
the IDE adds to the debuggee's environment, and the ones it removes). Then it keeps the session
open until every process of it has exited (after at least one registered), or until
`--wait-timeout` seconds pass with none registered, as mirrord's own `ext` waits for its
internal proxy (which exits the same way). A failure is `FinishedTask` with `success: false`
on stdout and one `Error: {...}` line on stderr (nothing else there), exit code 1.
`simple`/`std` print the same steps as plain lines (the last one the execution JSON); `off`
prints nothing.
Does not own the session (the daemon).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mirrord.cli._app import app
from mirrord.cli._elf import static_executable
from mirrord.cli._progress import READY_TASK, JsonProgress, ProgressMode, progress_mode, write_error
from mirrord.cli._run import (
    ConfigOpt,
    ExcludeOpt,
    FsModeOpt,
    IncludeOpt,
    NoDnsOpt,
    NoOutgoingOpt,
    StealOpt,
    TargetOpt,
)
from mirrord.cli._sessions import open_session, session_request
from mirrord.daemon import (
    AgentLostEvent,
    ConfigRefused,
    ControlEvent,
    DaemonError,
    ProgressEvent,
    WaitSession,
    WarningEvent,
)

__all__ = ["execution_message", "static_executable"]

_HELP = "`mirrord daemon logs` shows what the mirrord daemon did for this session."
_CONFIG_HELP = "Fix the configuration (`mirrord verify-config --ide PATH` lists every problem)."


def execution_message(env: dict[str, str], unset: list[str]) -> str:
    """The ready line's `message`: mirrord's execution info as a JSON string."""
    return json.dumps(
        {
            "environment": env,
            "patched_path": None,  # only macOS patches executables (SIP)
            "env_to_unset": unset,
            "uses_operator": False,
        },
        separators=(",", ":"),
    )


class _Report:
    """The command's output in the chosen progress mode."""

    def __init__(self, mode: ProgressMode) -> None:
        self.mode = mode
        self.json = JsonProgress() if mode is ProgressMode.JSON else None
        self._step: str | None = None

    def _plain(self, text: str) -> None:
        if self.mode is not ProgressMode.OFF:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def start(self) -> None:
        if self.json is not None:
            self.json.new_task(READY_TASK)
        else:
            self._plain(READY_TASK)

    def _finish_step(self, success: bool) -> None:
        if self._step is not None and self.json is not None:
            self.json.finished_task(self._step, success=success)
        self._step = None

    def step(self, text: str) -> None:
        self._finish_step(True)
        self._step = text
        if self.json is not None:
            self.json.new_task(text, READY_TASK)
        else:
            self._plain(text)

    def warning(self, text: str) -> None:
        if self.json is not None:
            self.json.warning(text)
        else:
            self._plain(f"warning: {text}")

    def agent_lost(self, text: str) -> None:
        # after the ready line: a notification the IDE should show, as an IdeMessage when it
        # supports them
        if self.json is None or not self.json.ide_message(
            id="agent_lost", level="Warning", text=text
        ):
            self.warning(text)

    def info(self, text: str) -> None:
        if self.json is not None:
            self.json.info(text)
        else:
            self._plain(text)

    def config_summary(self, request: dict[str, Any]) -> None:
        """`MIRRORD_EXT_PRINT_CONFIG=TRUE` (IntelliJ sets it): mirrord's `config summary`
        sub-task, one `Info` line per setting (what `verify-config` shows)."""
        from mirrord.cli._verify import summary
        from mirrord.config import ConfigError, cli_overrides, resolve_config

        self._finish_step(True)
        try:
            cfg = resolve_config(
                request["config_file"],
                overrides=cli_overrides(**request["flags"]),
                env=request["env"],
                cwd=Path(request["cwd"]),
            ).config
        except ConfigError:
            return  # the session was opened with it: nothing to add
        if self.json is not None:
            self.json.new_task("config summary", READY_TASK)
        for key, value in summary(cfg):
            self.info(f"{key}: {value}")
        if self.json is not None:
            self.json.finished_task("config summary", success=True, message="config summary")

    def ready(self, message: str) -> None:
        self._finish_step(True)
        if self.json is not None:
            self.json.finished_task(READY_TASK, success=True, message=message)
        else:
            self._plain(message)

    def failed(
        self, message: str, *, help: str, causes: list[str], step_ok: bool = False
    ) -> NoReturn:
        """`step_ok`: the step under way is not what failed (a configuration the daemon
        refused after it had started)."""
        self._finish_step(step_ok)
        if self.json is not None:
            self.json.finished_task(READY_TASK, success=False)
        write_error(message, help=help, causes=causes)
        raise typer.Exit(1)


@app.command("ext")
def ext(
    *,
    target: TargetOpt = None,
    config_file: ConfigOpt = None,
    executable: Annotated[
        Path | None,
        typer.Option(
            "--executable",
            "-e",
            help="The program the IDE will start (checked: a static binary cannot load the layer).",
            show_default=False,
        ),
    ] = None,
    steal: StealOpt = False,
    fs_mode: FsModeOpt = None,
    env_include: IncludeOpt = None,
    env_exclude: ExcludeOpt = None,
    no_outgoing: NoOutgoingOpt = False,
    no_remote_dns: NoDnsOpt = False,
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout",
            help="Seconds to keep the session when no process ever registers in it.",
        ),
    ] = 120.0,
) -> None:
    """For IDEs: open a session, print its env in mirrord's JSON progress protocol, keep it
    until the debuggee exits."""
    report = _Report(progress_mode() or ProgressMode.JSON)
    report.start()
    if executable is not None and static_executable(executable):
        report.warning(
            f"{executable} is statically linked: the mirrord layer cannot load into it, so it "
            "will run without the target's files, network and traffic"
        )
    request = session_request(
        target=target,
        config_file=config_file,
        steal=steal,
        fs_mode=fs_mode,
        env_include=env_include,
        env_exclude=env_exclude,
        no_outgoing=no_outgoing,
        no_remote_dns=no_remote_dns,
    )
    ready = [False]

    def on_event(event: ControlEvent) -> None:
        text = event.message
        if isinstance(event, ProgressEvent):
            report.step(text)
        elif isinstance(event, AgentLostEvent) and ready[0]:
            report.agent_lost(text)
        elif isinstance(event, WarningEvent | AgentLostEvent):
            report.warning(text)

    def error(exc: DaemonError) -> NoReturn:
        message = str(exc)
        causes = [e for e in exc.errors if e != message]
        config = isinstance(exc, ConfigRefused)
        report.failed(
            message, help=_CONFIG_HELP if config else _HELP, causes=causes, step_ok=config
        )

    session = open_session(
        request,
        progress=report.step,
        on_event=on_event,
        warn=report.warning,
        label="ext",
        on_error=error,
    )
    try:
        if os.environ.get("MIRRORD_EXT_PRINT_CONFIG", "").upper() == "TRUE":
            report.config_summary(request)
        report.ready(execution_message(session.env, session.unset))
        ready[0] = True
        try:
            session.client.call(
                WaitSession(session=session.session, wait_timeout=wait_timeout), timeout=None
            )
        except DaemonError as exc:
            write_error(
                f"the session ended abnormally: {exc}",
                help="Start the debug session again; " + _HELP,
            )
            raise typer.Exit(1) from None
    finally:
        session.close()
