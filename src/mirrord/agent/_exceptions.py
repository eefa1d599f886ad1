"""Errors of the agent, classified by who is at fault and what the caller does with them.

- `AgentStartupError` and its subclasses end the agent before or instead of serving: the CLI
  prints `mirrord-agent: error: <message>` and exits with `exit_code` (docs/agent.md: 2 bad arguments,
  3 target not found or gone).
- Errors of one request are never exceptions that leave a handler: they are `OSError`s whose
  errno goes to the daemon in an `ErrorReply` (see `_channel.py`).
"""

from __future__ import annotations

__all__ = [
    "AgentStartupError",
    "BadArguments",
    "SubscribeError",
    "TargetGone",
    "TargetNotFound",
]


class AgentStartupError(Exception):
    """The agent cannot start or must stop; the message says what to check."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadArguments(AgentStartupError):
    """The command line or the secret is unusable: fix the invocation."""

    exit_code = 2


class TargetNotFound(AgentStartupError):
    """No process matches the target: check the pid or container id and that the agent sees
    the host's /proc (hostPID in Kubernetes)."""

    exit_code = 3


class TargetGone(AgentStartupError):
    """The target process exited while the agent served it; the sessions on it are over."""

    exit_code = 3


class SubscribeError(OSError):
    """A Subscribe the agent refuses (bad filter, port taken, no capability): errno and
    message go to the session as its `ErrorReply`; the session reports it to the user."""
