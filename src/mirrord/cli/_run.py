"""`mirrord run [OPTIONS] -- CMD [ARGS]` (alias `mirrord exec`): run CMD as if in the target.

Owns: the command's options (mirrord's names) and their typer declaration. What the command does
is `_runner.run_command` (also called by the fast path in `_main.py`, which must parse these
options exactly as typer does). Does not own the session (the daemon) or the layer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mirrord.cli._app import app
from mirrord.cli._runner import run_command

__all__ = ["run_command"]

TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        "-t",
        help="What to impersonate: pid/N, container/ID, pod/NAME, "
        "deployment/NAME, ... (or `target` in the config file).",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config-file", "-f", help="mirrord config file (.json, .toml, .yaml).", show_default=False
    ),
]
StealOpt = Annotated[
    bool, typer.Option("--steal", help="Steal incoming traffic instead of mirroring it.")
]
FsModeOpt = Annotated[
    str | None,
    typer.Option("--fs-mode", help="local, localwithoverrides, read or write.", show_default=False),
]
IncludeOpt = Annotated[
    str | None,
    typer.Option(
        "--override-env-vars-include",
        "-s",
        help="Only these remote env vars ('A;B*').",
        show_default=False,
    ),
]
ExcludeOpt = Annotated[
    str | None,
    typer.Option(
        "--override-env-vars-exclude",
        "-x",
        help="All remote env vars except these ('A;B*').",
        show_default=False,
    ),
]
NoOutgoingOpt = Annotated[
    bool, typer.Option("--no-outgoing", help="Outgoing connections stay local.")
]
NoDnsOpt = Annotated[bool, typer.Option("--no-remote-dns", help="DNS stays local.")]
SyscallsOpt = Annotated[
    bool,
    typer.Option(
        "--syscalls",
        help="Run CMD under the system-call supervisor (seccomp), for programs that bypass "
        "libc: static binaries, Go (experimental; `experimental.syscall_supervisor`).",
    ),
]
CommandArg = Annotated[
    list[str] | None, typer.Argument(help="The command to run, after `--`.", show_default=False)
]

# Options end at `--` or at the command's first word (`mirrord run -t T python3 -c x` works);
# an unknown option before that is a usage error, never taken for the command.
_CONTEXT = {"allow_interspersed_args": False}


@app.command("run", context_settings=_CONTEXT)
def run(
    *,
    target: TargetOpt = None,
    config_file: ConfigOpt = None,
    steal: StealOpt = False,
    fs_mode: FsModeOpt = None,
    env_include: IncludeOpt = None,
    env_exclude: ExcludeOpt = None,
    no_outgoing: NoOutgoingOpt = False,
    no_remote_dns: NoDnsOpt = False,
    syscalls: SyscallsOpt = False,
    command: CommandArg = None,
) -> None:
    """Run CMD on this machine as if it ran in the target: its env, files, DNS, network and
    incoming traffic. Exits with CMD's exit code."""
    code = run_command(
        command=list(command or []),
        target=target,
        config_file=config_file,
        steal=steal,
        fs_mode=fs_mode,
        env_include=env_include,
        env_exclude=env_exclude,
        no_outgoing=no_outgoing,
        no_remote_dns=no_remote_dns,
        syscalls=syscalls,
    )
    sys.stdout.flush()
    raise typer.Exit(code)


app.command("exec", context_settings=_CONTEXT, help="The same as `mirrord run`.")(run)
