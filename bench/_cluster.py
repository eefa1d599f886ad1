"""The bench pod behind the real transport: a Kubernetes API server with a websocket
port-forward, as a cluster user reaches the agent.

Kubernetes itself cannot run here, so the API server is the test suite's in-process one
(`tests/kube/apiserver`, TLS on, RBAC, watch, port-forward over a websocket); the pod it
serves is the bench's own local pod, and the agent it starts is the real agent, spawned as a
Job pod by that server's kubelet and reached by the daemon only through the port-forward.
The server runs on its own event loop in a thread, so `mirrord run` and the load generators
in the bench's main thread never block it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._core import NotAvailable

if TYPE_CHECKING:
    from mirrord.localpod import LocalPod

__all__ = ["PortForwardCluster"]

DEPLOYMENT = "bench"


class PortForwardCluster:
    """`PortForwardCluster(pod, workdir)`: a Deployment `bench` whose one pod is `pod`; `target`
    and `kubeconfig` for `mirrord run`; `close()` stops the server (after the daemon, which
    deletes its agent Job through it)."""

    def __init__(self, pod: LocalPod, workdir: Path) -> None:
        try:
            from tests.kube._cluster import add_deployment
            from tests.kube.apiserver import FakeApiServer
        except ImportError as exc:
            raise NotAvailable(
                f"the in-process API server is not importable ({exc}); run from the checkout"
            ) from None
        workdir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bench-apiserver", daemon=True
        )
        self._thread.start()
        self._server: Any = FakeApiServer(tls=True, workdir=workdir)
        try:
            self._call(self._server.start())

            async def deploy() -> list[str]:
                return add_deployment(self._server, DEPLOYMENT, pods=[pod])

            (self.pod_name,) = self._call(deploy())
            self.kubeconfig = self._server.write_kubeconfig(workdir / "kubeconfig")
        except BaseException:
            self.close()
            raise

    @property
    def target(self) -> str:
        return f"pod/{self.pod_name}"

    def portforwards_opened(self) -> int:
        return sum(self._server.portforwards_opened.values())

    def _call(self, coro: Any, timeout: float = 120) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RuntimeError("the in-process API server did not answer in time") from None

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._server.port:
                self._call(self._server.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            if not self._thread.is_alive():
                self._loop.close()
