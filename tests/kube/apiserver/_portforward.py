"""The port-forward websocket of the in-process API server (`v4.channel.k8s.io`): the port
frames of each channel, data to and from the pod's ports dialed by the kubelet, and the error
channel when a port cannot be dialed. The request checks and counters are `_server.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from aiohttp import WSMsgType, web

from tests.kube.apiserver._kubelet import Kubelet
from tests.kube.apiserver._store import Store, resource_by_kind


async def relay_portforward(
    ws: web.WebSocketResponse,
    kubelet: Kubelet,
    store: Store,
    pod_key: tuple[str, str],
    ports: list[int],
) -> None:
    """Relay the port-forward websocket `ws` of pod `pod_key` (namespace, name) to `ports`
    dialed inside the pod, until either side ends; a port that cannot be dialed gets the
    kubelet's error on its error channel."""
    ns, name = pod_key
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = []
    for i, port in enumerate(ports):
        await ws.send_bytes(bytes([2 * i]) + struct.pack("<H", port))
        await ws.send_bytes(bytes([2 * i + 1]) + struct.pack("<H", port))
    for i, port in enumerate(ports):
        try:
            streams.append(await kubelet.dial(ns, name, port))
        except OSError as exc:
            pod = store.find(resource_by_kind("Pod"), ns, name) or {"metadata": {}}
            await ws.send_bytes(
                bytes([2 * i + 1])
                + (
                    f"error forwarding port {port} to pod {pod['metadata'].get('uid', '')}, "
                    f"uid : failed to connect to localhost:{port} inside namespace: {exc}"
                ).encode()
            )
            streams.append(None)
    live = [(i, s) for i, s in enumerate(streams) if s is not None]
    if not live:
        return

    async def pod_to_ws(i: int, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            await ws.send_bytes(bytes([2 * i]) + data)

    async def ws_to_pod() -> None:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            channel = msg.data[0]
            if channel % 2 == 0 and channel // 2 < len(streams):
                s = streams[channel // 2]
                if s is not None and len(msg.data) > 1:
                    s[1].write(msg.data[1:])
                    await s[1].drain()

    tasks = [asyncio.create_task(pod_to_ws(i, s[0])) for i, s in live]
    tasks.append(asyncio.create_task(ws_to_pod()))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for _i, (_r, w) in live:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
