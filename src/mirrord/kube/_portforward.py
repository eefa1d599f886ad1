"""Port-forward to a pod through the API server, as an anyio byte stream.

Owns: opening the websocket (`v4.channel.k8s.io`, kubernetes_asyncio `WsApiClient`), the
channel framing (data on channel 0 with a `0x00` prefix, errors on channel 1, and the first
two-byte port frame of each channel, which is consumed), and translating failures into
anyio's stream exceptions with a message saying what broke. One websocket is one TCP
connection to the pod's port; there is no half-close. Does not own retrying: the daemon calls
the handle's `connect()` again after a break.

Runs on asyncio only (aiohttp).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from aiohttp import WSMsgType, WSServerHandshakeError
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.stream import WsApiClient

from mirrord.kube._exceptions import KubeError, PermissionMissing, PortForwardError
from mirrord.kube._rbac import Permission, denied_permissions, portforward_permissions

__all__ = ["PortForwardStream", "open_port_forward"]

_DATA = 0
_ERROR = 1
_MAX_MESSAGE = 256 * 1024  # bytes per websocket message we send: bounded frames, fair sharing


class PortForwardStream(anyio.abc.ByteStream):
    """A byte stream over one port-forward websocket."""

    def __init__(
        self,
        ws: Any,
        ws_ctx: Any,
        api: Any,
        description: str,
        on_end: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self._ws = ws
        self._on_end = on_end
        self._ws_ctx = ws_ctx
        self._api = api
        self.description = description
        self._port_frame_seen = {_DATA: False, _ERROR: False}
        self._closed = False
        self._send_lock = anyio.Lock()
        self._pending = b""  # the rest of a message bigger than the caller's max_bytes
        # the owner's answer to "why did the stream end", asked once and shared by the reader
        # and a writer that fails meanwhile (see `_ended`)
        self._end_checked: anyio.Event | None = None
        self._end_reason: str | None = None

    def __repr__(self) -> str:
        return f"<PortForwardStream {self.description} closed={self._closed}>"

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._pending:
            chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            return chunk
        while True:
            msg = await self._ws.receive()
            if self._closed:  # woken by our own aclose(): its CLOSE is not the peer's end
                raise anyio.ClosedResourceError
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                why = await self._ended()
                if why is not None:  # the agent is gone: a break with its reason, not an end
                    raise anyio.BrokenResourceError(why)
                raise anyio.EndOfStream
            if msg.type == WSMsgType.ERROR:
                await self._ended()
                raise anyio.BrokenResourceError(
                    f"port-forward to {self.description} broke: {msg.data}"
                )
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            data: bytes = msg.data
            channel, payload = data[0], data[1:]
            if channel in self._port_frame_seen and not self._port_frame_seen[channel]:
                # The server's first message on each channel is the port (uint16 LE).
                self._port_frame_seen[channel] = True
                if len(payload) == 2:
                    continue
            if channel == _ERROR:
                await self._ended()
                raise anyio.BrokenResourceError(
                    f"port-forward to {self.description} failed: "
                    f"{payload.decode(errors='replace').strip()}"
                )
            if channel == _DATA and payload:
                if len(payload) > max_bytes:
                    self._pending = payload[max_bytes:]
                    return payload[:max_bytes]
                return payload

    def unreceive(self, data: bytes) -> None:
        """Put bytes back in front of what `receive()` returns next."""
        self._pending = data + self._pending

    async def _ended(self) -> str | None:
        """Let the owner find out why the stream ended (is the agent pod gone?) before the
        caller sees the end, so that its liveness check is already up to date. Returns the
        owner's reason when the agent is gone.

        Asked once, shielded and bounded (5 s): the reader that met the websocket's close and a
        writer whose send failed meanwhile both wait for the same answer, and neither one's
        cancellation (a splice ends both ways when one ends) loses it for the other."""
        if self._end_checked is not None:
            await self._end_checked.wait()
            return self._end_reason
        self._end_checked = checked = anyio.Event()
        on_end, self._on_end = self._on_end, None
        try:
            if on_end is not None:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(5),
                    contextlib.suppress(Exception),
                ):
                    self._end_reason = await on_end()
        finally:
            checked.set()
        return self._end_reason

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        async with self._send_lock:
            try:
                for i in range(0, len(item), _MAX_MESSAGE):
                    await self._ws.send_bytes(b"\x00" + item[i : i + _MAX_MESSAGE])
            except (ConnectionError, RuntimeError) as exc:
                if self._closed:  # our own aclose(): an ordinary end, nothing to ask
                    raise anyio.ClosedResourceError from exc
                why = await self._ended()  # the agent pod gone: that, not the socket's words
                raise anyio.BrokenResourceError(
                    why or f"port-forward to {self.description} broke: {exc}"
                ) from exc

    async def send_eof(self) -> None:
        # Port-forward has no half-close: the only way to say "done" is to close.
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self._ws_ctx.__aexit__(None, None, None)
            with contextlib.suppress(Exception):
                await self._api.close()

    @property
    def extra_attributes(self) -> Any:
        return {}


async def _denied_portforward_verbs(configuration: Any, namespace: str) -> list[Permission]:
    perms = portforward_permissions(namespace)
    try:
        async with k8s.ApiClient(configuration) as api:
            denied = await denied_permissions(api, perms)
    except KubeError:
        denied = []
    return denied or perms  # the reviews allow both: some other policy refused; name both


async def open_port_forward(
    configuration: Any,
    namespace: str,
    pod: str,
    port: int,
    *,
    timeout: float = 10.0,
    on_end: Callable[[], Awaitable[str | None]] | None = None,
) -> PortForwardStream:
    """Open a port-forward websocket to `pod:port`; raises `PermissionMissing` on 403 and
    `PortForwardError` otherwise (aiohttp drops the Status body of a failed upgrade, so the
    message is built from the HTTP code)."""
    api = WsApiClient(configuration)
    description = f"pod {namespace}/{pod} port {port}"
    try:
        core: Any = k8s.CoreV1Api(api)  # the generated stub types `ports` as int
        with anyio.fail_after(timeout):
            # `ports` must be a string: kubernetes_asyncio URL-encodes a list wrongly.
            ws_ctx = await core.connect_get_namespaced_pod_portforward(
                pod, namespace, ports=str(port), _preload_content=False
            )
            ws = await ws_ctx.__aenter__()
    except WSServerHandshakeError as exc:
        if exc.status == 403:
            # aiohttp drops the Status body that names the refused verb: ask the API server
            # which of the verbs the upgrade is authorised with (get; create since 1.35) it
            # refuses, and name those.
            try:
                denied = await _denied_portforward_verbs(configuration, namespace)
            finally:
                await api.close()
            raise PermissionMissing(
                [(str(p), p.chart_value) for p in denied],
                note="the API server refused the port-forward upgrade",
            ) from None
        await api.close()
        if exc.status == 404:
            raise PortForwardError(
                f"cannot port-forward to {description}: the pod is gone"
            ) from None
        if exc.status == 401:
            raise PortForwardError(
                f"cannot port-forward to {description}: the API server rejected our credentials "
                "(401): refresh your kubeconfig login"
            ) from None
        raise PortForwardError(
            f"cannot port-forward to {description}: the API server answered {exc.status} "
            f"{exc.message} (is the pod running?)"
        ) from None
    except TimeoutError:
        await api.close()
        raise PortForwardError(
            f"port-forward to {description} was not established within {timeout:g} s: check "
            "that the API server is reachable"
        ) from None
    except Exception as exc:
        await api.close()
        raise PortForwardError(f"cannot port-forward to {description}: {exc}") from exc
    return PortForwardStream(ws, ws_ctx, api, description, on_end)
