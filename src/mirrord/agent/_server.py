"""The agent process: listen, serve daemon connections, stop when the target or use ends.

Owns: building the `AgentContext` for the resolved target, the listener (unix socket or TCP),
one `DaemonSession` task per accepted connection (an exception in one never ends the agent),
the readiness line, and the three ways the agent ends on its own: the target process exits
(every daemon gets `Fatal(target_gone)`; exit status 3), no authenticated daemon connection
for `idle_timeout` seconds (status 0), or SIGTERM/SIGINT (status 0). The incoming code's
`IncomingService` (`_incoming.py`) runs as a task here and is closed last. It is loaded after
the ready line (its HTTP, HTTP/2 and TLS machinery is a sixth of the agent's imports), in a
worker thread while the loop serves the first daemon; a Subscribe waits for it. If it fails to
start, the agent serves everything else and answers Subscribe with ENOTSUP.
Does not own: argument parsing (`_cli.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat as stat_module
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.to_thread

from mirrord import __version__
from mirrord.agent._channel import IncomingHandler
from mirrord.agent._context import AgentContext
from mirrord.agent._dns import TargetResolver
from mirrord.agent._exceptions import AgentStartupError, BadArguments, TargetGone
from mirrord.agent._files import TargetRoot
from mirrord.agent._netns import NetnsRunner
from mirrord.agent._session import DaemonSession
from mirrord.agent._target import Target, wait_target_exit
from mirrord.agent._workers import BlockingWorkers
from mirrord.protocol import AGENT_PROTOCOL_VERSION

if TYPE_CHECKING:
    from mirrord.agent._incoming import IncomingService

__all__ = ["AgentOptions", "AgentServer", "run_agent"]

log = logging.getLogger("mirrord.agent")

_IDLE_POLL = 0.2
# Connections that have not authenticated yet, at once: more are closed at accept. Each holds
# at most HELLO_LIMIT bytes for at most HANDSHAKE_TIMEOUT; before, any number each buffered a
# whole frame (2.3 MB measured).
MAX_HANDSHAKING = 32
_REFUSED_LOG_EVERY = 100


@dataclass
class AgentOptions:
    target: Target
    listen: str
    secret: str
    idle_timeout: float = 60.0
    connect_timeout: float = 15.0
    ready_fd: int | None = None  # --ready-fd: the ready line is written there too, then closed


def _incoming_service_class() -> type[IncomingService]:
    from mirrord.agent._incoming import IncomingService

    return IncomingService


class _Stop(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AgentServer:
    def __init__(self, options: AgentOptions, ctx: AgentContext) -> None:
        self.options = options
        self.ctx = ctx
        self.secret = options.secret
        self.sessions: set[DaemonSession] = set()
        self.incoming: IncomingHandler | None = None
        self.incoming_settled = anyio.Event()  # the incoming service started, or failed to
        self.workers = BlockingWorkers()  # the channels' file I/O
        self._idle_since = time.monotonic()
        self.listen_address = options.listen
        self.handshaking = 0  # connections accepted that have not authenticated (yet)
        self.refused_handshakes = 0

    def __repr__(self) -> str:
        return f"<AgentServer target={self.ctx.target.spec} sessions={len(self.sessions)}>"

    def session_started(self, session: DaemonSession) -> None:
        self.sessions.add(session)

    def session_ended(self, session: DaemonSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle_since = time.monotonic()

    async def _listen(self) -> list[anyio.abc.SocketListener]:
        kind, _, where = self.options.listen.partition(":")
        if kind == "unix" and where:
            path = Path(where)
            with contextlib.suppress(FileNotFoundError):
                if stat_module.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()  # a stale socket of an earlier agent
            listener = await anyio.create_unix_listener(path, mode=0o600)
            self.listen_address = f"unix:{path}"
            return [listener]
        if kind == "tcp" and where:
            host, sep, port = where.rpartition(":")
            if not sep or not port.isdigit():
                raise BadArguments(f"--listen {self.options.listen!r}: use tcp:HOST:PORT")
            host = host.strip("[]") or "0.0.0.0"
            tcp = await anyio.create_tcp_listener(local_host=host, local_port=int(port))
            sockname = tcp.listeners[0].extra(anyio.abc.SocketAttribute.local_address)
            self.listen_address = f"tcp:{host}:{sockname[1]}"
            return [ln for ln in tcp.listeners if isinstance(ln, anyio.abc.SocketListener)]
        raise BadArguments(
            f"--listen {self.options.listen!r} is not valid: use unix:/path/to.sock or tcp:HOST:PORT"
        )

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        try:
            peer = str(stream.extra(anyio.abc.SocketAttribute.remote_address, "?")) or "unix"
        except Exception:
            peer = "?"
        if self.handshaking >= MAX_HANDSHAKING:
            self.refused_handshakes += 1
            if self.refused_handshakes % _REFUSED_LOG_EVERY == 1:
                log.warning(
                    "refused a connection from %s: %d connections are authenticating already "
                    "(%d refused so far)",
                    peer or "unix",
                    self.handshaking,
                    self.refused_handshakes,
                )
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return
        try:
            await DaemonSession(self, stream, peer or "unix").serve()
        except Exception as exc:
            # One connection's failure is that connection's, never the agent's.
            log.error("daemon connection from %s failed: %r", peer, exc, exc_info=exc)

    async def _accept_loop(
        self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # e.g. EMFILE: the connections already served go on; retry shortly.
                log.error("cannot accept a daemon connection: %s", exc)
                await anyio.sleep(0.5)
                continue
            tg.start_soon(self._handle, stream)

    async def _watch_target(self) -> None:
        await wait_target_exit(self.ctx.pid)
        message = (
            f"target {self.ctx.target.description} exited; the agent stops with it "
            "(start the session again against a running target)"
        )
        # Tell every daemon why before the sessions are torn down.
        with anyio.move_on_after(3):
            for session in list(self.sessions):
                await session.send_fatal("target_gone", message)
        raise _Stop(TargetGone.exit_code, message)

    async def _watch_idle(self) -> None:
        limit = self.options.idle_timeout
        while True:
            await anyio.sleep(_IDLE_POLL)
            if not self.sessions and time.monotonic() - self._idle_since >= limit:
                raise _Stop(0, f"no daemon connection for {limit:g} s (idle timeout); exiting")

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                raise _Stop(0, f"stopping on {signal.Signals(signum).name}")

    async def _run_incoming(self) -> None:
        """Load and run the incoming service, after the ready line; if it fails, the agent
        goes on serving everything else and answers Subscribe with ENOTSUP. Its module is
        imported in a worker thread, so the loop serves the first daemon meanwhile."""
        try:
            service_class = await anyio.to_thread.run_sync(_incoming_service_class)
            service = service_class(self.ctx)

            async def run_service(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                await service.run(task_status=task_status)

            async with anyio.create_task_group() as tg:
                await tg.start(run_service)
                self.incoming = service
                self.incoming_settled.set()
                log.info("incoming traffic service started")
        except Exception as exc:
            log.error("incoming traffic is unavailable: %r", exc, exc_info=exc)
            self.incoming = None
        finally:
            self.incoming_settled.set()

    def _tell_ready(self, line: str) -> None:
        fd, self.options.ready_fd = self.options.ready_fd, None
        if fd is None:
            return
        try:
            os.write(fd, f"{line}\n".encode())  # a pipe: a line this short is written whole
        except OSError as exc:
            log.warning("cannot write the ready line to --ready-fd %d: %s", fd, exc.strerror)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def serve(self) -> int:
        listeners = await self._listen()
        self.workers.bind()
        code = 0
        try:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_signals)
                    tg.start_soon(self._watch_target)
                    tg.start_soon(self._watch_idle)
                    ready = (
                        f"mirrord-agent ready version={__version__} "
                        f"protocol={AGENT_PROTOCOL_VERSION} listen={self.listen_address}"
                    )
                    print(ready, flush=True)
                    self._tell_ready(ready)
                    tg.start_soon(self._run_incoming)
                    for listener in listeners:
                        tg.start_soon(self._accept_loop, listener, tg)
            except* _Stop as group:
                stop = group.exceptions[0]
                assert isinstance(stop, _Stop)
                code = stop.code
                if code:
                    print(f"mirrord-agent: error: {stop.message}", file=sys.stderr, flush=True)
                else:
                    print(f"mirrord-agent: {stop.message}", file=sys.stderr, flush=True)
        finally:
            self.workers.close()
            with anyio.CancelScope(shield=True):
                if self.incoming is not None and hasattr(self.incoming, "aclose"):
                    with anyio.move_on_after(10):
                        await self.incoming.aclose()
                for listener in listeners:
                    await listener.aclose()
            if self.listen_address.startswith("unix:"):
                with contextlib.suppress(OSError):
                    os.unlink(self.listen_address[5:])
        return code


async def run_agent(options: AgentOptions) -> int:
    """Serve until the agent ends; returns the exit status. Raises AgentStartupError."""
    try:
        root = TargetRoot(options.target.pid)
    except OSError as exc:
        raise AgentStartupError(
            f"cannot open the root of {options.target.description}: {exc.strerror}; the agent "
            "needs root (CAP_SYS_ADMIN, CAP_SYS_PTRACE) and the host's /proc"
        ) from None
    netns = NetnsRunner(options.target.pid)
    try:
        try:
            await anyio.to_thread.run_sync(netns.check)
        except OSError as exc:
            raise AgentStartupError(
                f"cannot enter the namespaces of {options.target.description}: {exc}; the agent "
                "needs CAP_SYS_ADMIN and the host's /proc"
            ) from None
        ctx = AgentContext(
            target=options.target,
            root=root,
            netns=netns,
            resolver=TargetResolver(root),
            connect_timeout=options.connect_timeout,
        )
        return await AgentServer(options, ctx).serve()
    finally:
        netns.close()
        root.close()
