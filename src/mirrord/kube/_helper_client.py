"""The daemon's Kubernetes backend: the helper process (`mirrord.kube._helper`) does the work.

Owns: `KubeHelperBackend` (the daemon's `kube` backend), starting the helper on first use,
the requests to it and their replies, and letting it go (its socket closed: it releases what
it still holds and exits) once no cluster agent has been held for `idle_exit` seconds. Imports
neither kubernetes_asyncio nor aiohttp: they load in the helper, so a daemon that served a
cluster session does not keep them (docs/architecture.md, "Kubernetes helper").

Each agent stream is a unix socket the helper passes over (its other end bridged to the
port-forward there): the daemon reads and writes it as it does a local agent's socket. Runs on
asyncio (the daemon's loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.abc import UNIXSocketStream

from mirrord._frames import FrameReader, FrameWriter
from mirrord.backend import Progress
from mirrord.daemon import AgentStartError
from mirrord.kube._helper_wire import HelperProtocolError, MessageDecoder, encode

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = ["HELPER_IDLE_EXIT", "KubeHelperBackend"]

log = logging.getLogger("mirrord.daemon.kube")

HELPER_IDLE_EXIT = 30.0  # seconds without a cluster agent before the helper is let go
_STOP_TIMEOUT = 60.0  # a release deletes a Job: the API server's time
# How long a stream's end waits for the helper to say why: longer than the helper's own
# 5 s bound on asking the API server (`PortForwardStream._ended`), so that its answer,
# not the wait, decides what the sessions are told.
_ENDED_WAIT = 7.0


class _Call:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.done = anyio.Event()
        self.ok: dict[str, Any] | None = None
        self.error: AgentStartError | None = None
        self.fd: socket.socket | None = None


class _HelperProcess:
    """One running helper and the calls in flight on its socket."""

    def __init__(self, process: anyio.abc.Process, stream: UNIXSocketStream) -> None:
        self.process = process
        self._writer = FrameWriter(stream, "kube helper")
        self._reader = FrameReader(stream, 64 * 1024, receive_fds=True)
        self._stream = stream
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self.handles: dict[int, HelperAgentHandle] = {}
        self.gone: str | None = None  # why the helper is no longer usable
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls) -> _HelperProcess:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
            process = await anyio.open_process(
                [
                    sys.executable,
                    "-m",
                    "mirrord.kube._helper",
                    "--fd",
                    str(theirs.fileno()),
                    "--log-level",
                    level,
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,  # the daemon's log
            )
        except OSError as exc:
            mine.close()
            raise AgentStartError(f"cannot start the Kubernetes helper process: {exc}") from exc
        finally:
            theirs.close()
        helper = cls(process, await UNIXSocketStream.from_socket(mine))
        loop = asyncio.get_running_loop()
        helper._tasks = [loop.create_task(helper._writer.run()), loop.create_task(helper._read())]
        log.info("Kubernetes helper started (pid %d)", process.pid)
        return helper

    def __repr__(self) -> str:
        return (
            f"<kube helper pid={self.process.pid} calls={len(self._calls)} "
            f"handles={len(self.handles)} gone={self.gone!r}>"
        )

    async def call(
        self, message: dict[str, Any], progress: Progress | None = None
    ) -> tuple[dict[str, Any], socket.socket | None]:
        """The helper's answer to `message` (and the socket it passed with it: a connect's);
        raises the helper's error as an `AgentStartError`."""
        if self.gone is not None:
            raise AgentStartError(self.gone)
        rid = next(self._ids)
        call = self._calls[rid] = _Call(progress)
        try:
            self._writer.send_nowait(encode({**message, "id": rid}))
            await call.done.wait()
        except BaseException:
            if call.fd is not None:
                call.fd.close()
            raise
        finally:
            self._calls.pop(rid, None)
        if call.error is not None:
            raise call.error
        assert call.ok is not None
        return call.ok, call.fd

    async def _read(self) -> None:
        """Read the helper's messages until its end, then close the channel and reap it."""
        decoder = MessageDecoder()
        why = "the Kubernetes helper process closed its channel"
        try:
            while True:
                for message in decoder.feed(await self._reader.receive()):
                    self._dispatch(message)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        except HelperProtocolError as exc:
            why = f"the Kubernetes helper process broke its protocol: {exc}"
        finally:
            self._writer.close()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self._stream.aclose()
                if self.gone is None:  # the helper ended by itself: say how, if it did so soon
                    with anyio.move_on_after(2):
                        await self.process.wait()
                    if self.process.returncode not in (0, None):
                        why = f"{why} ({_exit_status(self.process.returncode)}; its log is in "
                        why += "`mirrord daemon logs`)"
                self._lose(why)
                # it exits at the end of its channel, after releasing what it held
                with anyio.move_on_after(_STOP_TIMEOUT):
                    await self.process.wait()
                if self.process.returncode is None:
                    log.warning("the Kubernetes helper did not exit: killed")
                    self.process.kill()
                    await self.process.wait()
                log.info("Kubernetes helper exited (%s)", self.process.returncode)

    def _dispatch(self, message: dict[str, Any]) -> None:
        dead = message.get("dead")
        if isinstance(dead, dict):
            for number, reason in dead.items():
                handle = self.handles.get(number)
                if handle is not None and handle.dead is None:
                    handle.dead = str(reason)
        if "ended" in message:
            handle = self.handles.get(message["ended"])
            if handle is not None:
                reason = message.get("reason")
                handle.stream_ended(str(reason) if reason else None)
            return
        call = self._calls.get(message.get("id"))  # type: ignore[arg-type]
        ok = message.get("ok")
        passed = None
        if isinstance(ok, dict) and ok.get("stream"):  # a connect: its socket came with it
            passed = self._reader.take_fd()
        if call is None:  # its caller gave up waiting (cancelled)
            if passed is not None:
                passed.close()
            if isinstance(ok, dict) and isinstance(ok.get("handle"), int):
                # a start nobody waits for: nobody holds that agent
                self._writer.send_nowait(encode({"op": "stop", "id": 0, "handle": ok["handle"]}))
            return
        if "progress" in message:
            if call.progress is not None:
                call.progress(str(message["progress"]))
            return
        if isinstance(ok, dict):
            call.ok = ok
            if passed is not None:
                call.fd = socket.socket(fileno=passed.detach())
        else:
            error = message.get("error")
            error = error if isinstance(error, dict) else {}
            exc = AgentStartError(
                str(error.get("message") or "the Kubernetes helper failed"),
                [str(e) for e in error.get("errors") or []],
            )
            exc.code = str(error.get("code") or AgentStartError.code)
            call.error = exc
        call.done.set()

    def _lose(self, why: str) -> None:
        if self.gone is None:
            self.gone = why
        for call in self._calls.values():
            if not call.done.is_set():
                call.error = AgentStartError(self.gone)
                call.done.set()
        for handle in self.handles.values():
            if handle.dead is None:
                handle.dead = self.gone
            handle.stream_ended(None)
        self._reader.close_fds()

    async def aclose(self) -> None:
        """Let the helper go: the end of its channel makes it release what it holds and exit
        (killed if it has not within _STOP_TIMEOUT)."""
        self._writer.close()
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self._tasks[0]  # what was queued is written
            with contextlib.suppress(OSError):
                self._stream.extra(anyio.abc.SocketAttribute.raw_socket).shutdown(socket.SHUT_WR)
            # the reader ends when the helper closed its end and exited (it bounds its own
            # releases by the same time); one that hangs is killed, which ends it too
            with anyio.move_on_after(_STOP_TIMEOUT + 5):
                await asyncio.shield(self._tasks[1])
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
            with contextlib.suppress(Exception):
                await self._tasks[1]


def _exit_status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class HelperAgentHandle:
    """A cluster agent the helper started and holds for the daemon."""

    def __init__(
        self, backend: KubeHelperBackend, helper: _HelperProcess, ok: dict[str, Any]
    ) -> None:
        self._backend = backend
        self._helper = helper
        self.number = int(ok["handle"])
        self.key = str(ok["key"])
        self.description = str(ok["description"])
        self.secret = str(ok["secret"])
        self.dead: str | None = None  # the helper said the agent is gone
        self._stopped = False
        self._ended: anyio.Event | None = None
        self._end_reason: str | None = None
        helper.handles[self.number] = self

    def __repr__(self) -> str:  # no secret
        return f"<HelperAgentHandle {self.key} alive={self.alive()}>"

    def alive(self) -> bool:
        return not self._stopped and self.dead is None and self._helper.gone is None

    async def connect(self) -> anyio.abc.ByteStream:
        self._ended, self._end_reason = anyio.Event(), None
        _ok, sock = await self._helper.call({"op": "connect", "handle": self.number})
        if sock is None:
            raise AgentStartError("the Kubernetes helper connected no stream")
        return await UNIXSocketStream.from_socket(sock)

    def stream_ended(self, reason: str | None) -> None:
        self._end_reason = reason
        if self._ended is not None:
            self._ended.set()

    async def end_reason(self) -> str | None:
        """Why the last stream ended, as the helper saw it (the agent pod is gone, the
        port-forward broke); None for an ordinary end. Waits a little for the helper's word,
        which may come after the stream's own end."""
        if self._ended is not None:
            with anyio.move_on_after(_ENDED_WAIT):
                await self._ended.wait()
        return self._end_reason

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with anyio.CancelScope(shield=True):
            try:
                if self._helper.gone is None:
                    with anyio.move_on_after(_STOP_TIMEOUT), contextlib.suppress(AgentStartError):
                        await self._helper.call({"op": "stop", "handle": self.number})
            finally:
                self._helper.handles.pop(self.number, None)
                self._backend.released(self._helper)


class KubeHelperBackend:
    """The `kube` backend of the daemon: Kubernetes targets, through the helper process."""

    name = "kube"

    def __init__(self, *, idle_exit: float = HELPER_IDLE_EXIT) -> None:
        self.idle_exit = idle_exit
        self._helper: _HelperProcess | None = None
        self._starting: anyio.Lock | None = None
        self._pending = 0  # start_agent calls in flight
        self._idle: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<KubeHelperBackend helper={self._helper!r}>"

    @property
    def helper_pid(self) -> int | None:
        helper = self._helper
        return helper.process.pid if helper is not None and helper.gone is None else None

    def handles(self, target: str) -> bool:
        from mirrord.config import TARGET_KINDS

        return target == "targetless" or target.split("/", 1)[0] in TARGET_KINDS

    def agent_fingerprint(self, config: MirrordConfig) -> str:
        from mirrord.kube._specs import agent_fingerprint

        return agent_fingerprint(config)

    async def start_agent(
        self, target: str, config: MirrordConfig, progress: Progress
    ) -> HelperAgentHandle:
        self._pending += 1
        self._cancel_idle()
        try:
            helper = await self._running(progress)
            ok, _ = await helper.call(
                {"op": "start", "target": target, "config": config.model_dump(mode="json")},
                progress,
            )
            return HelperAgentHandle(self, helper, ok)
        finally:
            self._pending -= 1
            if self._helper is not None:
                self.released(self._helper)

    async def _running(self, progress: Progress) -> _HelperProcess:
        if self._starting is None:
            self._starting = anyio.Lock()
        async with self._starting:
            if self._helper is None or self._helper.gone is not None:
                progress("starting the Kubernetes helper")
                self._helper = await _HelperProcess.start()
            return self._helper

    def released(self, helper: _HelperProcess) -> None:
        """A handle was stopped or a start ended: let an idle helper go after idle_exit."""
        if helper is not self._helper or self._pending or helper.handles:
            return
        self._cancel_idle()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.idle_exit, self._let_go_if_idle, helper)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _let_go_if_idle(self, helper: _HelperProcess) -> None:
        self._idle = None
        if helper is self._helper and not self._pending and not helper.handles:
            self._helper = None
            task = asyncio.get_running_loop().create_task(helper.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.info("no cluster agent for %gs: Kubernetes helper let go", self.idle_exit)

    async def aclose(self) -> None:
        """The daemon is stopping: the helper releases what it still holds and exits."""
        self._cancel_idle()
        helper, self._helper = self._helper, None
        if helper is not None:
            await helper.aclose()
        for task in list(self._closing):
            with contextlib.suppress(BaseException):
                await task
