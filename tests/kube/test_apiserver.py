"""The in-process API server behaves like the real one on the paths mirrord uses, seen from an
unmodified kubernetes_asyncio client: Status errors, selectors, watches (synthetic ADDED,
timeoutSeconds, 410 Expired), logs, ephemeral containers, SelfSubjectAccessReview, TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio import client as k8s

from mirrord.kube import load_context
from mirrord.kube._api import ApiCallError, call, watch_events
from tests.kube._cluster import add_deployment, wait_running
from tests.kube.apiserver import FakeApiServer

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def api(kubeconfig: Path) -> AsyncIterator[Any]:
    kube = await load_context(kubeconfig=str(kubeconfig))
    async with k8s.ApiClient(kube.configuration) as client:
        yield client


async def test_status_errors_and_typed_client(apiserver: FakeApiServer, api: Any) -> None:
    core = k8s.CoreV1Api(api)
    with pytest.raises(k8s.ApiException) as info:
        await core.read_namespaced_pod("nope", "default")
    assert info.value.status == 404
    assert '"reason": "NotFound"' in str(info.value.body)
    body: Any = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}
    pod = await core.create_namespaced_pod("default", body)  # the typed models accept it
    assert pod.metadata.uid and pod.metadata.resource_version and pod.metadata.creation_timestamp
    assert pod.spec.containers[0].termination_message_path == "/dev/termination-log"
    with pytest.raises(ApiCallError) as err:
        await call(core.create_namespaced_pod, "default", body)
    assert (err.value.status, err.value.reason) == (409, "AlreadyExists")
    with pytest.raises(ApiCallError) as err:
        await call(core.create_namespaced_pod, "default", {"metadata": {"name": "q"}, "spec": {}})
    assert (err.value.status, err.value.reason) == (422, "Invalid")
    with pytest.raises(ApiCallError) as err:
        await call(core.list_namespaced_pod, "default", field_selector="spec.bogus=1")
    assert err.value.status == 400
    apiserver.rbac.deny("list", "pods")
    with pytest.raises(ApiCallError) as err:
        await call(core.list_namespaced_pod, "default")
    assert err.value.status == 403
    assert (
        'cannot list resource "pods" in API group "" in the namespace "default"'
        in err.value.message
    )


async def test_selectors(apiserver: FakeApiServer, api: Any) -> None:
    names = add_deployment(apiserver, "web", pods=[None, None])
    add_deployment(apiserver, "db")
    await wait_running(apiserver, "default", names)
    core = k8s.CoreV1Api(api)

    async def pods(**kw: str) -> list[str]:
        out = await call(core.list_namespaced_pod, "default", **kw)
        return sorted(p["metadata"]["name"] for p in out["items"])

    assert await pods(label_selector="app=web") == sorted(names)
    assert await pods(label_selector="app in (web,db)") == sorted(await pods())
    assert len(await pods(label_selector="app!=web")) == 1
    assert await pods(label_selector="!app") == []
    assert await pods(field_selector=f"metadata.name={names[0]}") == [names[0]]
    assert await pods(field_selector="status.phase=Running,spec.nodeName=node-1") == await pods()


async def test_watch_synthetic_added_timeout_and_expired(
    apiserver: FakeApiServer, api: Any
) -> None:
    core = k8s.CoreV1Api(api)
    names = add_deployment(apiserver, "web")
    await wait_running(apiserver, "default", names)
    loop = asyncio.get_running_loop()
    start = loop.time()
    events = [
        (t, o["metadata"]["name"])
        async for t, o in watch_events(core.list_namespaced_pod, "default", timeout_seconds=1)
    ]
    assert events == [("ADDED", names[0])]
    assert 0.9 < loop.time() - start < 3
    apiserver.store.HISTORY = 5
    for i in range(10):
        apiserver.create("Service", "default", {"metadata": {"name": f"s{i}"}, "spec": {}})
    with pytest.raises(ApiCallError) as err:
        async for _ in watch_events(
            core.list_namespaced_pod, "default", timeout_seconds=1, resource_version="1001"
        ):
            pass
    assert (err.value.status, err.value.reason) == (410, "Expired")


async def test_logs_ephemeral_containers_and_access_review(
    apiserver: FakeApiServer, api: Any
) -> None:
    core: Any = k8s.CoreV1Api(api)
    apiserver.kubelet.pull_errors["slow:1"] = "never pulled"
    apiserver.create(
        "Pod",
        "default",
        {"metadata": {"name": "w"}, "spec": {"containers": [{"name": "c", "image": "slow:1"}]}},
    )
    await asyncio.sleep(0.2)
    resp = await core.read_namespaced_pod_log("w", "default", _preload_content=False)
    assert resp.status == 400 and "is waiting to start" in (await resp.text())
    resp.release()
    names = add_deployment(apiserver, "web")
    await wait_running(apiserver, "default", names)
    eph = {"name": "dbg", "image": "busybox:1", "targetContainerName": "app"}
    await call(
        core.patch_namespaced_pod_ephemeralcontainers,
        names[0],
        "default",
        {"spec": {"ephemeralContainers": [eph]}},
    )
    changed = {**eph, "image": "busybox:2"}
    with pytest.raises(ApiCallError) as err:
        await call(
            core.replace_namespaced_pod_ephemeralcontainers,
            names[0],
            "default",
            {
                "metadata": {"name": names[0]},
                "spec": {"containers": [], "ephemeralContainers": [changed]},
            },
        )
    assert err.value.status == 422 and "may not be removed or changed" in err.value.message
    auth = k8s.AuthorizationV1Api(api)
    review = {
        "spec": {
            "resourceAttributes": {
                "verb": "create",
                "resource": "pods",
                "subresource": "portforward",
                "namespace": "default",
            }
        }
    }
    assert (await call(auth.create_self_subject_access_review, review))["status"]["allowed"] is True
    apiserver.rbac.deny("create", "pods/portforward")
    assert (await call(auth.create_self_subject_access_review, review))["status"][
        "allowed"
    ] is False


async def test_tls_and_bad_token(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, workdir=tmp_path) as server:
        path = server.write_kubeconfig(tmp_path / "kc")
        kube = await load_context(kubeconfig=str(path))
        async with k8s.ApiClient(kube.configuration) as client:
            out = await call(k8s.CoreV1Api(client).list_namespace)
            assert {"default", "mirrord"} <= {n["metadata"]["name"] for n in out["items"]}
        server.token = "rotated"
        async with k8s.ApiClient(kube.configuration) as client:
            with pytest.raises(ApiCallError) as err:
                await call(k8s.CoreV1Api(client).list_namespace)
            assert err.value.status == 401
