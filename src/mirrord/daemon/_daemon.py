"""mirrordd: the process. Control API server, layer socket server, session table, shutdown.

Owns: binding the control socket (`<runtime>/mirrordd.sock`, 0600) and the layer socket
(`<runtime>/layer.sock`, 0600), the session table, the control API (JSON lines, see
`docs/commands.md` "Control API"), status, and an orderly shutdown (sessions closed, agents
stopped, sockets removed). Does not own agents (the pool), agent streams (links) or layer
connections (`_session`).

Control API: JSON lines, one request each, answered in turn; events between the answers
(the messages and their encoding: `_control.py`). A session belongs to the connection that
created it and is closed when that connection ends.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import SocketAttribute

from mirrord._frames import FrameWriter
from mirrord._loop import loop_name
from mirrord._malloc import trim_malloc
from mirrord._version import __version__
from mirrord.backend import AgentBackend
from mirrord.daemon._backend import backends_for_daemon, check_session_target
from mirrord.daemon._control import (
    Answer,
    CloseSession,
    ControlEvent,
    CreateSession,
    Done,
    ListSessions,
    ProgressEvent,
    Request,
    RequestId,
    SessionCreated,
    SessionIdle,
    SessionList,
    SessionStatistics,
    SessionStatus,
    Shutdown,
    ShutdownStarted,
    Status,
    StatusReport,
    WaitSession,
    encode_answer,
    encode_error,
    encode_event,
    read_line,
    request_from,
)
from mirrord.daemon._env import (
    check_layer_settings,
    fetch_remote_env,
    incoming_settings,
    layer_variables,
    merge_env,
    unset_names,
)
from mirrord.daemon._exceptions import (
    BadRequest,
    ConfigRefused,
    DaemonBug,
    DaemonError,
    DaemonStopping,
    SessionNotFound,
)
from mirrord.daemon._incoming_tls import agent_tls_warnings, subscribe_tls
from mirrord.daemon._layer_client import serve_layer_client
from mirrord.daemon._pool import AgentPool
from mirrord.daemon._runtime import RuntimePaths, peer_credentials, trusted_peer
from mirrord.daemon._session import Session, new_session_id

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "MAX_CONTROL_LINE",
    "MAX_CONTROL_UNREAD",
    "Daemon",
    "LineSplitter",
    "LineTooLong",
    "resolve_session_config",
]

log = logging.getLogger("mirrord.daemon")

DEFAULT_IDLE_TIMEOUT = 300.0  # config daemon.idle_timeout
# After a session closes, its relays end within about a second: then the heap is trimmed.
_TRIM_DELAY = 2.0
# How long `CloseSession` waits for the agent to end the session's steal subscriptions
# (`Session.subscriptions_ended`): one round trip each; bounded for a slow or dead agent.
_UNSUBSCRIBE_WAIT = 3.0
# wait_session (`mirrord ext`): a session whose processes are all gone is idle only if none
# registers within this many seconds (a launch's helper exits before the debuggee registers;
# seen under load with js-debug and debugpy in tests/ide)
IDLE_GRACE = 3.0
MAX_CONTROL_LINE = 8 * 1024 * 1024  # a config is small; this bounds a bad client's memory
MAX_CONTROL_INFLIGHT = 32  # unanswered requests one control connection may have
# Replies and events queued for a control client that does not read them; past this the
# connection is closed (a `status` reply is ~1 KiB per session: thousands of them fit).
MAX_CONTROL_UNREAD = 16 * 1024 * 1024


class LineTooLong(BadRequest):
    """A control request line longer than the limit (the sender's error)."""


class LineSplitter:
    """JSON lines out of a byte stream, in time linear in the bytes fed: each read is split
    once (in C), and a partial line is only appended to, never rescanned or copied per line.
    Empty lines are dropped. A line longer than `limit` raises `LineTooLong`; nothing more is
    read from that connection then."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._partial = bytearray()  # the start of a line whose newline has not come yet
        self.too_long = False

    def __repr__(self) -> str:
        return f"<LineSplitter partial={len(self._partial)} limit={self.limit}>"

    def feed(self, data: bytes) -> list[bytes]:
        end = data.find(b"\n")
        if end < 0:
            self._partial += data
            lines: list[bytes] = []
        else:
            parts = data[end + 1 :].split(b"\n")
            first = bytes(self._partial + data[:end])
            self._partial = bytearray(parts.pop())
            lines = [line for line in (first, *parts) if line]
        if len(self._partial) > self.limit or (lines and max(map(len, lines)) > self.limit):
            self.too_long = True
            raise LineTooLong(f"request line too long (the limit is {self.limit} bytes)")
        return lines


async def _preload_config() -> None:
    """Import the config package (pydantic, ~100 ms) in a worker thread while the daemon waits
    for its first session, instead of on the event loop when that session arrives."""
    import importlib

    await anyio.to_thread.run_sync(importlib.import_module, "mirrord.config")


def resolve_session_config(
    request: dict[str, Any],
) -> tuple[MirrordConfig, list[str], Path | None]:
    """A session's configuration from what the CLI was given: its config file, its flags
    (`cli_overrides`), its environment (MIRRORD_* and templates) and its working directory;
    with the warnings and the file used. Reads the file (run it in a worker thread). Raises
    `ConfigRefused` or `BadRequest`. The CLI calls it too, before it
    starts a daemon, so a bad config never starts one."""
    from mirrord.config import ConfigError, cli_overrides, resolve_config

    flags = request.get("flags") or {}
    env = request.get("env") or {}
    if not isinstance(flags, dict) or not isinstance(env, dict):
        raise DaemonError("create_session: config_request.flags and .env must be objects")
    config_file = request.get("config_file")
    cwd = Path(str(request.get("cwd") or "/"))
    try:
        resolved = resolve_config(
            str(config_file) if config_file else None,
            overrides=cli_overrides(**{str(k): v for k, v in flags.items()}),
            env={str(k): str(v) for k, v in env.items()},
            cwd=cwd,
        )
    except ConfigError as exc:
        raise ConfigRefused(str(exc), list(exc.errors)) from None
    except TypeError as exc:  # a flag this version does not know
        raise BadRequest(f"create_session: bad config_request flags ({exc})") from None
    config = resolved.config
    # The Kubernetes backend would read the daemon's own $KUBECONFIG (that of the command that
    # started the daemon, maybe in another terminal, long ago) and resolve a relative path
    # against the daemon's directory: this command's variable and directory count.
    kubeconfig = config.kubeconfig or str(env.get("KUBECONFIG") or "") or None
    if kubeconfig is not None:
        absolute = os.pathsep.join(
            str(cwd / p) if p and not p.startswith("~") else p for p in kubeconfig.split(os.pathsep)
        )
        if absolute != config.kubeconfig:
            config = config.model_copy(update={"kubeconfig": absolute})
    return config, list(resolved.warnings), resolved.source


def _config_model(config: dict[str, Any]) -> MirrordConfig:
    """The resolved config (its JSON dump) as the config package's model."""
    from mirrord.config import MirrordConfig

    try:
        return MirrordConfig.model_validate(config)
    except ValueError as exc:  # pydantic's ValidationError: a client of another version
        raise BadRequest(
            f"the daemon cannot use this session's configuration ({exc}); the daemon may come "
            "from another mirrord install: `mirrord daemon stop`, then run again"
        ) from None


class Daemon:
    def __init__(
        self,
        paths: RuntimePaths,
        backends: list[AgentBackend] | None = None,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        standby_agent: str | None = None,
    ) -> None:
        self.paths = paths
        self.idle_timeout = idle_timeout
        self.standby_agent = standby_agent  # a local target to start an agent for ahead
        self._idle_since: float | None = time.monotonic()
        self.backends = backends if backends is not None else backends_for_daemon(paths.root)
        self.sessions: dict[str, Session] = {}
        self.started = time.time()
        self.pool: AgentPool | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._shutdown = anyio.Event()
        self.layer_connections = 0
        self._build_id = ""
        self._layer_library = ""  # this install's layer: what the CLI checks sessions against
        self._starting = 0  # sessions being created: not idle (an agent start takes seconds)
        # When to give the heap's free memory back (`trim_malloc`): a moment after a session
        # closed, once its relays and buffers are gone.
        self._trim_at: float | None = None
        self.max_unread = MAX_CONTROL_UNREAD

    def __repr__(self) -> str:
        return f"<Daemon {self.paths.root} sessions={len(self.sessions)}>"

    # -- lifecycle

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        from mirrord.layer import build_id, library_path

        self._build_id = build_id()
        self._layer_library = str(library_path())
        log.info("event loop: %s", loop_name())
        self.paths.ensure()
        control = await _unix_listener(self.paths.control_socket)
        layer = await _unix_listener(self.paths.layer_socket)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self.pool = AgentPool(self.backends, tg)
                tg.start_soon(self.pool.watch)
                tg.start_soon(self._serve, control, self._control_client)
                tg.start_soon(self._serve, layer, self._layer_client)
                tg.start_soon(self._signals)
                tg.start_soon(self._idle_watch)
                tg.start_soon(_preload_config)
                if self.standby_agent:
                    for backend in self.backends:
                        start_standby = getattr(backend, "start_standby", None)
                        if start_standby is not None:
                            tg.start_soon(start_standby, self.standby_agent)
                log.info(
                    "mirrordd %s ready (pid %d) in %s", __version__, os.getpid(), self.paths.root
                )
                task_status.started()
                await self._shutdown.wait()
                log.info("mirrordd shutting down")
                for session in list(self.sessions.values()):
                    self._close_session(session, "the daemon is shutting down")
                with anyio.CancelScope(shield=True):
                    await self.pool.close_all()
                    for backend in self.backends:  # a backend's helper process, if it has one
                        aclose = getattr(backend, "aclose", None)
                        if aclose is not None:
                            await aclose()
                tg.cancel_scope.cancel()
        finally:
            for path in (self.paths.control_socket, self.paths.layer_socket):
                path.unlink(missing_ok=True)
            with anyio.CancelScope(shield=True):
                await control.aclose()
                await layer.aclose()

    def shutdown(self) -> None:
        self._shutdown.set()

    async def _drop_standby(self) -> None:
        for backend in self.backends:
            drop = getattr(backend, "drop_standby", None)
            if drop is not None:
                await drop()

    async def _shutdown_soon(self) -> None:
        await anyio.sleep(0.05)  # lets the reply to `shutdown` reach its client first
        self.shutdown()

    async def _idle_watch(self) -> None:
        """Exit after `idle_timeout` seconds without sessions (0: with the last session)."""
        while True:
            await anyio.sleep(0.5 if self.idle_timeout == 0 else 1.0)
            if self._trim_at is not None and time.monotonic() >= self._trim_at:
                self._trim_at = None
                trim_malloc()
            if self.sessions or self._starting:
                self._idle_since = None
                continue
            now = time.monotonic()
            if self._idle_since is None:
                self._idle_since = now
            if now - self._idle_since >= self.idle_timeout:
                log.info("no session for %gs (daemon.idle_timeout): exiting", self.idle_timeout)
                self.shutdown()
                return

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                self.shutdown()
                return

    async def _serve(self, listener: anyio.abc.SocketListener, handler: Any) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                except OSError as exc:  # EMFILE and the like: wait, do not spin
                    log.warning("accept failed: %s", exc)
                    await anyio.sleep(0.1)
                    continue
                tg.start_soon(handler, stream)

    # -- layer connections

    async def _layer_client(self, stream: anyio.abc.SocketStream) -> None:
        if _refused_peer(stream, "layer"):
            await stream.aclose()
            return
        self.layer_connections += 1
        try:
            await serve_layer_client(stream, self._build_id, self.sessions.get)
        except Exception:
            log.exception("layer connection failed")

    # -- sessions

    async def create_session(
        self,
        params: CreateSession,
        progress: Callable[[str], None],
        owner_events: Callable[[ControlEvent], None],
    ) -> Session:
        assert self.pool is not None
        warnings: list[str] = []
        request = params.config_request
        if request is not None:
            config, warnings, source = await anyio.to_thread.run_sync(
                resolve_session_config, request
            )
            if source is not None and not request.get("config_file"):
                where = Path(str(request.get("cwd") or "/"))
                found = "" if source.parent.parent == where else " (found in a parent folder)"
                progress(f"using the config file {source}{found}")
            target = str(config.target.path or "targetless")
        else:
            target = params.target
            config = _config_model(params.config)
        check_layer_settings(config)  # before an agent is started for it
        # HTTPS filtered steal: its certificate files are read and checked before any agent starts
        incoming_tls = await anyio.to_thread.run_sync(subscribe_tls, config, params.cwd)
        progress(f"opening a session on {target}")
        logging.getLogger("mirrord").setLevel(config.daemon.log_level.upper())
        self.idle_timeout = float(config.daemon.idle_timeout)
        client_pid = params.client_pid
        if request is not None:
            request_env = request.get("env")
            check_session_target(config, request_env if isinstance(request_env, dict) else {})
        mode, http_filter = incoming_settings(config)
        session_id = new_session_id()
        link = await self.pool.acquire(target, config, progress, session_id)
        session = Session(
            session_id=session_id,
            target=target,
            config=config,
            link=link,
            client_pid=client_pid,
            label=params.label,
            incoming_mode=mode,
            http_filter=http_filter,
        )
        session.incoming_tls = incoming_tls
        warnings += agent_tls_warnings(incoming_tls, link.conn.peer_features)
        self.sessions[session.id] = session
        session.subscribe_events(owner_events)
        session.warnings.extend(warnings)
        try:
            progress("reading the target's environment")
            remote = await fetch_remote_env(link, config, client_pid)
            session.env = merge_env(remote, config, cwd=params.cwd)
            session.env.update(
                layer_variables(
                    config,
                    socket_path=str(self.paths.layer_socket),
                    session_id=session.id,
                    debug=params.debug,
                )
            )
        except BaseException:
            self._close_session(session, "the session could not start")
            raise
        log.info("session %s opened on %s (%s)", session.id, target, link.handle.key)
        return session

    def _close_session(self, session: Session, reason: str) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        session.close(reason)
        if self.pool is not None:
            self.pool.release(session.link, session.id)
        self._trim_at = time.monotonic() + _TRIM_DELAY
        log.info("session %s closed: %s", session.id, reason)

    def status(self) -> dict[str, Any]:
        agents = [e.statistics() for e in self.pool.entries.values()] if self.pool else []
        sessions = [s.statistics() for s in self.sessions.values()]
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "started": self.started,
                "uptime": time.time() - self.started,
                "runtime_dir": str(self.paths.root),
                "build_id": self._build_id,
                "layer_library": self._layer_library,
                "layer_connections_total": self.layer_connections,
                "event_loop": loop_name(),
            },
            "sessions": sessions,
            "agents": agents,
            # a backend's helper process while it runs (the Kubernetes helper)
            "helpers": [
                {"backend": b.name, "pid": pid}
                for b in self.backends
                if (pid := getattr(b, "helper_pid", None)) is not None
            ],
            # an agent started with the daemon that its first session has not taken yet
            "standby_agents": [
                {"backend": b.name, **standby}
                for b in self.backends
                if (standby := getattr(b, "standby", None)) is not None
            ],
            "totals": {
                "sessions": len(sessions),
                "agents": len(agents),
                "channels": sum(s["channels"] for s in sessions),
                "bytes_to_agent": sum((a["link"] or {}).get("bytes_to_agent", 0) for a in agents),
                "bytes_to_user": sum((a["link"] or {}).get("bytes_to_user", 0) for a in agents),
            },
        }

    # -- control API

    async def _control_client(self, stream: anyio.abc.SocketStream) -> None:
        """One control connection. Its requests are served concurrently (answers carry the
        request's id), so the connection's end is seen while a request waits: a `mirrord ext`
        stopped by its IDE during `wait_session` closes its session at once. At the end, the
        waits still running are cancelled and the requests that change state (a session being
        created) finish, then the sessions the connection created are closed."""
        if _refused_peer(stream, "control"):
            await stream.aclose()
            return
        writer = FrameWriter(stream, "control")
        owned: set[str] = set()
        waits: set[anyio.CancelScope] = set()  # requests that only wait: cancelled at the end
        inflight = [0]
        lines = LineSplitter(MAX_CONTROL_LINE)
        overflow: list[str] = []  # why the connection is being closed by us, if it is

        def emit(line: bytes) -> None:
            writer.send_nowait(line)
            if writer.queued_bytes > self.max_unread and not overflow:
                # A client that asks and never reads would grow the daemon without bound.
                overflow.append(
                    f"{writer.queued_bytes} bytes of replies and events unread (the limit is "
                    f"{self.max_unread}): the client does not read its control connection"
                )
                scope.cancel()

        async def serve_one(line: bytes) -> None:
            try:
                await self._control_request(line, emit, owned, waits)
            finally:
                inflight[0] -= 1

        try:
            async with stream, anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                async with anyio.create_task_group() as requests:
                    with anyio.CancelScope() as scope:
                        await self._read_control(
                            stream,
                            lines=lines,
                            emit=emit,
                            overflow=overflow,
                            inflight=inflight,
                            start=lambda line: requests.start_soon(serve_one, line),
                        )
                    for wait in list(waits):
                        wait.cancel()
                if overflow:
                    log.warning("control connection closed: %s", overflow[0])
                writer.close()
                if not overflow or lines.too_long:
                    with anyio.move_on_after(2):
                        await writer.wait_flushed()
                tg.cancel_scope.cancel()
        finally:
            for sid in owned:
                session = self.sessions.get(sid)
                if session is not None:
                    self._close_session(session, "its mirrord command exited")

    async def _read_control(
        self,
        stream: anyio.abc.SocketStream,
        *,
        lines: LineSplitter,
        emit: Callable[[bytes], None],
        overflow: list[str],
        inflight: list[int],
        start: Callable[[bytes], object],
    ) -> None:
        """Read request lines until the connection ends, starting each one (`start`); past
        `MAX_CONTROL_INFLIGHT` unanswered requests, a new one is refused at once."""
        while True:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            try:
                received = lines.feed(data)
            except LineTooLong as exc:
                emit(encode_error(None, exc))
                overflow.append(str(exc))
                return
            for n, line in enumerate(received):
                if n % 64 == 63:  # many short lines in one read: stay fair
                    await anyio.lowlevel.checkpoint()
                if not line.strip():
                    continue
                if inflight[0] >= MAX_CONTROL_INFLIGHT:
                    emit(
                        encode_error(
                            _request_id(line),
                            BadRequest(
                                f"more than {MAX_CONTROL_INFLIGHT} control requests are unanswered on "
                                "this connection: wait for their answers before sending more"
                            ),
                        )
                    )
                    continue
                inflight[0] += 1
                start(line)

    async def _control_request(
        self,
        line: bytes,
        emit: Callable[[bytes], None],
        owned: set[str],
        waits: set[anyio.CancelScope],
    ) -> None:
        rid: RequestId = None
        try:
            rid, fields = read_line(line)
            request = request_from(fields)
            if isinstance(request, WaitSession):
                # only waits: cancelled when the connection ends (nobody reads the answer)
                with anyio.CancelScope() as wait:
                    waits.add(wait)
                    try:
                        answer: Answer = await self._op(request, emit, owned)
                    finally:
                        waits.discard(wait)
                if wait.cancelled_caught:
                    return
            else:
                answer = await self._op(request, emit, owned)
            emit(encode_answer(rid, answer))
        except DaemonError as exc:
            emit(encode_error(rid, exc))
        except RecursionError:
            # anything walking the request stops at Python's recursion limit: the sender's
            # nesting, not our bug
            emit(encode_error(rid, BadRequest("a control request nests too deeply")))
        except Exception as exc:
            log.exception("control request failed")
            bug = DaemonBug(
                f"mirrordd failed ({type(exc).__name__}: {exc}); this is a bug in mirrord: "
                f"please report it with {self.paths.log}"
            )
            emit(encode_error(rid, bug))

    async def _op(self, request: Request, emit: Callable[[bytes], None], owned: set[str]) -> Answer:
        if isinstance(request, Status):
            return StatusReport(status=self.status())
        if isinstance(request, ListSessions):
            return SessionList(sessions=[s.statistics() for s in self.sessions.values()])
        if isinstance(request, CreateSession):
            return await self._create_for_client(request, emit, owned)
        if isinstance(request, CloseSession):
            session = self._session(request.session)
            owned.discard(session.id)
            self._close_session(session, request.reason)
            await session.subscriptions_ended(_UNSUBSCRIBE_WAIT)
            return Done()
        if isinstance(request, WaitSession):
            return await self._wait_session(self._session(request.session), request)
        if isinstance(request, SessionStatus):
            return SessionStatistics(statistics=self._session(request.session).statistics())
        assert isinstance(request, Shutdown)
        assert self._tg is not None
        self._tg.start_soon(self._shutdown_soon)
        return ShutdownStarted(pid=os.getpid())

    async def _create_for_client(
        self, request: CreateSession, emit: Callable[[bytes], None], owned: set[str]
    ) -> SessionCreated:
        def progress(text: str) -> None:
            emit(encode_event(ProgressEvent(message=text)))

        def owner_events(event: ControlEvent) -> None:
            emit(encode_event(event))

        if self._shutdown.is_set():
            raise DaemonStopping  # the client starts a new daemon once this one is gone
        self._starting += 1
        try:
            session = await self.create_session(request, progress, owner_events)
        finally:
            self._starting -= 1
            if self.standby_agent is not None:
                # the first session took the agent started for it, or did not get that far
                self.standby_agent = None
                with anyio.CancelScope(shield=True):
                    await self._drop_standby()
        owned.add(session.id)
        return SessionCreated(
            session=session.id,
            env=session.env,
            unset=unset_names(session.config),
            agent=session.link.handle.key,
            agent_description=session.link.handle.description,
            layer_socket=str(self.paths.layer_socket),
            warnings=list(session.warnings),
        )

    def _session(self, sid: str) -> Session:
        session = self.sessions.get(sid)
        if session is None:
            raise SessionNotFound(sid)
        return session

    async def _wait_session(self, session: Session, request: WaitSession) -> SessionIdle:
        """Until the session's processes are all gone after at least one registered (an IDE's
        debuggee exited), or `timeout` seconds with none registered."""
        # 0 means "do not wait" (`mirrord ext --wait-timeout 0`), not the default
        timeout = 60.0 if request.wait_timeout is None else request.wait_timeout
        deadline = time.monotonic() + timeout
        while session.state != "closed":
            if session.ever_registered and not session.processes:
                # An IDE runs short-lived helpers under the debuggee's environment before the
                # debuggee itself (js-debug's node version probe): idle only when no process
                # came back within IDLE_GRACE.
                with anyio.move_on_after(IDLE_GRACE):
                    while not session.processes and session.state != "closed":
                        await session.wait_changed()
                if not session.processes:
                    return SessionIdle(registered=True, state=session.state)
                continue
            left = deadline - time.monotonic()
            if not session.ever_registered and left <= 0:
                return SessionIdle(registered=False, state=session.state)
            with anyio.move_on_after(max(left, 0.05) if not session.ever_registered else 3600):
                await session.wait_changed()
        return SessionIdle(registered=session.ever_registered, state=session.state)


def _request_id(line: bytes) -> RequestId:
    """A request line's id, or None when the line cannot be read (for a refusal's answer)."""
    try:
        return read_line(line)[0]
    except (BadRequest, RecursionError):
        return None


def _refused_peer(stream: anyio.abc.SocketStream, socket_name: str) -> bool:
    """Only the daemon's own user (or root) is served. The sockets are 0600 in a 0700
    directory, so this holds even if someone opened the directory up, or passed a connection
    on: the kernel's SO_PEERCRED says who connected."""
    try:
        pid, uid = peer_credentials(stream.extra(SocketAttribute.raw_socket))
    except (OSError, anyio.TypedAttributeLookupError) as exc:
        log.warning("%s connection refused: its peer is unknown (%s)", socket_name, exc)
        return True
    if trusted_peer(uid):
        return False
    log.warning(
        "%s connection from pid %d refused: it runs as uid %d, the daemon serves uid %d only",
        socket_name,
        pid,
        uid,
        os.geteuid(),
    )
    return True


async def _unix_listener(path: Path) -> anyio.abc.SocketListener:
    """Bind a unix socket (0600). A socket file left by a dead daemon is replaced; the caller
    holds the daemon's pid lock, so no live daemon owns it."""
    old = os.umask(0o177)
    try:
        path.unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(path, mode=0o600, backlog=256)
    except OSError as exc:
        raise DaemonError(
            f"cannot listen on {path} ({exc.strerror or exc}): remove what is there, or point "
            "$MIRRORD_RUNTIME_DIR at another directory"
        ) from None
    finally:
        os.umask(old)
    return listener
