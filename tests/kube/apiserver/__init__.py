"""An in-process Kubernetes API server for the tests of `mirrord.kube`.

It speaks the real REST, watch, log, SelfSubjectAccessReview and websocket port-forward
protocols to an unmodified kubernetes_asyncio client through a kubeconfig; its "kubelet" runs
agent pods as real local `mirrord-agent` processes and binds target pods to real namespace pods.
"""

from __future__ import annotations

from tests.kube.apiserver._errors import ApiError
from tests.kube.apiserver._kubelet import Kubelet
from tests.kube.apiserver._runtime import cleanup_leftover_cgroups
from tests.kube.apiserver._server import USER, FakeApiServer, Rbac, Rule
from tests.kube.apiserver._store import Store

__all__ = [
    "USER",
    "ApiError",
    "FakeApiServer",
    "Kubelet",
    "Rbac",
    "Rule",
    "Store",
    "cleanup_leftover_cgroups",
]
