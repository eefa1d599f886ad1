"""`mirrordd`'s entry point: arguments, the pid lock, logging, and running the daemon on asyncio.

Owns: making sure only one daemon serves a runtime directory (an exclusive `flock` on
`mirrordd.pid`, held for the daemon's life) and where it logs (stderr, which the launcher
points at `mirrordd.log`). Does not own what the daemon does (`_daemon`).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import resource
import sys
from pathlib import Path

import anyio

from mirrord._loop import asyncio_options
from mirrord._malloc import tune_malloc
from mirrord.daemon._daemon import DEFAULT_IDLE_TIMEOUT, Daemon
from mirrord.daemon._exceptions import DaemonError
from mirrord.daemon._runtime import RuntimePaths, runtime_paths

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrordd",
        description="The mirrord daemon: sessions, agents and relaying (started by `mirrord run`).",
    )
    parser.add_argument(
        "--runtime-dir",
        type=Path,
        default=None,
        help="default: $MIRRORD_RUNTIME_DIR, else $XDG_RUNTIME_DIR/mirrord, else ~/.mirrord",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="exit after this many seconds without sessions (0: with the last session)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--standby-agent",
        metavar="TARGET",
        help="start the agent for this target at once, ahead of its first session, if it is "
        "a local target and the daemon runs as root (`mirrord run` passes its -t target)",
    )
    return parser


def _lock(paths: RuntimePaths) -> int:
    fd = os.open(paths.pid_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        sys.exit(f"mirrordd: another daemon (pid {other}) already serves {paths.root}")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _remove_stale_agent_files(paths: RuntimePaths) -> None:
    """Sockets and secrets of the agents of a daemon that was killed (`agent-<its pid>-N.*`).
    We hold the pid lock, so no other daemon uses this directory; its agents died with it
    (pdeathsig). Their logs stay: they may say why it died."""
    for path in paths.root.glob("agent-*-*.*"):
        if path.suffix in (".sock", ".secret") and not path.name.startswith(
            f"agent-{os.getpid()}-"
        ):
            path.unlink(missing_ok=True)


def _raise_fd_limit() -> None:
    """Every layer connection and relayed connection is an fd: use the hard limit (capped)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    paths = RuntimePaths(args.runtime_dir) if args.runtime_dir else runtime_paths()
    try:
        paths.ensure()
    except DaemonError as exc:
        sys.exit(f"mirrordd: {exc}")
    lock_fd = _lock(paths)
    _remove_stale_agent_files(paths)
    _raise_fd_limit()
    tune_malloc()  # frames up to 2 MiB come from the heap, not a fresh mmap each
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    daemon = Daemon(paths, idle_timeout=args.idle_timeout, standby_agent=args.standby_agent)
    try:
        anyio.run(daemon.run, backend="asyncio", backend_options=asyncio_options())
    except KeyboardInterrupt:
        pass
    except DaemonError as exc:  # a startup failure the user can fix; the client shows it
        sys.exit(f"mirrordd: {exc}")
    finally:
        os.close(lock_fd)
