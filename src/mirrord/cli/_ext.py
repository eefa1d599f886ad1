"""`mirrord ext`: what an IDE runs before starting its debuggee under mirrord.

Owns: newline-delimited JSON on stdout: `{"type": "progress", "message": ...}` lines, warnings
(`{"type": "warning", ...}`), and last `{"type": "env", "session": ..., "env": {...}}` (the
variables the IDE adds to the debuggee's environment; `LD_PRELOAD` is only the layer, to be
appended to any value the debuggee already has), or `{"type": "error", "message": ...}` and
exit 1. Then it keeps the session open until every process of it has exited (after at least
one registered), or until `--wait-timeout` seconds pass with none registered.
Does not own the session (the daemon).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from mirrord.cli._app import app
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
from mirrord.daemon._exceptions import DaemonError

__all__ = ["emit"]


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@app.command("ext")
def ext(
    *,
    target: TargetOpt = None,
    config_file: ConfigOpt = None,
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
    """For IDEs: open a session, print its env as JSON, keep it until the debuggee exits."""
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

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            emit({"type": "progress", "message": event.get("message", "")})
        elif kind in ("warning", "agent_lost"):
            emit({"type": "warning", "message": event.get("message", "")})

    def error(exc: DaemonError) -> None:
        emit({"type": "error", "message": str(exc), "errors": exc.errors or [str(exc)]})

    try:
        session = open_session(
            request,
            progress=lambda text: emit({"type": "progress", "message": text}),
            on_event=on_event,
            warn=lambda text: emit({"type": "warning", "message": text}),
            label="ext",
            on_error=error,
        )
    except typer.Exit:
        raise typer.Exit(1) from None
    emit({"type": "env", "session": session.session, "env": session.env, "unset": session.unset})
    try:
        session.client.call(
            "wait_session", session=session.session, timeout=None, **{"wait_timeout": wait_timeout}
        )
    except DaemonError as exc:
        emit({"type": "warning", "message": str(exc)})
    finally:
        session.close()
