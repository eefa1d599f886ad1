"""mirrord.kube imports kubernetes_asyncio's client without its generated models (a daemon
that served one cluster session kept 49 MiB of them): each name still resolves to the
library's own class when used, the models included, and the API classes work (the whole
tests/kube suite runs on them)."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import mirrord.kube
loaded_before = sum(1 for m in sys.modules if m.startswith("kubernetes_asyncio.client.models."))
from kubernetes_asyncio import client as k8s
import kubernetes_asyncio.client.models as models
from kubernetes_asyncio.client.api.core_v1_api import CoreV1Api
from kubernetes_asyncio.client.models.v1_pod import V1Pod
import asyncio


async def deserialize():
    async with k8s.ApiClient() as api:  # the library's own path: getattr(models, "V1Pod")
        response = type("R", (), {"data": json.dumps({"metadata": {"name": "web-1"}})})()
        return api.deserialize(response, "V1Pod")


pod = asyncio.run(deserialize())
print(json.dumps({
    "loaded_before": loaded_before,
    "same_api": k8s.CoreV1Api is CoreV1Api,
    "same_model": k8s.V1Pod is V1Pod and models.V1Pod is V1Pod,
    "deserialized": pod.metadata.name,
    "version": k8s.__version__,
    "missing": hasattr(k8s, "NoSuchThing"),
}))
"""


def test_the_client_loads_no_model_until_one_is_used() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(out.stdout)
    assert got == {
        "loaded_before": 0,
        "same_api": True,
        "same_model": True,
        "deserialized": "web-1",
        "version": got["version"],
        "missing": False,
    }
    assert got["version"]  # the package's __version__ is kept


def test_a_client_imported_first_is_left_as_it_is() -> None:
    probe = (
        "import sys, kubernetes_asyncio.client\n"
        "from mirrord.kube._lazy_client import install\n"
        "print(install(), len([m for m in sys.modules if '.client.models.' in m]) > 500)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "True"]
