"""Errors of the daemon and of its clients, classified by who is at fault.

Owns: the exception types the daemon, its agent backends (local and Kubernetes) and the CLI's
control client raise. Each message is built in `__init__` (or given by the raiser) and says
what happened and what to do. Does not own: protocol errors (see `mirrord.protocol`).
"""

from __future__ import annotations

__all__ = [
    "AgentLost",
    "AgentStartError",
    "BadRequest",
    "ConfigRefused",
    "ControlError",
    "DaemonBug",
    "DaemonDisconnected",
    "DaemonError",
    "DaemonNotRunning",
    "DaemonStopping",
    "NoTarget",
    "RootRequired",
    "SessionNotFound",
    "TargetNotSupported",
    "UntrustedDaemon",
    "error_for_code",
]


class DaemonError(Exception):
    """Base of the daemon's errors. `code` is a short machine-readable reason that crosses the
    control API; `str(exc)` is the message for the user."""

    code = "daemon_error"

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # one line per problem, when there are several (config)
        self.errors: list[str] = list(errors or [])


class BadRequest(DaemonError):
    """A control request the daemon cannot read or act on (not UTF-8, not JSON, nested too
    deeply, a line over the limit, a parameter of the wrong type): the client's error, never a
    bug of the daemon. The message names what is wrong."""

    code = "bad_request"


class DaemonBug(DaemonError):
    """The daemon failed where it should not have: a bug in mirrord. The message names the
    daemon's log to report it with."""

    code = "internal"


class DaemonStopping(DaemonError):
    """The daemon is shutting down and opens no session: start a new daemon once it is gone
    (the CLI waits for it and asks again)."""

    code = "daemon_stopping"

    def __init__(self) -> None:
        super().__init__("the mirrord daemon is shutting down")


class ConfigRefused(DaemonError):
    """The session's configuration is invalid or cannot be used (the user's config): the
    message, and `errors` when there are several, say what to change."""

    code = "config_error"


class AgentStartError(DaemonError):
    """The agent for a target could not be started or reached (the user's setup: a wrong
    target, missing permissions, an unreachable cluster). The message says what to check.
    Agent backends raise this (or a subclass) from `start_agent()` and `connect()`."""

    code = "agent_start_failed"


class RootRequired(AgentStartError):
    """Local targets need root: the agent enters the target's namespaces and edits rules."""

    code = "root_required"

    def __init__(self, target: str) -> None:
        super().__init__(
            f"target {target} is a process on this machine: its agent must run as root (it enters "
            "the target's namespaces and edits firewall rules). Run mirrord as root (for example "
            "`sudo -E mirrord run ...`), or pick a Kubernetes target."
        )


class NoTarget(AgentStartError):
    """No target given and no cluster to run a targetless agent in (the user's input)."""

    code = "no_target"

    def __init__(self, kubeconfig: str) -> None:
        super().__init__(
            "no target: use `-t pid/N`, `-t container/ID`, or a cluster target (`-t "
            f"deployment/NAME`, `-t pod/NAME`, ...; no kubeconfig at {kubeconfig} for a "
            "targetless session)"
        )


class TargetNotSupported(DaemonError):
    """No agent backend handles this target string (the user's input)."""

    code = "target_not_supported"

    def __init__(self, target: str, known: list[str]) -> None:
        super().__init__(
            f"no agent backend handles target {target!r} (backends: {', '.join(known) or 'none'}); "
            "use pid/N or container/ID for a local target, or a Kubernetes target like "
            "pod/NAME or deployment/NAME"
        )


class SessionNotFound(DaemonError):
    """A session id the daemon does not know (closed, or from a previous daemon)."""

    code = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is not open in this daemon (it was closed, or the daemon "
            "restarted): start the command again with `mirrord run`"
        )


class AgentLost(DaemonError):
    """The agent connection of a session broke; the session's remote fds now fail with EIO."""

    code = "agent_lost"


class ChannelLost(AgentLost):
    """A request to the agent got no reply: its channel closed, or the agent was lost, first
    (the layer sees EIO)."""


class ControlError(DaemonError):
    """The control API answered with an error, or spoke something we cannot read."""

    code = "control_error"


class DaemonDisconnected(ControlError):
    """The daemon closed the control connection before it answered (it exited or crashed):
    the CLI asks a new daemon once, else the message points at the daemon's log."""

    code = "disconnected"


class DaemonNotRunning(ControlError):
    """No daemon answers on the control socket."""

    code = "daemon_not_running"

    def __init__(self, socket_path: str) -> None:
        super().__init__(
            f"no mirrord daemon answers on {socket_path}: start one with `mirrord daemon start` "
            "(`mirrord run` starts it by itself)"
        )


class UntrustedDaemon(ControlError):
    """What answers on the control socket is not this user's mirrord daemon of this install (a
    process of another user, or something else listening there): nothing it says is used, and
    no command is run with what it would hand out. The message names the process to stop."""

    code = "untrusted_daemon"


def _subclasses(cls: type[DaemonError]) -> list[type[DaemonError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def error_for_code(code: str, message: str, errors: list[str] | None = None) -> DaemonError:
    """The error a control answer names by `code` (the most general class with that code),
    with the daemon's message: how an error crosses the control API back into its kind.
    A code this version does not know is a `ControlError`."""
    for cls in _subclasses(DaemonError):
        if cls.code == code:
            exc = cls.__new__(cls)
            DaemonError.__init__(exc, message, errors)
            return exc
    return ControlError(message, errors)
