"""The Kubernetes agent backend: cluster targets get an agent next to the target pod.

Owns: `KubeBackend` (which targets it handles, the RBAC check, target resolution, creating the
agent as a Job on the target's node, an ephemeral container in the target pod, or finding the
node's DaemonSet agent; readiness; sharing one agent between sessions on the same container)
and `KubeAgentHandle` (`connect()` opens a port-forward websocket to the agent; `stop()`
deletes what this backend created once the last session sharing the agent has stopped).

Readiness is a watch on the agent's pod (image pull errors, unschedulable pods and a container
that exits are reported at once with their reason) plus the agent's readiness line (docs/agent.md) read
from the pod's log. Admission denials of our own create calls come back as the call's Status;
a denial of the Job controller's pod create comes back as a FailedCreate event on the Job.

Runs on asyncio (kubernetes_asyncio needs it). Never imported by the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import anyio.abc
from kubernetes_asyncio import client as k8s

from mirrord.backend import Progress
from mirrord.kube._api import ApiCallError, Json, call, log_lines, watch_events
from mirrord.kube._client import KubeContext, load_context
from mirrord.kube._exceptions import AgentPodFailed, KubeError, PortForwardError
from mirrord.kube._portforward import open_port_forward
from mirrord.kube._rbac import check_permissions, needed_permissions
from mirrord.kube._specs import (
    AGENT_CONTAINER,
    PLACEMENTS,
    AgentOptions,
    agent_fingerprint,
    ephemeral_container_spec,
    job_spec,
    placement_of,
    unique_agent_name,
)
from mirrord.kube._targets import TARGET_KINDS, ResolvedTarget, parse_target, resolve_target

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = ["PLACEMENTS", "KubeAgentHandle", "KubeBackend", "placement_of"]

READY_PREFIX = "mirrord-agent ready "
ERROR_PREFIX = "mirrord-agent: error: "
NODE_AGENT_LABEL = "app.kubernetes.io/component=node-agent"
NODE_AGENT_CONTAINER = "node-agent"  # the chart's DaemonSet container
NODE_AGENT_PORT = 61337
_PULL_ERRORS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
}
_CREATE_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


# The label the Job controller puts on a Job's pods (Kubernetes >= 1.27), then the legacy one.
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
# How long reading an unready agent's events and log may take (its Job is deleted after).
_DIAGNOSE_TIMEOUT = 5.0


@dataclass
class _Agent:
    """One agent shared by every handle with the same key."""

    key: str
    description: str
    secret: str
    kube: KubeContext
    namespace: str  # of the pod we port-forward to
    pod: str
    port: int
    preamble: bytes = b""  # sent first on each stream (DaemonSet node agent)
    created: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, ns, name)
    refs: int = 0
    dead: str | None = None  # why the agent is known to be gone


@dataclass(frozen=True)
class _Start:
    """One agent start, as `KubeBackend._create` and each placement's method take it."""

    api: Any  # kubernetes_asyncio.client.ApiClient
    kube: KubeContext
    key: str
    target: ResolvedTarget
    agent_ns: str
    opts: AgentOptions
    progress: Progress
    deadline: float  # anyio.current_time() by which the agent must be ready
    timeout: float  # agent.startup_timeout, for the messages

    @property
    def agent_target(self) -> str:
        """The agent's own `--target`: the container on the node, or its own pod's pid 1."""
        return "pid/1" if self.target.targetless else f"container/{self.target.container_id}"

    def remaining(self) -> float:
        return max(0.0, self.deadline - anyio.current_time())


def _node_agent_ready(pod: Json) -> bool:
    """A node agent pod that sessions may use: running, Ready (its readiness probe passed),
    not being deleted."""
    status = pod.get("status") or {}
    return (
        status.get("phase") == "Running"
        and not pod["metadata"].get("deletionTimestamp")
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
    )


class KubeAgentHandle:
    """A session's reference to a (possibly shared) agent in the cluster."""

    def __init__(self, agent: _Agent, backend: KubeBackend) -> None:
        self._agent = agent
        self._backend = backend
        self.key = agent.key
        self.description = agent.description
        self.secret = agent.secret
        self._stopped = False
        agent.refs += 1

    def __repr__(self) -> str:  # no secret
        return f"<KubeAgentHandle {self.key} pod={self._agent.namespace}/{self._agent.pod}>"

    @property
    def pod(self) -> tuple[str, str]:
        return self._agent.namespace, self._agent.pod

    def alive(self) -> bool:
        return not self._stopped and self._agent.dead is None

    async def connect(self) -> anyio.abc.ByteStream:
        agent = self._agent
        if agent.dead is not None:
            raise AgentPodFailed(agent.dead)
        try:
            stream = await open_port_forward(
                agent.kube.configuration,
                agent.namespace,
                agent.pod,
                agent.port,
                on_end=self._check_gone,
            )
        except PortForwardError as exc:
            gone = await self._backend._why_gone(agent)
            if gone is not None:
                agent.dead = gone
                raise AgentPodFailed(gone) from None
            raise exc from None
        if agent.preamble:
            try:
                with anyio.fail_after(30):
                    await stream.send(agent.preamble)
                    reply = b""
                    while b"\n" not in reply and len(reply) < 4096:
                        reply += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                await stream.aclose()
                raise PortForwardError(
                    f"the node agent {agent.namespace}/{agent.pod} closed the stream: {exc}"
                ) from exc
            except TimeoutError:
                await stream.aclose()
                raise PortForwardError(
                    f"the node agent {agent.namespace}/{agent.pod} did not answer within 30 s"
                ) from None
            line, _, rest = reply.partition(b"\n")
            if line != b"OK":
                await stream.aclose()
                text = line.decode(errors="replace").removeprefix("ERROR ").strip()
                raise AgentPodFailed(f"the node agent {agent.namespace}/{agent.pod}: {text}")
            if rest:
                stream.unreceive(rest)
        return stream

    async def _check_gone(self) -> str | None:
        """Called when a stream to the agent ends: mark the agent dead if its pod is gone,
        and say why."""
        if self._agent.dead is None:
            self._agent.dead = await self._backend._why_gone(self._agent)
        return self._agent.dead

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._backend._release(self._agent)


class KubeBackend:
    """Agents for Kubernetes targets. Constructed with no arguments by the daemon."""

    name = "kube"

    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        self._env = env
        self._agents: dict[str, _Agent] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"<KubeBackend agents={len(self._agents)}>"

    def agent_fingerprint(self, config: MirrordConfig) -> str:
        """See `agent_fingerprint`: the daemon's pool reuses an agent only for equal ones."""
        return agent_fingerprint(config)

    def handles(self, target: str) -> bool:
        return target == "targetless" or target.split("/", 1)[0] in TARGET_KINDS

    # ------------------------------------------------------------------ start

    async def start_agent(
        self, target: str, config: MirrordConfig, progress: Progress
    ) -> KubeAgentHandle:
        timeout = float(config.agent.startup_timeout)
        deadline = anyio.current_time() + timeout
        try:
            # The agent's own wait ends at the deadline with its pod's events and log (read
            # before the Job is deleted); this bound is for the steps before it.
            with anyio.fail_after(timeout + _DIAGNOSE_TIMEOUT + 5):
                return await self._start(target, config, progress, deadline)
        except TimeoutError:
            raise AgentPodFailed(
                f"the agent for {target} did not become ready within {timeout:g} s "
                "(config agent.startup_timeout): check the agent pod's events and log, and that "
                "the API server is reachable"
            ) from None
        except ApiCallError as exc:
            raise KubeError(
                f"the Kubernetes API server refused a request ({exc.status} {exc.reason}): "
                f"{exc.message}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeError(
                f"cannot reach the Kubernetes API server ({exc}): check the server address of "
                "your kubeconfig context and your network/VPN"
            ) from None

    async def _start(
        self, target: str, config: MirrordConfig, progress: Progress, deadline: float
    ) -> KubeAgentHandle:
        placement = placement_of(config)
        kind, _name, _container = parse_target(target)
        if kind == "targetless" and placement == "ephemeral":
            raise KubeError(
                "a targetless session cannot use an ephemeral container (there is no target "
                "pod); set agent.ephemeral: false"
            )
        kube = await load_context(
            kubeconfig=config.kubeconfig,
            context=config.kube_context,
            namespace=config.target.namespace,
            env=self._env,
            accept_invalid_certificates=config.accept_invalid_certificates,
        )
        opts = AgentOptions.from_config(config)
        target_ns = kube.namespace
        # The node agents live in the chart's namespace; a Job goes next to its target.
        agent_ns = opts.namespace or ("mirrord" if placement == "daemonset" else target_ns)
        async with k8s.ApiClient(kube.configuration) as api:
            progress(f"checking permissions in context {kube.context}")
            await check_permissions(
                api,
                needed_permissions(
                    placement=placement,
                    target_kind=kind,
                    target_ns=target_ns,
                    agent_ns=agent_ns,
                ),
            )
            resolved = await resolve_target(api, target, target_ns)
            progress(f"target {resolved.note}")
            # Sessions share an agent only when it was started as this one asks (same
            # placement, image, namespace and agent settings): the fingerprint is in the key.
            settings = agent_fingerprint(config)
            if resolved.targetless:
                key = f"kube:{kube.context}/{target_ns}/targetless/{secrets.token_hex(4)}"
            else:
                key = (
                    f"kube:{kube.context}/{target_ns}/{resolved.pod}/{resolved.container}"
                    f"@{settings}"
                )
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                existing = self._agents.get(key)
                if existing is not None and existing.dead is None:
                    progress(f"reusing agent {existing.description}")
                    return KubeAgentHandle(existing, self)
                start = _Start(
                    api=api,
                    kube=kube,
                    key=key,
                    target=resolved,
                    agent_ns=agent_ns,
                    opts=opts,
                    progress=progress,
                    deadline=deadline,
                    timeout=float(config.agent.startup_timeout),
                )
                agent = await self._create(start, placement)
                self._agents[key] = agent
                progress(f"agent ready: {agent.description}")
                return KubeAgentHandle(agent, self)

    async def _create(self, start: _Start, placement: str) -> _Agent:
        """The agent for `start` in its `placement`: the node's agent (found, not created), an
        ephemeral container added to the target pod, or a Job on the target's node."""
        secret = secrets.token_urlsafe(32)
        port = random.randrange(40000, 60000)
        if placement == "daemonset":
            return await self._node_agent(start, secret)
        if placement == "ephemeral":
            return await self._ephemeral_agent(start, secret, port)
        return await self._job_agent(start, secret, port)

    async def _ephemeral_agent(self, start: _Start, secret: str, port: int) -> _Agent:
        target = start.target
        assert target.pod is not None and target.container is not None
        name = unique_agent_name()
        spec = ephemeral_container_spec(
            name=name,
            target=start.agent_target,
            target_container=target.container,
            port=port,
            secret=secret,
            opts=start.opts,
        )
        start.progress(f"adding ephemeral container {name} to pod {target.pod}")
        await _create_call(
            f"the agent's ephemeral container in pod {target.pod}",
            k8s.CoreV1Api(start.api).patch_namespaced_pod_ephemeralcontainers,
            target.pod,
            target.namespace,
            {"spec": {"ephemeralContainers": [spec]}},
        )
        agent = _Agent(
            key=start.key,
            description=f"ephemeral container {name} in pod {target.namespace}/{target.pod}",
            secret=secret,
            kube=start.kube,
            namespace=target.namespace,
            pod=target.pod,
            port=port,
        )
        api = start.api
        with anyio.move_on_after(start.remaining()) as waiting:
            await self._wait_pod_ready(api, target.namespace, target.pod, name, ephemeral=True)
            await self._wait_ready_line(api, target.namespace, target.pod, name)
        if waiting.cancelled_caught:
            raise AgentPodFailed(
                await self._not_ready(
                    api,
                    target.namespace,
                    target.pod,
                    name,
                    start.timeout,
                    what=f"the agent container {name} in pod {target.namespace}/{target.pod}",
                )
            )
        return agent

    async def _job_agent(self, start: _Start, secret: str, port: int) -> _Agent:
        """A Job on the target's node (any node for a targetless agent); deleted again when
        its agent does not become ready."""
        target, agent_ns, api = start.target, start.agent_ns, start.api
        name = unique_agent_name()
        body = job_spec(
            name=name,
            namespace=agent_ns,
            target=start.agent_target,
            node=target.node,
            port=port,
            secret=secret,
            opts=start.opts,
            host_pid=not target.targetless,
        )
        start.progress(
            f"creating agent job {agent_ns}/{name}"
            + (f" on node {target.node}" if target.node else "")
        )
        await _create_call(
            "the agent job", k8s.BatchV1Api(api).create_namespaced_job, agent_ns, body
        )
        agent = _Agent(
            key=start.key,
            description=f"job {agent_ns}/{name}",
            secret=secret,
            kube=start.kube,
            namespace=agent_ns,
            pod="",
            port=port,
            created=[("Job", agent_ns, name)],
        )
        try:
            with anyio.move_on_after(start.remaining()) as waiting:
                pod = await self._wait_job_pod(api, agent_ns, name)
                agent.pod = pod
                agent.description = f"pod {agent_ns}/{pod} (job {name})"
                await self._wait_pod_ready(api, agent_ns, pod, AGENT_CONTAINER, ephemeral=False)
                await self._wait_ready_line(api, agent_ns, pod, AGENT_CONTAINER)
            if waiting.cancelled_caught:
                # read what the cluster knows before the Job (and its pod) is deleted below
                what = (
                    f"the agent pod {agent_ns}/{agent.pod} (job {name})"
                    if agent.pod
                    else f"the agent job {agent_ns}/{name} (no pod created yet)"
                )
                raise AgentPodFailed(
                    await self._not_ready(
                        api, agent_ns, agent.pod or name, AGENT_CONTAINER, start.timeout, what=what
                    )
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._delete_created(start.kube, agent.created)
            raise
        return agent

    async def _node_agent(self, start: _Start, secret: str) -> _Agent:
        target, agent_ns = start.target, start.agent_ns
        if target.targetless:
            raise KubeError(
                "the node agent (agent.placement: daemonset) serves targets on its node; a "
                "targetless session needs agent.placement: job"
            )
        core = k8s.CoreV1Api(start.api)
        selector = {
            "label_selector": NODE_AGENT_LABEL,
            "field_selector": f"spec.nodeName={target.node}",
        }
        pods = await call(core.list_namespaced_pod, agent_ns, **selector)
        items = [p for p in pods.get("items") or [] if not p["metadata"].get("deletionTimestamp")]
        ready = [p for p in items if _node_agent_ready(p)]
        if not ready and items:
            # The chart's node agent on that node is starting (just installed, or restarted):
            # wait for it, within agent.startup_timeout, instead of failing the session.
            starting = items[0]["metadata"]["name"]
            start.progress(f"waiting for node agent {agent_ns}/{starting} to be ready")
            with anyio.move_on_after(start.remaining()):
                for _ in range(1000):  # each watch ends at timeoutSeconds: start another
                    async for type_, obj in watch_events(
                        core.list_namespaced_pod, agent_ns, timeout_seconds=30, **selector
                    ):
                        if type_ in ("ADDED", "MODIFIED") and _node_agent_ready(obj):
                            ready = [obj]
                            break
                    if ready:
                        break
            if not ready:
                raise AgentPodFailed(
                    await self._not_ready(
                        start.api,
                        agent_ns,
                        starting,
                        NODE_AGENT_CONTAINER,
                        start.timeout,
                        what=f"the node agent {agent_ns}/{starting} on node {target.node}",
                    )
                )
        if not ready:
            raise AgentPodFailed(
                f"no ready mirrord node agent on node {target.node} in namespace {agent_ns}: "
                "install the Helm chart with agentDaemonSet.enabled=true (and check its "
                "nodeSelector/tolerations cover that node), or use agent.placement: job"
            )
        pod = ready[0]["metadata"]["name"]
        start.progress(f"using node agent {agent_ns}/{pod} on node {target.node}")
        preamble = f"MIRRORD-NODE target=container/{target.container_id} secret={secret}\n"
        return _Agent(
            key=start.key,
            description=f"node agent {agent_ns}/{pod} for {target.pod}/{target.container}",
            secret=secret,
            kube=start.kube,
            namespace=agent_ns,
            pod=pod,
            port=NODE_AGENT_PORT,
            preamble=preamble.encode(),
        )

    # ------------------------------------------------------------------ readiness

    async def _wait_job_pod(self, api: Any, ns: str, job: str) -> str:
        """The name of the Job's pod, once the Job controller created it; a FailedCreate event
        (admission denial, quota) is reported at once. Both come from watches (the pod by its
        `batch.kubernetes.io/job-name` label, or `job-name` on servers before 1.27; the Job's
        events), not from polling."""
        core = k8s.CoreV1Api(api)
        found: list[str] = []
        failed: list[str] = []

        async def watch_pods(label: str, scope: anyio.CancelScope) -> None:
            for _ in range(1000):  # each watch ends at timeoutSeconds: start another
                async for type_, obj in watch_events(
                    core.list_namespaced_pod,
                    ns,
                    label_selector=f"{label}={job}",
                    timeout_seconds=30,
                ):
                    if type_ in ("ADDED", "MODIFIED"):
                        found.append(str(obj["metadata"]["name"]))
                        scope.cancel()
                        return

        async def watch_failures(scope: anyio.CancelScope) -> None:
            for _ in range(1000):
                async for _type, event in watch_events(
                    core.list_namespaced_event,
                    ns,
                    field_selector=f"involvedObject.kind=Job,involvedObject.name={job}",
                    timeout_seconds=30,
                ):
                    if event.get("reason") == "FailedCreate":
                        failed.append(str(event.get("message")))
                        scope.cancel()
                        return

        async with anyio.create_task_group() as tg:
            for label in JOB_NAME_LABELS:
                tg.start_soon(watch_pods, label, tg.cancel_scope)
            tg.start_soon(watch_failures, tg.cancel_scope)
        if failed:
            raise AgentPodFailed(f"the agent job {ns}/{job} cannot create its pod: {failed[0]}")
        if found:
            return found[0]
        raise AgentPodFailed(f"the agent job {ns}/{job} created no pod")  # pragma: no cover

    async def _wait_pod_ready(
        self, api: Any, ns: str, pod: str, container: str, *, ephemeral: bool
    ) -> None:
        """Watch the pod until `container` runs; raise with the reason when it cannot."""
        core = k8s.CoreV1Api(api)
        for _ in range(1000):
            async for type_, obj in watch_events(
                core.list_namespaced_pod,
                ns,
                field_selector=f"metadata.name={pod}",
                timeout_seconds=30,
            ):
                if type_ == "DELETED":
                    raise AgentPodFailed(f"the agent pod {ns}/{pod} was deleted while starting")
                failure = _pod_failure(obj, container, ephemeral=ephemeral)
                if failure is not None:
                    raise AgentPodFailed(await self._with_log(api, ns, pod, container, failure))
                if _container_running(obj, container, ephemeral=ephemeral):
                    return

    async def _not_ready(
        self, api: Any, ns: str, name: str, container: str, timeout: float, *, what: str
    ) -> str:
        """Why `what` is not ready after `timeout`: the last events of the pod (or Job) `name`
        and the last lines of its container's log, each read within a few seconds."""
        core: Any = k8s.CoreV1Api(api)
        events: list[str] = []
        log: list[str] = []
        with anyio.move_on_after(_DIAGNOSE_TIMEOUT):
            with contextlib.suppress(ApiCallError, aiohttp.ClientError, OSError, ValueError):
                out = await call(
                    core.list_namespaced_event, ns, field_selector=f"involvedObject.name={name}"
                )
                items = sorted(
                    out.get("items") or [],
                    key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""),
                )
                events = [f"{e.get('reason')}: {e.get('message')}" for e in items[-5:]]
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                resp = await core.read_namespaced_pod_log(
                    name, ns, container=container, tail_lines=5, _preload_content=False
                )
                try:
                    if resp.status == 200:
                        text = (await resp.read()).decode(errors="replace")
                        log = [ln.strip() for ln in text.splitlines() if ln.strip()][-5:]
                finally:
                    resp.release()
        return (
            f"{what} did not become ready within {timeout:g} s (agent.startup_timeout); "
            f"its last events: {'; '.join(events) or 'none'}; its last log lines: "
            f"{' | '.join(log) or 'none'}. Raise agent.startup_timeout if it is only slow"
        )

    async def _with_log(self, api: Any, ns: str, pod: str, container: str, text: str) -> str:
        """`text`, plus the agent's error line if its log has one."""
        if "exited" not in text:
            return text
        core: Any = k8s.CoreV1Api(api)  # with _preload_content=False it returns the response
        try:
            resp = await core.read_namespaced_pod_log(
                pod, ns, container=container, _preload_content=False
            )
            try:
                log = (await resp.read()).decode(errors="replace") if resp.status == 200 else ""
            finally:
                resp.release()
        except Exception:
            log = ""
        errors = [ln[len(ERROR_PREFIX) :] for ln in log.splitlines() if ln.startswith(ERROR_PREFIX)]
        return f"{text}: {errors[-1]}" if errors else text

    async def _wait_ready_line(self, api: Any, ns: str, pod: str, container: str) -> None:
        core = k8s.CoreV1Api(api)
        tail: list[str] = []
        async for line in log_lines(core.read_namespaced_pod_log, pod, ns, container=container):
            tail = [*tail[-2:], line]
            if line.startswith(READY_PREFIX):
                return
            if line.startswith(ERROR_PREFIX):
                raise AgentPodFailed(
                    f"the agent in pod {ns}/{pod} failed: {line[len(ERROR_PREFIX) :]}"
                )
        last = " | ".join(ln.strip() for ln in tail if ln.strip())
        raise AgentPodFailed(
            f"the agent in pod {ns}/{pod} exited before it was ready"
            + (f" (last log lines: {last})" if last else "")
            + f": see `kubectl logs -n {ns} {pod} -c {container}`"
        )

    # ------------------------------------------------------------------ stop / liveness

    async def _why_gone(self, agent: _Agent) -> str | None:
        """Why the agent's pod can no longer be reached, or None if it looks alive."""
        try:
            async with k8s.ApiClient(agent.kube.configuration) as api:
                pod = await call(k8s.CoreV1Api(api).read_namespaced_pod, agent.pod, agent.namespace)
        except ApiCallError as exc:
            if exc.status == 404:
                return f"the agent pod {agent.namespace}/{agent.pod} was deleted"
            return None
        except Exception:
            return None
        if pod["metadata"].get("deletionTimestamp"):
            return f"the agent pod {agent.namespace}/{agent.pod} is being deleted"
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return f"the agent pod {agent.namespace}/{agent.pod} has exited ({phase})"
        return None

    async def _release(self, agent: _Agent) -> None:
        agent.refs -= 1
        if agent.refs > 0:
            return
        if self._agents.get(agent.key) is agent:
            del self._agents[agent.key]
        agent.dead = agent.dead or "the agent was stopped"
        with anyio.CancelScope(shield=True):
            await self._delete_created(agent.kube, agent.created)

    async def _delete_created(self, kube: KubeContext, created: list[tuple[str, str, str]]) -> None:
        """Delete what we created; ephemeral containers cannot be removed: their agent exits
        by itself after its idle timeout."""
        if not created:
            return
        with contextlib.suppress(Exception), anyio.move_on_after(10):
            async with k8s.ApiClient(kube.configuration) as api:
                batch = k8s.BatchV1Api(api)
                for kind, ns, name in created:
                    if kind == "Job":
                        try:
                            await call(
                                batch.delete_namespaced_job,
                                name,
                                ns,
                                propagation_policy="Background",
                            )
                        except ApiCallError as exc:
                            if exc.status != 404:
                                raise
        created.clear()


# ------------------------------------------------------------------------------- helpers


async def _create_call(what: str, method: Callable[..., Any], *args: Any) -> None:
    """An API call that creates `what` for the agent; a refusal (admission, quota, a bad spec)
    is `AgentPodFailed` quoting the API server."""
    try:
        await call(method, *args)
    except ApiCallError as exc:
        raise AgentPodFailed(
            f"the API server refused {what} ({exc.status} {exc.reason}): {exc.message}"
        ) from None


def _statuses(pod: Json, *, ephemeral: bool) -> list[Json]:
    key = "ephemeralContainerStatuses" if ephemeral else "containerStatuses"
    return list((pod.get("status") or {}).get(key) or [])


def _container_running(pod: Json, container: str, *, ephemeral: bool) -> bool:
    return any(
        st.get("name") == container and "running" in (st.get("state") or {})
        for st in _statuses(pod, ephemeral=ephemeral)
    )


def _pod_failure(pod: Json, container: str, *, ephemeral: bool) -> str | None:
    """A reason the agent container will not run, or None while it may still start."""
    ns, name = pod["metadata"].get("namespace"), pod["metadata"]["name"]
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
            return (
                f"the agent pod {ns}/{name} cannot be scheduled: {cond.get('message')} (check "
                "agent.tolerations / agent.node_selector, or node capacity)"
            )
    for st in _statuses(pod, ephemeral=ephemeral):
        if st.get("name") != container:
            continue
        state = st.get("state") or {}
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        if reason in _PULL_ERRORS:
            return (
                f"the agent image {st.get('image')} cannot be pulled ({reason}): "
                f"{waiting.get('message', '')} (check agent.image, agent.image_pull_secrets "
                "and that the node can reach the registry)"
            )
        if reason in _CREATE_ERRORS:
            return f"the agent container cannot start ({reason}): {waiting.get('message', '')}"
        term = state.get("terminated")
        if term:
            return (
                f"the agent container in pod {ns}/{name} exited with code "
                f"{term.get('exitCode')} ({term.get('reason')})"
            )
    if (pod.get("status") or {}).get("phase") == "Failed" and not ephemeral:
        return f"the agent pod {ns}/{name} failed: {(pod.get('status') or {}).get('message', '')}"
    return None
