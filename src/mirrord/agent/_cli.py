"""The `mirrord-agent` command line (docs/agent.md, "Command line").

Owns: parsing arguments, reading the secret, logging setup, running the agent on trio and
turning startup errors into one `mirrord-agent: error: ...` line and an exit status
(2 bad arguments, 3 target not found or gone, 1 other startup failures, 0 idle/signal).
Does not own: serving (`_server.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
from collections.abc import Sequence

import anyio

from mirrord._malloc import tune_malloc
from mirrord.agent._exceptions import AgentStartupError, BadArguments
from mirrord.agent._server import AgentOptions, run_agent
from mirrord.agent._target import resolve_target

__all__ = ["main"]

SECRET_ENV = "MIRRORD_AGENT_SECRET"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mirrord-agent",
        description="Serve a target's files, environment, DNS and network to mirrord daemons.",
    )
    p.add_argument("--target", required=True, help="pid/N or container/ID")
    p.add_argument("--listen", required=True, help="unix:/path/to.sock or tcp:HOST:PORT")
    p.add_argument(
        "--secret-file", help=f"file holding the per-agent secret (or set ${SECRET_ENV})"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="exit after this many seconds without a daemon connection (default 60)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=15.0,
        help="timeout of outgoing connects, seconds (default 15)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--standby",
        action="store_true",
        help="load the agent's code, then wait for the session's settings on stdin: one JSON "
        'line {"idle_timeout": SECONDS} (the daemon starts one ahead of its first session); '
        "stdin's end without it: exit 0",
    )
    p.add_argument(
        "--ready-fd",
        type=int,
        help="an inherited file descriptor (a pipe) the ready line is also written to, then "
        "closed: whoever started the agent learns it is ready, or gone, without polling",
    )
    return p


def _secret(args: argparse.Namespace) -> str:
    if args.secret_file:
        try:
            with open(args.secret_file) as f:
                secret = f.read().strip()
        except OSError as exc:
            raise BadArguments(
                f"cannot read --secret-file {args.secret_file}: {exc.strerror}"
            ) from None
    else:
        secret = os.environ.get(SECRET_ENV, "").strip()
    if not secret:
        raise BadArguments(
            f"no agent secret: pass --secret-file PATH (a non-empty file) or set ${SECRET_ENV}"
        )
    return secret


def _keep_ready_fd(fd: int) -> None:
    """--ready-fd: not passed on to what the agent starts (so that it closes when the agent
    exits, and whoever waits on it sees the end); an fd that is not open is an error."""
    try:
        os.set_inheritable(fd, False)
    except OSError as exc:
        raise BadArguments(f"--ready-fd {fd}: {exc.strerror}") from None


def _raise_fd_limit() -> None:
    # Every handle and relayed connection of every channel is an fd; the usual soft limit
    # (1024) is too low for many sessions. Raising it up to the hard limit needs no privilege.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _await_settings(args: argparse.Namespace) -> None:
    """--standby: the session's idle timeout from stdin (a line of JSON), set on `args`.
    Meanwhile the incoming service's code is loaded too (the agent otherwise loads it after
    its ready line). Exits 0 when stdin ends without it."""
    with contextlib.suppress(ImportError):
        import anyio._backends._trio  # noqa: F401  # what anyio.run(backend="trio") loads

        import mirrord.agent._incoming  # noqa: F401
    line = sys.stdin.readline()
    if not line.strip():
        sys.exit(0)  # the daemon went, or needs no agent after all
    try:
        args.idle_timeout = float(json.loads(line)["idle_timeout"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadArguments(f"--standby: no settings on stdin ({exc!r}): {line[:200]!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("mirrord-agent: %(levelname_lower)s: %(message)s"))
    logger = logging.getLogger("mirrord.agent")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    logger.propagate = False
    _raise_fd_limit()
    tune_malloc()  # frames up to 2 MiB come from the heap, not a fresh mmap each
    try:
        if args.standby:
            _await_settings(args)
        if args.idle_timeout <= 0 or args.connect_timeout <= 0:
            raise BadArguments("--idle-timeout and --connect-timeout must be positive")
        if args.ready_fd is not None:
            _keep_ready_fd(args.ready_fd)
        options = AgentOptions(
            target=resolve_target(args.target),
            listen=args.listen,
            secret=_secret(args),
            idle_timeout=args.idle_timeout,
            connect_timeout=args.connect_timeout,
            ready_fd=args.ready_fd,
        )
        code = anyio.run(run_agent, options, backend="trio")
    except AgentStartupError as exc:
        print(f"mirrord-agent: error: {exc.message}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    sys.exit(code)
