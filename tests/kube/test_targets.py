"""Target resolution against the in-process API server, through a real kubeconfig."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web
from kubernetes_asyncio import client as k8s

from mirrord.kube import (
    KubeConfigError,
    KubeError,
    TargetNotFound,
    list_targets,
    load_context,
    resolve_target,
)
from tests.cli.conftest import temp_mirrord
from tests.kube._cluster import add_deployment, wait_running
from tests.kube.apiserver import FakeApiServer

pytestmark = pytest.mark.asyncio


async def _resolve(kubeconfig: Path, path: str, ns: str = "default"):  # type: ignore[no-untyped-def]
    kube = await load_context(kubeconfig=str(kubeconfig), namespace=ns)
    async with k8s.ApiClient(kube.configuration) as api:
        return await resolve_target(api, path, kube.namespace)


async def test_deployment_target_resolves_to_running_pod_and_says_which(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    names = add_deployment(apiserver, "web", pods=[None, None])
    await wait_running(apiserver, "default", names)
    t = await _resolve(kubeconfig, "deployment/web")
    assert t.pod == names[0]
    assert t.container == "app"
    assert t.container_id and len(t.container_id) == 64
    assert t.node == "node-1"
    assert names[0] in t.note and "1 of 2 running" in t.note


async def test_mesh_sidecar_is_skipped_and_annotation_wins(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    names = add_deployment(apiserver, "mesh", containers=["istio-proxy", "app"])
    await wait_running(apiserver, "default", names)
    assert (await _resolve(kubeconfig, "deployment/mesh")).container == "app"
    names = add_deployment(
        apiserver,
        "annot",
        containers=["app", "worker"],
        annotations={"kubectl.kubernetes.io/default-container": "worker"},
    )
    await wait_running(apiserver, "default", names)
    assert (await _resolve(kubeconfig, "deployment/annot")).container == "worker"
    t = await _resolve(kubeconfig, f"pod/{names[0]}/container/app")
    assert t.container == "app"
    with pytest.raises(TargetNotFound, match="no container 'nope'"):
        await _resolve(kubeconfig, f"pod/{names[0]}/container/nope")


async def test_statefulset_service_job_cronjob_rollout(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    sts = add_deployment(apiserver, "db", kind="StatefulSet")
    await wait_running(apiserver, "default", sts)
    assert (await _resolve(kubeconfig, "statefulset/db")).pod == "db-0"
    apiserver.create(
        "Service",
        "default",
        {
            "metadata": {"name": "db-svc"},
            "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432}]},
        },
    )
    assert (await _resolve(kubeconfig, "service/db-svc")).pod == "db-0"
    cron = apiserver.create(
        "CronJob",
        "default",
        {
            "metadata": {"name": "nightly"},
            "spec": {
                "schedule": "0 0 * * *",
                "jobTemplate": {
                    "spec": {
                        "template": {
                            "spec": {
                                "restartPolicy": "Never",
                                "containers": [{"name": "c", "image": "busybox:1"}],
                            }
                        }
                    }
                },
            },
        },
    )
    for i in range(2):
        apiserver.create(
            "Job",
            "default",
            {
                "metadata": {
                    "name": f"nightly-{i}",
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "CronJob",
                            "name": "nightly",
                            "uid": cron["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": {
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "c", "image": "busybox:1"}],
                        }
                    }
                },
            },
        )
        await asyncio.sleep(1.05)  # creationTimestamp has a resolution of 1 s
    for _ in range(100):
        pods = apiserver.list("Pod", "default")
        if (
            sum(
                1
                for p in pods
                if p["metadata"]["name"].startswith("nightly-")
                and p["status"].get("phase") == "Running"
            )
            == 2
        ):
            break
        await asyncio.sleep(0.05)
    t = await _resolve(kubeconfig, "cronjob/nightly")
    assert t.pod is not None and t.pod.startswith("nightly-1-"), t
    job_pod = (await _resolve(kubeconfig, "job/nightly-0")).pod
    assert job_pod is not None and job_pod.startswith("nightly-0-")
    apiserver.create(
        "Rollout",
        "default",
        {
            "metadata": {"name": "canary"},
            "spec": {
                "workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web2"}
            },
        },
    )
    names = add_deployment(apiserver, "web2")
    await wait_running(apiserver, "default", names)
    assert (await _resolve(kubeconfig, "rollout/canary")).pod == names[0]


async def test_missing_targets_and_bad_strings_say_what_to_do(
    apiserver: FakeApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        TargetNotFound, match=r"deployment/nope not found in namespace default.*mirrord ls"
    ):
        await _resolve(kubeconfig, "deployment/nope")
    with pytest.raises(KubeError, match="not a Kubernetes target"):
        await _resolve(kubeconfig, "daemonset/x")
    add_deployment(apiserver, "empty", pods=[])
    with pytest.raises(TargetNotFound, match="no running pod"):
        await _resolve(kubeconfig, "deployment/empty")
    with pytest.raises(KubeConfigError, match="does not exist"):
        await load_context(kubeconfig=str(tmp_path / "missing"))
    with pytest.raises(KubeConfigError, match="context 'other' is not in kubeconfig"):
        await load_context(kubeconfig=str(kubeconfig), context="other")
    t = await _resolve(kubeconfig, "targetless", ns="mirrord")
    assert t.targetless and t.namespace == "mirrord"


async def test_kubeconfig_env_and_context_namespace(
    apiserver: FakeApiServer, tmp_path: Path
) -> None:
    path = apiserver.write_kubeconfig(tmp_path / "kc2", context="dev", namespace="team-a")
    kube = await load_context(env={"KUBECONFIG": str(path)})
    assert (kube.context, kube.namespace) == ("dev", "team-a")
    kube = await load_context(env={"KUBECONFIG": str(path)}, namespace="other")
    assert kube.namespace == "other"
    assert "token" not in repr(kube).lower() or apiserver.token not in repr(kube)
    other = apiserver.write_kubeconfig(tmp_path / "kc3", context="prod")
    kube = await load_context(
        env={"KUBECONFIG": f"{tmp_path / 'missing'}:{other}:{path}"}, context="dev"
    )
    assert (kube.context, kube.namespace) == ("dev", "team-a")


async def test_ls_leaves_out_mirrords_own_agent_jobs_and_pods(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    names = add_deployment(apiserver, "web")
    labels = {
        "app.kubernetes.io/name": "mirrord-agent",
        "app.kubernetes.io/instance": "mirrord-agent-x1",
    }
    container = {"name": "mirrord-agent", "image": "registry.example/web:1.0"}
    apiserver.create(
        "Job",
        "default",
        {
            "metadata": {"name": "mirrord-agent-x1", "labels": labels},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [container], "restartPolicy": "Never"},
                },
            },
            "status": {"active": 1},
        },
    )
    apiserver.create(
        "Pod",
        "default",
        {
            "metadata": {"name": "mirrord-agent-x2", "labels": labels},
            "spec": {"containers": [container]},
        },
    )
    await wait_running(apiserver, "default", [*names, "mirrord-agent-x2"])
    found = await list_targets(kubeconfig=str(kubeconfig))
    paths = [t["path"] for t in found["targets"]]
    assert "deployment/web" in paths and f"pod/{names[0]}/container/app" in paths
    assert not [p for p in paths if "mirrord-agent" in p], paths


async def test_ls_against_a_server_that_is_not_an_api_server_fails(tmp_path: Path) -> None:
    """A URL that answers 404 to everything (a wrong port, a proxy without the API) or nothing
    at all: `mirrord ls` exits 1 with a message, never "no targets"."""

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="404 page not found\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_found)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        for server, needle in (
            (f"http://127.0.0.1:{port}", "answered 404 Not Found to every list"),
            (f"http://127.0.0.1:{closed}", "cannot reach the API server"),
        ):
            config = tmp_path / "kubeconfig"
            config.write_text(
                json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "clusters": [{"name": "c", "cluster": {"server": server}}],
                        "users": [{"name": "u", "user": {"token": "t"}}],
                        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                        "current-context": "x",
                    }
                )
            )
            with temp_mirrord("mrdk") as cli:
                cli.env["KUBECONFIG"] = str(config)
                result = await asyncio.to_thread(cli.run, "ls", "--timeout", "20")
            assert result.returncode == 1, (server, result.stdout, result.stderr)
            assert needle in result.stderr and "Traceback" not in result.stderr
            assert "no targets" not in result.stdout
    finally:
        await runner.cleanup()
