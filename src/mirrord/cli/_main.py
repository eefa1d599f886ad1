"""The `mirrord` entry point: a fast path for plain `mirrord run`/`exec`, typer for the rest.

Owns: choosing between them, and parsing the plain form of `run`'s options. `mirrord run -t T
-- CMD` is what scripts, tests and IDE restarts run again and again; importing typer (and the
pydantic it coerces arguments with) costs about 100 ms before the session even starts, several
times the session itself on a warm daemon. So when the arguments are only `run`'s options in
their plain forms (`-t V`, `--target V`, `--target=V`, the flags), each at most once, followed
by `--` and a command, they are parsed here and `run_command` runs without typer. Anything
else (help, `--version`, an unknown or repeated option, an option value that is empty or
starts with `-`, no `--`) goes to typer, so usage errors and help are exactly typer's.
`tests/cli/test_fast_path.py` checks that both parse the same arguments the same way and that
the option tables here name every option of `run`.
Does not own what `run` does (`_runner.py`) or its typer declaration (`_run.py`).
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "normalize_run_args", "parse_run_args"]

# option -> run_command keyword (the declarations are in _run.py)
VALUE_OPTIONS = {
    "-t": "target",
    "--target": "target",
    "-n": "target_namespace",
    "--target-namespace": "target_namespace",
    "-a": "agent_namespace",
    "--agent-namespace": "agent_namespace",
    "-l": "agent_log_level",
    "--agent-log-level": "agent_log_level",
    "-i": "agent_image",
    "--agent-image": "agent_image",
    "--agent-ttl": "agent_ttl",
    "--agent-startup-timeout": "agent_startup_timeout",
    "-f": "config_file",
    "--config-file": "config_file",
    "--fs-mode": "fs_mode",
    "-s": "env_include",
    "--override-env-vars-include": "env_include",
    "-x": "env_exclude",
    "--override-env-vars-exclude": "env_exclude",
    "--skip-processes": "skip_processes",
    "-c": "accept_invalid_certificates",
    "--accept-invalid-certificates": "accept_invalid_certificates",
    "--context": "context",
    "--env-file": "env_file",
}
FLAG_OPTIONS = {
    "-e": "ephemeral",
    "--ephemeral-container": "ephemeral",
    "--rw": "rw",
    "--no-remote-dns": "no_remote_dns",
    "--syscalls": "syscalls",
    "--steal": "steal",
    "--no-outgoing": "no_outgoing",
    "--no-tcp-outgoing": "no_tcp_outgoing",
    "--no-udp-outgoing": "no_udp_outgoing",
    "--no-telemetry": "no_telemetry",
    "--disable-version-check": "disable_version_check",
    "-q": "quiet",
    "--quiet": "quiet",
}
# keyword -> (smallest value): typer parses these as int with that minimum
INT_OPTIONS = {"agent_ttl": 0, "agent_startup_timeout": 1}
_DEFAULTS: dict[str, Any] = {
    **{key: None for key in VALUE_OPTIONS.values()},
    **{key: False for key in FLAG_OPTIONS.values()},
}
_OPTIONAL_VALUE = ("-c", "--accept-invalid-certificates")  # `-c` alone, or `-c=BOOL`
_CONFIG_FILE = ("-f", "--config-file")
DEFAULT_CONFIG_FILE = "./.mirrord/mirrord.json"  # what mirrord's `-f` alone means


def normalize_run_args(args: list[str]) -> list[str]:
    """mirrord's `-c` / `--accept-invalid-certificates` take an optional `=BOOL`: alone they
    mean true. Rewritten to the `--accept-invalid-certificates=VALUE` form typer parses; only
    among the options (before `--` or the command's first word). `-f` / `--config-file` with
    no value (last, or before `--` or another option) means `./.mirrord/mirrord.json`, as in
    mirrord."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or not arg.startswith("-"):
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if name in _OPTIONAL_VALUE:
            out.append(f"--accept-invalid-certificates={value if eq else 'true'}")
            i += 1
            continue
        if name in _CONFIG_FILE and not eq and (i + 1 >= len(args) or args[i + 1].startswith("-")):
            out.append(f"--config-file={DEFAULT_CONFIG_FILE}")
            i += 1
            continue
        out.append(arg)
        if name in VALUE_OPTIONS and not eq:
            if i + 1 < len(args):
                out.append(args[i + 1])
            i += 2
            continue
        i += 1
    return out


def parse_run_args(args: list[str]) -> dict[str, Any] | None:
    """`run_command` keywords for the arguments after `run`, or None: let typer parse them."""
    given: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            command = args[i + 1 :]
            if not command:
                return None
            return {**_DEFAULTS, **given, "command": command}
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in FLAG_OPTIONS and not eq:
            key = FLAG_OPTIONS[name]
            given_value: Any = True
            i += 1
        elif name in VALUE_OPTIONS:
            key = VALUE_OPTIONS[name]
            if not eq:
                if i + 1 >= len(args):
                    return None
                value = args[i + 1]
                i += 2
            else:
                i += 1
            if not value or value.startswith("-"):
                return None
            given_value = Path(value) if key == "config_file" else value
            if key in INT_OPTIONS:
                if not value.isdigit() or int(value) < INT_OPTIONS[key]:
                    return None  # typer's error message
                given_value = int(value)
        else:
            return None
        if key in given:
            return None
        given[key] = given_value
    return None


def _run_fast(kwargs: dict[str, Any]) -> NoReturn:
    # typer's own handling of what escapes a command, kept identical: typer.Exit (raised by
    # `fail`, which imports typer only then) -> its code; Ctrl-C -> 130; EPIPE -> 1, quietly.
    from mirrord.cli._runner import run_command

    try:
        code = run_command(**kwargs)
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # nothing more can reach the pipe
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        sys.exit(1)
    except Exception as exc:
        typer = sys.modules.get("typer")
        if typer is not None and isinstance(exc, typer.Exit):
            sys.exit(exc.exit_code)
        raise
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """End `mirrord run` once its session is closed, without the interpreter's teardown.

    By then everything `run` owns is done: the command has exited, the session is closed in
    the daemon, the control connection's reader has ended. What the teardown would add is
    freeing ~100 modules and their objects one by one, 5-10 ms of every `mirrord run` here
    (`docs/performance.md`), for memory the kernel frees at once. What an exit must still do
    is done first: the atexit handlers run (a cold start's config check imports logging, whose
    handler flushes its handlers), and mirrord's own output is flushed."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _open_std_fds() -> None:
    """Put /dev/null on stdin, stdout or stderr when the caller closed it (`2>&-`, some CI
    runners and service managers). Otherwise Python has no sys.stderr and `print(file=None)`
    would send mirrord's messages to stdout, the user command would inherit a closed fd, and
    the first socket mirrord opens would take its number."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # os.open's fds are close-on-exec; CMD needs this one
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115


# Commands that resolve a config (file discovery, relative paths, env_file): they need the
# working directory.
_NEED_CWD = {"run", "exec", "ext", "verify-config", "ls"}


def _check_cwd(command: str) -> None:
    try:
        os.getcwd()
    except FileNotFoundError:
        print(
            f"mirrord: error: mirrord {command} needs the current directory, and it no longer "
            "exists (deleted or replaced since this shell entered it): `cd` into a directory "
            "and run again",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


def _internal_error(exc: BaseException) -> NoReturn:
    """The one place a bug of ours ends: one line saying so, the traceback kept in a file for
    the report (MIRRORD_DEBUG=1 prints it instead)."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(exc))
    if os.environ.get("MIRRORD_DEBUG"):
        sys.stderr.write(text)
        sys.exit(1)
    where = "(could not be saved)"
    try:
        fd, name = tempfile.mkstemp(prefix="mirrord-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        where = name
    except OSError:
        pass
    from mirrord.cli._progress import ProgressMode, progress_mode, write_error

    if sys.argv[1:2] == ["ext"] or progress_mode() is ProgressMode.JSON:
        # an IDE reads errors as mirrord's JSON line, and nothing else from stderr
        write_error(
            f"internal error ({type(exc).__name__}: {exc}); this is a bug in mirrord",
            help=f"Please report it with the traceback in {where}.",
        )
        sys.exit(1)
    print(
        f"mirrord: error: internal error ({type(exc).__name__}: {exc}); this is a bug in "
        f"mirrord: please report it with the traceback in {where}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)


def main() -> None:
    """The `mirrord` command."""
    _open_std_fds()
    argv = sys.argv[1:]
    try:
        if argv[:1] and argv[0] in _NEED_CWD:
            _check_cwd(argv[0])
        if argv[:1] == ["run"] or argv[:1] == ["exec"]:
            argv = [argv[0], *normalize_run_args(argv[1:])]
            sys.argv[1:] = argv
            kwargs = parse_run_args(argv[1:])
            if kwargs is not None:
                _run_fast(kwargs)
        from mirrord.cli._app import main as typer_main

        typer_main()
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling (while importing)
        sys.exit(130)
    except Exception as exc:
        _internal_error(exc)
