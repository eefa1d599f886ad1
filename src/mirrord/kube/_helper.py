"""The daemon's Kubernetes helper process: `python -m mirrord.kube._helper --fd N`.

The daemon lives for hours and serves local targets too; kubernetes_asyncio and aiohttp would
stay in its memory for its whole life once one cluster session had loaded them (14-15 MiB of
RSS, docs/performance.md). So the Kubernetes work runs here, in a child of the daemon that
exits when the daemon has held no cluster agent for a while (`mirrord.kube._helper_client`).

Owns: a `KubeBackend` and the handles it started, serving the daemon's requests on the
socket `--fd` names (`mirrord.kube._helper_wire`), and each port-forward stream's bridge: a
socketpair whose one end goes to the daemon (SCM_RIGHTS; the daemon speaks the agent protocol
on it as on any stream), the other copied to and from the port-forward websocket here. When
a stream ends, the daemon is told why before its socket closes (the agent pod is gone, or the
port-forward broke). At the end of the channel (the daemon exited, or let the helper go) every
agent still held is released (its Job deleted) before the helper exits.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.abc import UNIXSocketStream

from mirrord._frames import FrameReader, FrameWriter
from mirrord._loop import asyncio_options
from mirrord.daemon import AgentStartError
from mirrord.kube._helper_wire import HelperProtocolError, MessageDecoder, encode
from mirrord.kube._node import _splice

if TYPE_CHECKING:
    from mirrord.backend import AgentBackend, AgentHandle

__all__ = ["main", "serve"]

log = logging.getLogger("mirrord.kube.helper")

_STOP_TIMEOUT = 60.0  # releasing every agent left at the end (deleting Jobs)


class _Helper:
    def __init__(self, stream: UNIXSocketStream, backend: AgentBackend) -> None:
        self._backend = backend
        self._writer = FrameWriter(stream, "daemon")
        self._reader = FrameReader(stream, 64 * 1024)
        self._handles: dict[int, AgentHandle] = {}
        self._numbers = itertools.count(1)
        self._reported_dead: set[int] = set()

    def _send(self, message: dict[str, Any], passing: list[socket.socket] | None = None) -> None:
        self._writer.send_nowait(encode(message), passing or ())

    async def run(self) -> None:
        decoder = MessageDecoder()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer.run)
                try:
                    while True:
                        for message in decoder.feed(await self._reader.receive()):
                            tg.start_soon(self._serve, message, tg)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    log.info("the daemon closed the channel")
                except HelperProtocolError as exc:
                    log.error("the daemon broke the helper protocol: %s", exc)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_TIMEOUT):
                for handle in list(self._handles.values()):
                    with contextlib.suppress(Exception):
                        await handle.stop()

    async def _serve(self, message: dict[str, Any], tg: anyio.abc.TaskGroup) -> None:
        rid = message.get("id")
        op = message.get("op")
        try:
            if op == "start":
                ok = await self._start(rid, message)
            elif op == "connect":
                await self._connect(rid, self._handle(message), tg)
                return
            elif op == "stop":
                number = message.get("handle")
                handle = self._handles.pop(number, None) if isinstance(number, int) else None
                if handle is not None:
                    await handle.stop()
                ok = {}
            else:
                raise AgentStartError(f"the Kubernetes helper has no operation {op!r}")
            self._send({"id": rid, "ok": ok})
        except AgentStartError as exc:
            self._send({"id": rid, "error": _error(exc)})
        except Exception as exc:
            log.exception("%s failed", op)
            self._send(
                {
                    "id": rid,
                    "error": {
                        "code": AgentStartError.code,
                        "message": f"the Kubernetes backend failed: {exc!r}",
                        "errors": [],
                    },
                }
            )
        finally:
            self._report_dead()

    def _handle(self, message: dict[str, Any]) -> AgentHandle:
        number = message.get("handle")
        handle = self._handles.get(number) if isinstance(number, int) else None
        if handle is None:
            raise AgentStartError(f"the Kubernetes helper holds no agent handle {number!r}")
        return handle

    async def _start(self, rid: Any, message: dict[str, Any]) -> dict[str, Any]:
        from mirrord.config import MirrordConfig

        target = message.get("target")
        if not isinstance(target, str) or not isinstance(message.get("config"), dict):
            raise AgentStartError("the Kubernetes helper got a start without target or config")
        config = MirrordConfig.model_validate(message["config"])
        handle = await self._backend.start_agent(
            target, config, lambda text: self._send({"id": rid, "progress": text})
        )
        number = next(self._numbers)
        self._handles[number] = handle
        return {
            "handle": number,
            "key": handle.key,
            "description": handle.description,
            "secret": handle.secret,
        }

    async def _connect(self, rid: Any, handle: AgentHandle, tg: anyio.abc.TaskGroup) -> None:
        number = next(n for n, h in self._handles.items() if h is handle)
        remote = await handle.connect()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        local = await UNIXSocketStream.from_socket(mine)
        self._send({"id": rid, "ok": {"stream": True}}, [theirs])  # the writer closes ours
        tg.start_soon(self._bridge, number, handle, remote, local)

    async def _bridge(
        self,
        number: int,
        handle: AgentHandle,
        remote: anyio.abc.ByteStream,
        local: UNIXSocketStream,
    ) -> None:
        """Copy between the daemon's socket and the agent's stream until either ends."""
        reason: str | None = None
        try:
            reason = await _splice(local, remote)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await remote.aclose()
                self._send({"ended": number, "reason": reason, "dead": self._dead()})
                self._reported_dead.update(self._dead())
                with contextlib.suppress(Exception):
                    await local.aclose()

    def _dead(self) -> dict[int, str]:
        return {n: "the agent is gone" for n, h in self._handles.items() if not h.alive()}

    def _report_dead(self) -> None:
        dead = {n: r for n, r in self._dead().items() if n not in self._reported_dead}
        if dead:
            self._reported_dead.update(dead)
            self._send({"dead": dead})


def _error(exc: AgentStartError) -> dict[str, Any]:
    return {"code": exc.code, "message": str(exc), "errors": list(exc.errors)}


async def serve(sock: socket.socket, backend: AgentBackend | None = None) -> None:
    """Serve the daemon on `sock` until it closes its end."""
    if backend is None:
        from mirrord.kube._backend import KubeBackend

        backend = KubeBackend()
    await _Helper(await UNIXSocketStream.from_socket(sock), backend).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mirrord.kube._helper")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the daemon")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # The daemon decides when the helper ends (it closes the socket); a terminal's Ctrl-C
    # reaches the daemon, which releases the agents through us first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sock = socket.socket(fileno=args.fd)
    anyio.run(serve, sock, backend="asyncio", backend_options=asyncio_options())


if __name__ == "__main__":
    main()
