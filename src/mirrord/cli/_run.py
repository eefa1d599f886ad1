"""`mirrord run [OPTIONS] -- CMD [ARGS]` (alias `mirrord exec`): run CMD as if in the target.

Owns: the command's options (mirrord's names) and their typer declaration. What the command does
is `_runner.run_command` (also called by the fast path in `_main.py`, which must parse these
options exactly as typer does). Does not own the session (the daemon) or the layer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mirrord.cli._app import app
from mirrord.cli._runner import run_command

__all__ = ["run_command"]


def _opt(*names: str, help: str, **kw: object) -> Any:
    return typer.Option(*names, help=help, show_default=False, **kw)  # type: ignore[arg-type]


# mirrord 3.250's `exec` options, with their meanings here. Keep `_main.py`'s fast-path tables
# (`VALUE_OPTIONS`, `FLAG_OPTIONS`, `INT_OPTIONS`) in step: tests/cli/test_fast_path.py checks.
TargetOpt = Annotated[
    str | None,
    _opt(
        "--target",
        "-t",
        help="What to impersonate: pid/N, container/ID, pod/NAME (or pod/NAME/container/C), "
        "deployment/NAME, ..., targetless (or `target` in the config file).",
    ),
]
TargetNsOpt = Annotated[
    str | None, _opt("--target-namespace", "-n", help="Namespace of the target.")
]
AgentNsOpt = Annotated[
    str | None, _opt("--agent-namespace", "-a", help="Namespace of the agent Job/pod.")
]
AgentLogOpt = Annotated[
    str | None,
    _opt("--agent-log-level", "-l", help="Agent log level: trace, debug, info, warn, error."),
]
AgentImageOpt = Annotated[str | None, _opt("--agent-image", "-i", help="Agent container image.")]
AgentTtlOpt = Annotated[
    int | None,
    _opt("--agent-ttl", help="Seconds the agent Job is kept after the agent exits.", min=0),
]
AgentStartupOpt = Annotated[
    int | None,
    _opt("--agent-startup-timeout", help="Seconds to wait for the agent to be ready.", min=1),
]
EphemeralOpt = Annotated[
    bool,
    _opt("--ephemeral-container", "-e", help="Run the agent in an ephemeral container."),
]
ConfigOpt = Annotated[
    Path | None,
    _opt(
        "--config-file",
        "-f",
        help="mirrord config file (.json, .toml, .yaml); alone: ./.mirrord/mirrord.json.",
    ),
]
FsModeOpt = Annotated[
    str | None, _opt("--fs-mode", help="Files: local, localwithoverrides, read or write.")
]
RwOpt = Annotated[bool, _opt("--rw", help="Read-write remote files (--fs-mode write).")]
IncludeOpt = Annotated[
    str | None,
    _opt("--override-env-vars-include", "-s", help="Only these remote env vars ('A;B*')."),
]
ExcludeOpt = Annotated[
    str | None,
    _opt("--override-env-vars-exclude", "-x", help="All remote env vars except these ('A;B*')."),
]
NoDnsOpt = Annotated[bool, _opt("--no-remote-dns", help="DNS stays local.")]
SkipOpt = Annotated[
    str | None,
    _opt("--skip-processes", help="Programs the layer does not load into ('a;b')."),
]
CertsOpt = Annotated[
    str | None,
    _opt(
        "--accept-invalid-certificates",
        "-c",
        help="Accept an API server certificate that does not verify (`-c` alone: true; "
        "`-c=false` refuses it).",
        metavar="=BOOL",
    ),
]
StealOpt = Annotated[bool, _opt("--steal", help="Steal incoming traffic instead of mirroring it.")]
NoOutgoingOpt = Annotated[bool, _opt("--no-outgoing", help="Outgoing TCP and UDP stay local.")]
NoTcpOpt = Annotated[bool, _opt("--no-tcp-outgoing", help="Outgoing TCP stays local.")]
NoUdpOpt = Annotated[bool, _opt("--no-udp-outgoing", help="Outgoing UDP stays local.")]
NoTelemetryOpt = Annotated[
    bool, _opt("--no-telemetry", help="Accepted for mirrord's scripts: there is no telemetry.")
]
NoVersionCheckOpt = Annotated[
    bool,
    _opt(
        "--disable-version-check",
        help="Accepted for mirrord's scripts: there is no version check.",
    ),
]
ContextOpt = Annotated[str | None, _opt("--context", help="Kube context of the kubeconfig.")]
EnvFileOpt = Annotated[
    str | None,
    _opt("--env-file", help=".env file whose variables override the target's."),
]
QuietOpt = Annotated[bool, _opt("--quiet", "-q", help="No progress lines (errors still).")]
CommandArg = Annotated[
    list[str] | None, typer.Argument(help="The command to run, after `--`.", show_default=False)
]

# Options end at `--` or at the command's first word (`mirrord run -t T python3 -c x` works);
# an unknown option before that is a usage error, never taken for the command.
_CONTEXT = {"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]}


@app.command("run", context_settings=_CONTEXT)
def run(
    *,
    target: TargetOpt = None,
    target_namespace: TargetNsOpt = None,
    agent_namespace: AgentNsOpt = None,
    agent_log_level: AgentLogOpt = None,
    agent_image: AgentImageOpt = None,
    agent_ttl: AgentTtlOpt = None,
    agent_startup_timeout: AgentStartupOpt = None,
    ephemeral: EphemeralOpt = False,
    config_file: ConfigOpt = None,
    fs_mode: FsModeOpt = None,
    rw: RwOpt = False,
    env_include: IncludeOpt = None,
    env_exclude: ExcludeOpt = None,
    no_remote_dns: NoDnsOpt = False,
    skip_processes: SkipOpt = None,
    accept_invalid_certificates: CertsOpt = None,
    steal: StealOpt = False,
    no_outgoing: NoOutgoingOpt = False,
    no_tcp_outgoing: NoTcpOpt = False,
    no_udp_outgoing: NoUdpOpt = False,
    no_telemetry: NoTelemetryOpt = False,
    disable_version_check: NoVersionCheckOpt = False,
    context: ContextOpt = None,
    env_file: EnvFileOpt = None,
    quiet: QuietOpt = False,
    command: CommandArg = None,
) -> None:
    """Run CMD on this machine as if it ran in the target: its env, files, DNS, network and
    incoming traffic. Exits with CMD's exit code."""
    code = run_command(
        command=list(command or []),
        target=target,
        target_namespace=target_namespace,
        agent_namespace=agent_namespace,
        agent_log_level=agent_log_level,
        agent_image=agent_image,
        agent_ttl=agent_ttl,
        agent_startup_timeout=agent_startup_timeout,
        ephemeral=ephemeral,
        config_file=config_file,
        fs_mode=fs_mode,
        rw=rw,
        env_include=env_include,
        env_exclude=env_exclude,
        no_remote_dns=no_remote_dns,
        skip_processes=skip_processes,
        accept_invalid_certificates=accept_invalid_certificates,
        steal=steal,
        no_outgoing=no_outgoing,
        no_tcp_outgoing=no_tcp_outgoing,
        no_udp_outgoing=no_udp_outgoing,
        no_telemetry=no_telemetry,
        disable_version_check=disable_version_check,
        context=context,
        env_file=env_file,
        quiet=quiet,
    )
    sys.stdout.flush()
    raise typer.Exit(code)


app.command("exec", context_settings=_CONTEXT, help="The same as `mirrord run`.")(run)
