"""The controllers of the in-process API server: scheduler, Job controller, garbage collector and
a "kubelet" that runs pods as real local processes.

Owns: object defaults that controllers set, pod scheduling (nodeName / nodeSelector, or an
Unschedulable condition), image pulls (a configurable set of images fails with ErrImagePull then
ImagePullBackOff), running containers, container logs, pod deletion, the cgroups that make a
target container's ID findable by a `/proc/*/cgroup` scan, and dialing a pod's port for
port-forward. The processes, logs and cgroups behind the pods are `_runtime.py`'s; the pod
status objects (conditions, container statuses, defaults) `_podstatus.py`'s.

How containers run here
-----------------------
- A container whose command is `mirrord-agent` (the agent) or `python3 -m mirrord....` (the
  chart's node agent) runs as a real local process with this interpreter. A pod's own
  containers get a fresh network namespace (`unshare --net`, `lo` up), like a real pod
  sandbox; with `hostPID` they stay in the host PID namespace, without it they get their own
  (`unshare --pid --fork --mount-proc`, the agent is PID 1 there). An ephemeral container joins
  the network namespace of the pod it was added to (`nsenter --net`), like a real one.
- Port-forward dials 127.0.0.1:PORT inside the pod's network namespace (setns in a worker
  thread), as the real kubelet does; tcpSocket readiness probes dial the same way.
- Target pods are real local namespace pods (`mirrord.localpod`): a test creates the pod object
  and binds the pod's process to a container with `bind_process()`. The kubelet then puts that
  process into a cgroup v2 directory named after the container ID under
  `/sys/fs/cgroup/unified/mrdkube<pid>/pod<uid>/<id>` (this machine mounts cgroup v2 there, next
  to v1 hierarchies), so the agent's cgroup scan finds it exactly as on a node.
- Any other image "runs" with no process (a pause container): it is Running, but nothing
  listens on its ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tests.kube.apiserver._podstatus import (
    condition,
    is_agent,
    node_ip,
    node_labels,
    plural_of,
    pod_defaults,
    pod_ip,
    running_status,
    split_api_version,
    waiting_status,
)
from tests.kube.apiserver._runtime import (
    CGROUP_PREFIX,
    CGROUP_ROOT,
    ContainerRuntime,
    PodRuntime,
    connect_in_netns,
    new_container_id,
    rmtree_cgroup,
)
from tests.kube.apiserver._store import (
    Obj,
    Resource,
    Store,
    find_resource,
    now_rfc3339,
    random_suffix,
)

if TYPE_CHECKING:
    pass

PODS = find_resource("", "v1", "pods")
JOBS = find_resource("batch", "v1", "jobs")
assert PODS is not None and JOBS is not None


class Kubelet:
    """Scheduler, Job controller, garbage collector and kubelet for every node of the server."""

    def __init__(self, store: Store, *, nodes: list[str]) -> None:
        self.store = store
        self.nodes = nodes
        self.pods: dict[tuple[str, str], PodRuntime] = {}
        self.pull_errors: dict[str, str] = {}  # image -> the registry's message
        self.unschedulable: str | None = None  # when set, every unpinned pod is Unschedulable
        self.agent_argv: list[str] = [sys.executable, "-m", "mirrord.agent"]
        # The Job controller's pod labels: both (Kubernetes >= 1.27); before 1.27 only the
        # legacy `controller-uid`/`job-name`. And how long it takes to create the pod.
        self.job_pod_labels: set[str] = {
            "batch.kubernetes.io/controller-uid",
            "batch.kubernetes.io/job-name",
            "controller-uid",
            "job-name",
        }
        self.job_pod_delay = 0.0
        self.env_extra: dict[str, str] = {}
        # Admission checks (shared with the server): the Job controller's pod creates go
        # through them too, and a denial becomes a FailedCreate event on the Job.
        self.admission: list[Callable[[Resource, str | None, Obj], Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._cgroup_base = CGROUP_ROOT / f"{CGROUP_PREFIX}{os.getpid()}"
        self.on_portforward_dial: list[Callable[[str, str, int], None]] = []
        store.on_change.append(self._on_change)

    # ------------------------------------------------------------------ lifecycle

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        for rt in list(self.pods.values()):
            await self._kill_pod(rt)
        pumps = [t for t in self._pumps if not t.done()]
        if pumps:
            # Log pumps end on their own once the processes are gone; let them read EOF so
            # no subprocess transport outlives the loop.
            await asyncio.wait(pumps, timeout=3)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(OSError):
            rmtree_cgroup(self._cgroup_base)

    # ------------------------------------------------------------------ store callbacks

    def _on_change(self, type_: str, res: Resource, obj: Obj) -> None:
        if res.plural == "pods" and res.group == "":
            if type_ == "ADDED":
                self.spawn(self._run_pod(obj["metadata"]["namespace"], obj["metadata"]["name"]))
        elif res.plural == "daemonsets" and type_ == "ADDED":
            self._daemonset_controller(obj)
        elif res.plural == "jobs" and type_ == "ADDED":
            self.spawn(self._job_controller(obj["metadata"]["namespace"], obj["metadata"]["name"]))
        if type_ == "DELETED":
            self._garbage_collect(obj)

    def _garbage_collect(self, owner: Obj) -> None:
        """Background cascading deletion: dependents whose ownerReference names the owner."""
        uid = owner["metadata"]["uid"]
        for (_g, _p, ns, name), dep in list(self.store.objects.items()):
            refs = dep["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                res = find_resource(*split_api_version(dep["apiVersion"]), plural_of(dep))
                if res is not None:
                    self.spawn(self.delete_object(res, ns or None, name, grace=None))

    async def delete_object(
        self, res: Resource, ns: str | None, name: str, grace: int | None
    ) -> None:
        """Delete as the API server does: pods with running containers terminate first."""
        obj = self.store.find(res, ns, name)
        if obj is None:
            return
        if res.plural == "pods" and res.group == "":
            rt = self.pods.get((ns or "", name))
            if rt is not None and grace != 0 and "deletionTimestamp" not in obj["metadata"]:
                obj["metadata"]["deletionTimestamp"] = now_rfc3339()
                obj["metadata"]["deletionGracePeriodSeconds"] = 30 if grace is None else grace
                self.store.replace(res, obj)
            if rt is not None:
                await self._kill_pod(rt)
                self.pods.pop((ns or "", name), None)
        if self.store.find(res, ns, name) is not None:
            self.store.delete(res, ns, name)

    # ------------------------------------------------------------------ daemonset controller

    def _daemonset_controller(self, ds: Obj) -> None:
        """One pod per node, pinned with nodeName, owned by the DaemonSet."""
        tmpl = ds["spec"]["template"]
        ns = ds["metadata"]["namespace"]
        for node in self.nodes:
            pod = {
                "metadata": {
                    "name": f"{ds['metadata']['name']}-{random_suffix()}",
                    "labels": dict((tmpl.get("metadata") or {}).get("labels") or {}),
                    "annotations": dict((tmpl.get("metadata") or {}).get("annotations") or {}),
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "DaemonSet",
                            "name": ds["metadata"]["name"],
                            "uid": ds["metadata"]["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": {**copy.deepcopy(tmpl["spec"]), "nodeName": node},
            }
            self.store.create(PODS, ns, pod_defaults(pod))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ job controller

    async def _job_controller(self, ns: str, name: str) -> None:
        await asyncio.sleep(self.job_pod_delay)
        job = self.store.find(JOBS, ns, name)  # type: ignore[arg-type]
        if job is None:
            return
        pod = self._job_pod(job, name)
        for check in self.admission:
            err = check(PODS, ns, pod)  # type: ignore[arg-type]
            if err is not None:
                self._failed_create(ns, name, job["metadata"]["uid"], err.message)
                return
        pod_obj = self.store.create(PODS, ns, pod_defaults(pod))  # type: ignore[arg-type]
        job = self.store.find(JOBS, ns, name)  # type: ignore[arg-type]
        if job is None:
            return
        job["status"] = {"active": 1, "startTime": now_rfc3339(), "ready": 0}
        self.store.replace(JOBS, job)  # type: ignore[arg-type]
        await self._follow_job_pod(ns, name, pod_obj["metadata"]["name"])

    def _job_pod(self, job: Obj, name: str) -> Obj:
        """The pod the Job controller makes from `job`'s template (labels as configured)."""
        tmpl = job["spec"]["template"]
        meta = dict(tmpl.get("metadata") or {})
        labels = dict(meta.get("labels") or {})
        uid = job["metadata"]["uid"]
        labels.update(
            {
                key: value
                for key, value in {
                    "batch.kubernetes.io/controller-uid": uid,
                    "batch.kubernetes.io/job-name": name,
                    "controller-uid": uid,
                    "job-name": name,
                }.items()
                if key in self.job_pod_labels
            }
        )
        pod = {
            "metadata": {
                "name": f"{name}-{random_suffix()}",
                "labels": labels,
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": tmpl["spec"],
        }
        return pod

    def _failed_create(self, ns: str, name: str, uid: str, message: str) -> None:
        """The FailedCreate event of a Job whose pod admission refused."""
        self.store.create(
            find_resource("", "v1", "events"),  # type: ignore[arg-type]
            ns,
            {
                "metadata": {"name": f"{name}.{random_suffix(8)}"},
                "involvedObject": {
                    "kind": "Job",
                    "name": name,
                    "namespace": ns,
                    "uid": uid,
                    "apiVersion": "batch/v1",
                },
                "reason": "FailedCreate",
                "message": f"Error creating: {message}",
                "type": "Warning",
                "source": {"component": "job-controller"},
                "count": 1,
                "firstTimestamp": now_rfc3339(),
                "lastTimestamp": now_rfc3339(),
            },
        )

    async def _follow_job_pod(self, ns: str, name: str, pod_name: str) -> None:
        """Follow the Job's pod to finish the Job and honour ttlSecondsAfterFinished."""
        for _ in range(100000):
            await asyncio.sleep(0.1)
            p = self.store.find(PODS, ns, pod_name)  # type: ignore[arg-type]
            job = self.store.find(JOBS, ns, name)  # type: ignore[arg-type]
            if job is None:
                return
            phase = (p or {}).get("status", {}).get("phase")
            if p is None or phase in ("Succeeded", "Failed"):
                ok = phase == "Succeeded"
                job["status"] = {
                    "succeeded" if ok else "failed": 1,
                    "startTime": job["status"].get("startTime"),
                    "completionTime": now_rfc3339(),
                    "conditions": [
                        {
                            "type": "Complete" if ok else "Failed",
                            "status": "True",
                            "lastProbeTime": now_rfc3339(),
                            "lastTransitionTime": now_rfc3339(),
                        }
                    ],
                }
                self.store.replace(JOBS, job)  # type: ignore[arg-type]
                ttl = job["spec"].get("ttlSecondsAfterFinished")
                if ttl is not None:
                    await asyncio.sleep(float(ttl))
                    if self.store.find(JOBS, ns, name) is not None:  # type: ignore[arg-type]
                        await self.delete_object(JOBS, ns, name, grace=None)  # type: ignore[arg-type]
                return

    # ------------------------------------------------------------------ scheduler + kubelet

    def _set_pod(self, ns: str, name: str, change: Callable[[Obj], None]) -> Obj | None:
        pod = self.store.find(PODS, ns, name)  # type: ignore[arg-type]
        if pod is None:
            return None
        change(pod)
        self.store.replace(PODS, pod)  # type: ignore[arg-type]
        return pod

    async def _run_pod(self, ns: str, name: str) -> None:
        await asyncio.sleep(0.02)  # the scheduler runs after the create returned
        pod = self.store.find(PODS, ns, name)  # type: ignore[arg-type]
        if pod is None or pod.get("status", {}).get("phase") not in (None, "Pending"):
            return
        if pod["metadata"].get("annotations", {}).get("test.mirrord/bound") == "true":
            return  # a test drives this pod's status itself (bind_process)
        node = pod["spec"].get("nodeName")
        if not node:
            selector = pod["spec"].get("nodeSelector") or {}
            candidates = [
                n
                for n in self.nodes
                if all(node_labels(n).get(k) == v for k, v in selector.items())
            ]
            if self.unschedulable or not candidates:
                message = self.unschedulable or (
                    f"0/{len(self.nodes)} nodes are available: {len(self.nodes)} node(s) didn't "
                    "match Pod's node affinity/selector. preemption: 0/1 nodes are available: "
                    "1 Preemption is not helpful for scheduling."
                )

                def unschedulable(p: Obj) -> None:
                    p["status"]["conditions"] = [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": message,
                            "lastTransitionTime": now_rfc3339(),
                        }
                    ]

                self._set_pod(ns, name, unschedulable)
                return
            node = candidates[0]

            def bind(p: Obj) -> None:
                p["spec"]["nodeName"] = node

            self._set_pod(ns, name, bind)
        elif node not in self.nodes:
            return  # a pod pinned to a node that does not exist stays Pending, as in a cluster
        await self._start_containers(ns, name)

    def pod_event(
        self,
        ns: str,
        pod_name: str,
        reason: str,
        message: str,
        *,
        type_: str = "Normal",
        component: str = "kubelet",
    ) -> None:
        """An Event about a pod, as the scheduler and the kubelet record them."""
        pod = self.store.find(PODS, ns, pod_name)  # type: ignore[arg-type]
        self.store.create(
            find_resource("", "v1", "events"),  # type: ignore[arg-type]
            ns,
            {
                "metadata": {"name": f"{pod_name}.{random_suffix(8)}"},
                "involvedObject": {
                    "kind": "Pod",
                    "name": pod_name,
                    "namespace": ns,
                    "uid": (pod or {}).get("metadata", {}).get("uid", ""),
                    "apiVersion": "v1",
                },
                "reason": reason,
                "message": message,
                "type": type_,
                "source": {"component": component},
                "count": 1,
                "firstTimestamp": now_rfc3339(),
                "lastTimestamp": now_rfc3339(),
            },
        )

    async def _start_containers(self, ns: str, name: str) -> None:
        pod = self.store.find(PODS, ns, name)  # type: ignore[arg-type]
        if pod is None:
            return
        containers = pod["spec"]["containers"]

        def scheduled(p: Obj) -> None:
            p["status"]["conditions"] = [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", "False"),
                condition("Ready", "False"),
            ]
            p["status"]["hostIP"] = node_ip(p["spec"]["nodeName"])
            p["status"]["hostIPs"] = [{"ip": node_ip(p["spec"]["nodeName"])}]
            p["status"]["startTime"] = now_rfc3339()
            p["status"]["containerStatuses"] = [
                waiting_status(c, "ContainerCreating", None) for c in containers
            ]

        self._set_pod(ns, name, scheduled)
        self.pod_event(
            ns,
            name,
            "Scheduled",
            f"Successfully assigned {ns}/{name} to {pod['spec']['nodeName']}",
            component="default-scheduler",
        )
        await asyncio.sleep(0.05)
        bad = [c for c in containers if c.get("image") in self.pull_errors]
        if bad:
            await self._image_pull_failure(ns, name, bad)
            return
        rt = PodRuntime(ns, name, pod["metadata"]["uid"])
        self.pods[(ns, name)] = rt
        for c in containers:
            cr = ContainerRuntime(c["name"], new_container_id())
            rt.containers[c["name"]] = cr
            image = c.get("image")
            self.pod_event(
                ns, name, "Pulled", f'Container image "{image}" already present on machine'
            )
            self.pod_event(ns, name, "Created", f"Created container: {c['name']}")
            if is_agent(c):
                await self._spawn_agent(
                    rt, cr, c, join_netns=None, host_pid=bool(pod["spec"].get("hostPID"))
                )
            self.pod_event(ns, name, "Started", f"Started container {c['name']}")

        def running(p: Obj) -> None:
            p["status"]["phase"] = "Running"
            p["status"]["podIP"] = pod_ip(p)
            p["status"]["podIPs"] = [{"ip": p["status"]["podIP"]}]
            p["status"]["conditions"] = [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", "True"),
                condition("Ready", "True"),
            ]
            p["status"]["containerStatuses"] = [
                running_status(c, rt.containers[c["name"]].container_id) for c in containers
            ]

        self._set_pod(ns, name, running)
        probes = [
            (c["name"], c["readinessProbe"]["tcpSocket"]["port"], c)
            for c in containers
            if (c.get("readinessProbe") or {}).get("tcpSocket")
        ]
        if probes:
            self.spawn(self._readiness(rt, probes))

    async def _readiness(self, rt: PodRuntime, probes: list[tuple[str, Any, Obj]]) -> None:
        """tcpSocket readiness probes: the pod is Ready once every probed port accepts."""

        def ready(value: str) -> Callable[[Obj], None]:
            def change(p: Obj) -> None:
                for cond in p["status"]["conditions"]:
                    if cond["type"] in ("Ready", "ContainersReady"):
                        cond["status"] = value
                for st in p["status"]["containerStatuses"]:
                    st["ready"] = value == "True"

            return change

        self._set_pod(rt.namespace, rt.name, ready("False"))
        for _ in range(600):
            ok = True
            for _name, port, c in probes:
                if isinstance(port, str):  # a named container port
                    port = next(
                        p["containerPort"] for p in c.get("ports", []) if p.get("name") == port
                    )
                try:
                    _r, w = await self.dial(rt.namespace, rt.name, int(port))
                    w.close()
                except OSError:
                    ok = False
            if ok:
                self._set_pod(rt.namespace, rt.name, ready("True"))
                return
            await asyncio.sleep(0.05)

    async def _image_pull_failure(self, ns: str, name: str, bad: list[Obj]) -> None:
        def pull_error(reason: str) -> Callable[[Obj], None]:
            def change(p: Obj) -> None:
                statuses = []
                for c in p["spec"]["containers"]:
                    if c in bad:
                        msg = self.pull_errors[c["image"]]
                        if reason == "ImagePullBackOff":
                            msg = f'Back-off pulling image "{c["image"]}": ErrImagePull: {msg}'
                        statuses.append(waiting_status(c, reason, msg))
                    else:
                        statuses.append(waiting_status(c, "PodInitializing", None))
                p["status"]["containerStatuses"] = statuses

            return change

        self._set_pod(ns, name, pull_error("ErrImagePull"))
        await asyncio.sleep(0.5)
        self._set_pod(ns, name, pull_error("ImagePullBackOff"))

    async def _spawn_agent(
        self,
        rt: PodRuntime,
        cr: ContainerRuntime,
        spec: Obj,
        *,
        join_netns: int | None,
        host_pid: bool = True,
    ) -> None:
        command = list(spec.get("command") or [])
        if command[0] == "python3":
            argv = [sys.executable, *command[1:], *list(spec.get("args") or [])]
        else:
            argv = [*self.agent_argv, *command[1:], *list(spec.get("args") or [])]
        env = dict(os.environ)
        env.update(self.env_extra)
        for item in spec.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
        if join_netns is not None:
            argv = ["nsenter", f"--net=/proc/{join_netns}/ns/net", "--", *argv]
        elif host_pid:
            argv = ["unshare", "--net", "--", *argv]
        else:
            # Its own PID namespace, where the agent is PID 1 (targetless: `--target pid/1`).
            argv = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--", *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        cr.process = proc
        if join_netns is None:
            rt.netns_pid = proc.pid
            # `unshare` creates the namespace after it starts: wait for that before `lo up`.
            own = os.stat("/proc/self/ns/net").st_ino
            for _ in range(400):
                try:
                    if os.stat(f"/proc/{proc.pid}/ns/net").st_ino != own:
                        break
                except OSError:
                    break
                await asyncio.sleep(0.005)
            lo = await asyncio.create_subprocess_exec(
                "nsenter", "-t", str(proc.pid), "-n", "ip", "link", "set", "lo", "up"
            )
            await lo.wait()
        pump = self.spawn(self._pump_log(rt, cr))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)

    async def _pump_log(self, rt: PodRuntime, cr: ContainerRuntime) -> None:
        proc = cr.process
        assert proc is not None and proc.stdout is not None
        while True:
            chunk = await proc.stdout.read(65536)
            if not chunk:
                break
            cr.log.append(chunk)
        code = await proc.wait()
        cr.log.close()
        ns, name = rt.namespace, rt.name
        if self.pods.get((ns, name)) is not rt:
            return  # the pod is being deleted

        def terminated(p: Obj) -> None:
            key = "ephemeralContainerStatuses" if cr.ephemeral else "containerStatuses"
            for st in p["status"].get(key) or []:
                if st["name"] == cr.name:
                    st["state"] = {
                        "terminated": {
                            "exitCode": code,
                            "reason": "Completed" if code == 0 else "Error",
                            "startedAt": now_rfc3339(),
                            "finishedAt": now_rfc3339(),
                            "containerID": f"containerd://{cr.container_id}",
                        }
                    }
                    st["ready"] = False
                    st["started"] = False
            if not cr.ephemeral and p["spec"].get("restartPolicy") in ("Never", "OnFailure"):
                others = [c for c in rt.containers.values() if not c.ephemeral and c is not cr]
                if all(c.pid is None for c in others):
                    p["status"]["phase"] = "Succeeded" if code == 0 else "Failed"

        self._set_pod(ns, name, terminated)

    async def _kill_pod(self, rt: PodRuntime) -> None:
        for cr in rt.containers.values():
            proc = cr.process
            if proc is not None and proc.returncode is None:
                # The whole process group: `unshare --fork` does not pass signals on.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 3)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            cr.log.close()
        for d in reversed(rt.cgroup_dirs):
            with contextlib.suppress(OSError):
                rmtree_cgroup(d)
        rt.cgroup_dirs.clear()

    # ------------------------------------------------------------------ ephemeral containers

    def add_ephemeral(self, ns: str, name: str, spec: Obj) -> None:
        self.spawn(self._run_ephemeral(ns, name, spec))

    async def _run_ephemeral(self, ns: str, name: str, spec: Obj) -> None:
        await asyncio.sleep(0.05)
        rt = self.pods.get((ns, name))
        if spec.get("image") in self.pull_errors:
            msg = self.pull_errors[spec["image"]]

            def pull_error(p: Obj) -> None:
                p["status"].setdefault("ephemeralContainerStatuses", []).append(
                    waiting_status(spec, "ErrImagePull", msg)
                )

            self._set_pod(ns, name, pull_error)
            return
        if rt is None or rt.netns_pid is None:
            return
        cr = ContainerRuntime(spec["name"], new_container_id(), ephemeral=True)
        rt.containers[spec["name"]] = cr
        if is_agent(spec):
            await self._spawn_agent(rt, cr, spec, join_netns=rt.netns_pid)

        def running(p: Obj) -> None:
            statuses = p["status"].setdefault("ephemeralContainerStatuses", [])
            statuses.append(running_status(spec, cr.container_id))

        self._set_pod(ns, name, running)

    # ------------------------------------------------------------------ target pods

    def bind_process(self, ns: str, name: str, pid: int, *, pod_ip: str) -> dict[str, str]:
        """Make an existing pod object Running with the (test-owned) process `pid` as every one
        of its containers' main process; returns container name -> container ID. The process is
        moved into a cgroup named after the first container's ID."""
        pod = self.store.find(PODS, ns, name)  # type: ignore[arg-type]
        if pod is None:
            raise KeyError(f"{ns}/{name}")
        rt = PodRuntime(ns, name, pod["metadata"]["uid"], netns_pid=pid)
        ids: dict[str, str] = {}
        for i, c in enumerate(pod["spec"]["containers"]):
            cr = ContainerRuntime(c["name"], new_container_id(), bound_pid=pid if i == 0 else None)
            rt.containers[c["name"]] = cr
            ids[c["name"]] = cr.container_id
        first = next(iter(rt.containers.values()))
        pod_dir = self._cgroup_base / f"pod{rt.uid}"
        cdir = pod_dir / first.container_id
        cdir.mkdir(parents=True, exist_ok=True)
        rt.cgroup_dirs = [pod_dir, cdir]
        (cdir / "cgroup.procs").write_text(f"{pid}\n")
        self.pods[(ns, name)] = rt
        node = pod["spec"].get("nodeName") or self.nodes[0]

        def running(p: Obj) -> None:
            p["spec"]["nodeName"] = node
            p["status"] = {
                "phase": "Running",
                "podIP": pod_ip,
                "podIPs": [{"ip": pod_ip}],
                "hostIP": node_ip(node),
                "hostIPs": [{"ip": node_ip(node)}],
                "startTime": now_rfc3339(),
                "qosClass": "BestEffort",
                "conditions": [
                    condition("PodScheduled", "True"),
                    condition("Initialized", "True"),
                    condition("ContainersReady", "True"),
                    condition("Ready", "True"),
                ],
                "containerStatuses": [
                    running_status(c, ids[c["name"]]) for c in p["spec"]["containers"]
                ],
            }

        self._set_pod(ns, name, running)
        return ids

    # ------------------------------------------------------------------ port-forward

    async def dial(
        self, ns: str, name: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        rt = self.pods.get((ns, name))
        if rt is None or rt.netns_pid is None:
            raise OSError(f"pod {ns}/{name} has no running sandbox")
        for cb in self.on_portforward_dial:
            cb(ns, name, port)
        sock = await asyncio.to_thread(connect_in_netns, rt.netns_pid, port)
        return await asyncio.open_connection(sock=sock)
