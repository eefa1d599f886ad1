"""What `mirrord run`, `exec`, `ext` and `demo` share: loading the config, reporting progress,
opening a session in the daemon, and the child's environment.

Owns: the progress display (rich on a terminal, plain `mirrord: ...` lines otherwise, always on
stderr so nothing mixes into the user app's stdout), error messages that end with what to do,
and merging the session's env with the user's own. Does not own session state (the daemon).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status

from mirrord.daemon._client import ControlClient, ensure_daemon
from mirrord.daemon._exceptions import DaemonError
from mirrord.daemon._runtime import RuntimePaths, runtime_paths

if TYPE_CHECKING:
    # the config package builds pydantic models at import (a few hundred ms): only the
    # commands that need a config pay for it
    from mirrord.config import MirrordConfig

__all__ = [
    "EXIT_BAD_USAGE",
    "EXIT_MIRRORD_ERROR",
    "OpenSession",
    "Progress",
    "child_env",
    "fail",
    "load_run_config",
    "open_session",
]

EXIT_MIRRORD_ERROR = 1  # mirrord itself failed before the user command ran
EXIT_BAD_USAGE = 2  # bad arguments or configuration (like click's usage errors)


def fail(message: str, code: int = EXIT_MIRRORD_ERROR) -> NoReturn:
    """Print `mirrord: error: ...` on stderr and exit."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if err.is_terminal:
        err.print(f"[bold red]mirrord: error:[/] {escape(message)}")
    else:
        print(f"mirrord: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


class Progress:
    """Steps while the session starts: a rich spinner on a terminal, plain lines otherwise."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self._status: Status | None = None

    def __enter__(self) -> Progress:
        if self.console.is_terminal and not self.quiet:
            self._status = self.console.status("mirrord: starting", spinner="dots")
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def step(self, text: str) -> None:
        if self.quiet:
            return
        if self._status is not None:
            self.console.print(f"[dim]mirrord:[/] {escape(text)}")
            self._status.update(f"mirrord: {escape(text)}")
        else:
            print(f"mirrord: {text}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        if self.console.is_terminal:
            self.console.print(f"[yellow]mirrord: warning:[/] {escape(text)}")
        else:
            print(f"mirrord: warning: {text}", file=sys.stderr, flush=True)


def load_run_config(
    *,
    target: str | None,
    config_file: Path | None,
    steal: bool = False,
    fs_mode: str | None = None,
    env_include: str | None = None,
    env_exclude: str | None = None,
    no_outgoing: bool = False,
    no_remote_dns: bool = False,
    warn: Callable[[str], None] | None = None,
) -> MirrordConfig:
    from mirrord.config import ConfigError, cli_overrides, resolve_config

    try:
        overrides = cli_overrides(
            target=target,
            steal=steal,
            fs_mode=fs_mode,
            env_include=env_include,
            env_exclude=env_exclude,
            no_outgoing=no_outgoing,
            no_remote_dns=no_remote_dns,
        )
        resolved = resolve_config(config_file, overrides=overrides)
    except ConfigError as exc:
        fail(str(exc), code=EXIT_BAD_USAGE)
    if warn is not None:
        for warning in resolved.warnings:
            warn(warning)
    return resolved.config


@dataclass
class OpenSession:
    client: ControlClient
    session: str
    env: dict[str, str]
    agent: str
    paths: RuntimePaths

    def close(self) -> None:
        try:
            if not self.client.closed:
                self.client.call("close_session", session=self.session, timeout=10)
        except DaemonError:
            pass  # the daemon is gone: the session went with it
        finally:
            self.client.close()


def open_session(
    config: MirrordConfig,
    *,
    progress: Callable[[str], None],
    on_event: Callable[[dict[str, Any]], None],
    label: str = "",
    paths: RuntimePaths | None = None,
) -> OpenSession:
    """Start the daemon if needed and open a session on the config's target."""
    paths = paths or runtime_paths()
    target = config.target.path or "targetless"
    try:
        ensure_daemon(
            paths,
            progress,
            idle_timeout=float(config.daemon.idle_timeout),
            log_level=str(config.daemon.log_level),
        )
        client = ControlClient(paths.control_socket, on_event=on_event)
    except DaemonError as exc:
        fail(str(exc))
    progress(f"opening a session on {target}")
    try:
        result = client.call(
            "create_session",
            timeout=float(config.agent.startup_timeout) + 60,
            target=target,
            config=config.model_dump(mode="json"),
            client_pid=os.getpid(),
            cwd=os.getcwd(),
            label=label,
            debug=bool(os.environ.get("MIRRORD_LAYER_DEBUG")),
        )
    except DaemonError as exc:
        client.close()
        fail(str(exc))
    return OpenSession(
        client=client,
        session=str(result["session"]),
        env=dict(result["env"]),
        agent=str(result.get("agent_description") or result.get("agent") or ""),
        paths=paths,
    )


def child_env(
    session_env: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The user's environment with the session's on top; the layer is appended to any
    LD_PRELOAD the user already has."""
    env = dict(os.environ if base is None else base)
    for key in [k for k in env if k.startswith("MIRRORD_LAYER") or k == "MIRRORD_SESSION"]:
        del env[key]  # a session nested in another: only the new one applies
    layer = session_env.get("LD_PRELOAD", "")
    env.update({k: v for k, v in session_env.items() if k != "LD_PRELOAD"})
    if layer:
        existing = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
        existing = [p for p in existing if "libmirrord_layer" not in p]
        env["LD_PRELOAD"] = " ".join([*existing, layer])
    return env
