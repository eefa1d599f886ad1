"""The typer application and the one place where errors become messages and exit codes."""

from __future__ import annotations

import sys

import typer

from mirrord._version import __version__

app = typer.Typer(
    name="mirrord",
    help="Run a local process as if it ran inside a Kubernetes pod (or a local target).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mirrord {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        help="Print the version and exit.",
        callback=_version_callback,
        is_eager=True,
    ),
) -> None:
    """mirrord: your process runs here; it sees the target's env, files, DNS, network and traffic."""


def _register_commands() -> None:
    # Each command module adds itself to `app` on import.
    from mirrord.cli import _commands  # noqa: F401


def main() -> None:
    _register_commands()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
