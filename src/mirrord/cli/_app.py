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


def _speaks_json() -> bool:
    """Whether this command's caller reads mirrord's JSON error line (an IDE): `ext` always,
    `ls` when its output is not a terminal, as mirrord's own CLI does for both."""
    command = sys.argv[1:2]
    return command == ["ext"] or (command == ["ls"] and not sys.stdout.isatty())


def _main_json() -> None:
    """typer without its standalone handling, so that a usage error (an unknown option) is the
    one `Error: {...}` line an IDE parses instead of click's usage text."""
    from mirrord.cli._progress import write_error

    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        # click's usage errors (typer vendors click in some versions, so by their interface:
        # a message and an exit code)
        message = getattr(exc, "format_message", None)
        exit_code = getattr(exc, "exit_code", None)
        if message is None or not isinstance(exit_code, int):
            raise
        write_error(str(message()), help=f"`mirrord {sys.argv[1]} --help` lists the options.")
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    _register_commands()
    try:
        if _speaks_json():
            _main_json()
        app()
    except KeyboardInterrupt:
        sys.exit(130)
