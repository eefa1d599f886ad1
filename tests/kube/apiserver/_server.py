"""The in-process Kubernetes API server: aiohttp, the real REST paths, Status errors, watches,
logs, SelfSubjectAccessReview, RBAC and websocket port-forward (`v4.channel.k8s.io`).

Owns: HTTP. An unmodified kubernetes_asyncio client reaches it through a kubeconfig written by
`write_kubeconfig()` (bearer token; TLS with a self-signed CA when `tls=True`). Does not own the
controllers or the pods' processes (see `_kubelet`).

Test knobs: `rbac` (rules; `deny()` removes a verb on a resource for the test user),
`admission` (callables that may reject a create with a Status, like PodSecurity or a quota),
`kubelet.pull_errors`, `kubelet.unschedulable`, and the port-forward counters
`portforwards_opened` / `portforwards_open` keyed by (namespace, pod).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import json
import os
import secrets
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.kube.apiserver._errors import ApiError, forbidden
from tests.kube.apiserver._kubelet import Kubelet
from tests.kube.apiserver._podstatus import pod_defaults
from tests.kube.apiserver._portforward import relay_portforward
from tests.kube.apiserver._runtime import cleanup_leftover_cgroups
from tests.kube.apiserver._selectors import parse_field_selector, parse_label_selector
from tests.kube.apiserver._store import (
    Obj,
    Resource,
    Store,
    Watcher,
    find_resource,
    now_rfc3339,
    resource_by_kind,
)

USER = "mirrord-test-user"
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


# What `GET /version` answers: the Kubernetes release this server imitates.
_VERSION_INFO = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2025-12-17T00:00:00Z",
    "goVersion": "go1.25.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclass
class Rule:
    verbs: set[str]
    groups: set[str]
    resources: set[str]  # "pods", "pods/log", "*"

    def allows(self, verb: str, group: str, resource: str) -> bool:
        return (
            ("*" in self.verbs or verb in self.verbs)
            and ("*" in self.groups or group in self.groups)
            and ("*" in self.resources or resource in self.resources)
        )


@dataclass
class Rbac:
    """The test user's permissions: allowed if a rule allows and no denial matches."""

    rules: list[Rule] = field(default_factory=lambda: [Rule({"*"}, {"*"}, {"*"})])
    denied: list[Rule] = field(default_factory=list)

    def deny(self, verb: str, resource: str, group: str = "") -> None:
        self.denied.append(Rule({verb}, {group}, {resource}))

    def allowed(self, verb: str, group: str, resource: str) -> bool:
        if any(d.allows(verb, group, resource) for d in self.denied):
            return False
        return any(r.allows(verb, group, resource) for r in self.rules)


Admission = Callable[[Resource, str | None, Obj], ApiError | None]


class FakeApiServer:
    """`async with FakeApiServer() as server:`; `server.write_kubeconfig(path)`."""

    def __init__(
        self, *, tls: bool = False, nodes: list[str] | None = None, workdir: Path | None = None
    ) -> None:
        self.store = Store()
        self.kubelet = Kubelet(self.store, nodes=nodes or ["node-1"])
        self.rbac = Rbac()
        self.admission: list[Admission] = self.kubelet.admission
        self.token = secrets.token_urlsafe(24)
        self.tls = tls
        self.portforwards_opened: Counter[tuple[str, str]] = Counter()
        self.portforwards_open: Counter[tuple[str, str]] = Counter()
        self.requests: list[tuple[str, str]] = []
        self._workdir_obj: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._workdir_obj = tempfile.TemporaryDirectory(prefix="mrdapi")
            workdir = Path(self._workdir_obj.name)
        self.workdir = workdir
        self._runner: web.AppRunner | None = None
        self._open_ws: set[web.WebSocketResponse] = set()
        self.port = 0
        self.ca_path: Path | None = None
        for ns in ("default", "kube-system", "mirrord"):
            self.store.create(
                resource_by_kind("Namespace"), None, {"metadata": {"name": ns}, "spec": {}}
            )
        for node in self.kubelet.nodes:
            self.store.create(
                resource_by_kind("Node"),
                None,
                {
                    "metadata": {
                        "name": node,
                        "labels": {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux"},
                    },
                    "spec": {},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                },
            )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        cleanup_leftover_cgroups()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        ssl_ctx = None
        if self.tls:
            ssl_ctx = self._make_tls()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        for ws in list(self._open_ws):
            with contextlib.suppress(Exception):
                await ws.close()
        await self.kubelet.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._workdir_obj is not None:
            self._workdir_obj.cleanup()

    def _make_tls(self) -> Any:
        import ssl

        key = self.workdir / "server.key"
        cert = self.workdir / "server.crt"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=kube-apiserver",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        self.ca_path = cert
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        return ctx

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def write_kubeconfig(
        self, path: Path, *, context: str = "fake", namespace: str | None = None
    ) -> Path:
        cluster: dict[str, Any] = {"server": self.url}
        if self.ca_path is not None:
            cluster["certificate-authority"] = str(self.ca_path)
        ctx: dict[str, Any] = {"cluster": "fake-cluster", "user": USER}
        if namespace:
            ctx["namespace"] = namespace
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake-cluster", "cluster": cluster}],
            "users": [{"name": USER, "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": ctx}],
            "current-context": context,
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # ------------------------------------------------------------------ test helpers

    def create(self, kind: str, namespace: str | None, body: Obj) -> Obj:
        """Create an object as an admin would (no RBAC, no admission), with defaults."""
        res = resource_by_kind(kind)
        return self.store.create(res, namespace, _defaults(res, copy.deepcopy(body)))

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        return self.store.find(resource_by_kind(kind), namespace, name)

    def list(self, kind: str, namespace: str | None = None) -> builtins.list[Obj]:
        return self.store.list(resource_by_kind(kind), namespace)

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        await self.kubelet.delete_object(resource_by_kind(kind), namespace, name, grace=None)

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            return await self._route(request)
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path == "/version":
            return web.json_response(_VERSION_INFO)
        segs = [s for s in path.split("/") if s]
        if segs[:1] == ["api"] and len(segs) >= 2:
            group, version, rest = "", segs[1], segs[2:]
        elif segs[:1] == ["apis"] and len(segs) >= 3:
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if group == "authorization.k8s.io" and rest == ["selfsubjectaccessreviews"]:
            return await self._access_review(request)
        ns: str | None = None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else ""), "/".join(rest[2:])
        res = find_resource(group, version, plural)
        if res is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res.namespaced is False and ns is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if (
            ns is not None
            and res.plural != "namespaces"
            and request.method == "POST"
            and self.store.find(resource_by_kind("Namespace"), None, ns) is None
        ):
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
        watch = _go_bool(request.query.get("watch"))
        verb = _VERBS.get(request.method, "get")
        if request.method == "GET" and not name:
            verb = "watch" if watch else "list"
        rbac_resource = f"{plural}/{sub}" if sub else plural
        # The websocket upgrade of a port-forward is a GET, authorised as `get`; since 1.35 the
        # API server also asks for `create`. The message names the verb refused.
        for needed in (verb, "create") if sub == "portforward" else (verb,):
            if not self.rbac.allowed(needed, group, rbac_resource):
                raise forbidden(
                    USER, verb=needed, group=group, resource=rbac_resource, ns=ns, name=name
                )

        if sub:
            if res.plural != "pods":
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if sub == "log" and request.method == "GET":
                return await self._pod_log(request, ns or "default", name)
            if sub == "portforward":
                return await self._portforward(request, ns or "default", name)
            if sub == "ephemeralcontainers":
                return await self._ephemeral(request, res, ns or "default", name)
            if sub == "status" and request.method == "GET":
                return web.json_response(self.store.get(res, ns, name))
            raise ApiError(404, "NotFound", "the server could not find the requested resource")

        return await self._serve_object(request, res, ns, name, watch=watch)

    async def _serve_object(
        self, request: web.Request, res: Resource, ns: str | None, name: str, *, watch: bool
    ) -> web.StreamResponse:
        """get, list, watch, create, delete, patch and replace of `res` objects."""
        if request.method == "GET":
            if name:
                return web.json_response(self.store.get(res, ns, name))
            if watch:
                return await self._watch(request, res, ns)
            return self._list(request, res, ns)
        if request.method == "POST" and not name:
            body = await _json_body(request)
            body.setdefault("metadata", {}).pop("uid", None)  # the server assigns it
            for check in self.admission:
                err = check(res, ns, body)
                if err is not None:
                    raise err
            obj = self.store.create(res, ns, _defaults(res, body))
            return web.json_response(obj, status=201)
        if request.method == "DELETE" and name:
            return await self._delete(request, res, ns, name)
        if request.method in ("PATCH", "PUT") and name:
            obj = copy.deepcopy(self.store.get(res, ns, name))
            body = await _json_body(request)
            new = (
                _apply_patch(obj, body, request.content_type) if request.method == "PATCH" else body
            )
            new["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
            new["metadata"]["uid"] = obj["metadata"]["uid"]
            return web.json_response(self.store.replace(res, new, bump_generation=True))
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")

    def _list(self, request: web.Request, res: Resource, ns: str | None) -> web.Response:
        labels = parse_label_selector(request.query.get("labelSelector"))
        fields = parse_field_selector(request.query.get("fieldSelector"))
        items = [
            o
            for o in self.store.list(res, ns)
            if labels(o["metadata"].get("labels") or {}) and fields(o)
        ]
        return web.json_response(
            {
                "kind": f"{res.kind}List",
                "apiVersion": res.api_version,
                "metadata": {"resourceVersion": self.store.resource_version},
                "items": items,
            }
        )

    async def _delete(
        self, request: web.Request, res: Resource, ns: str | None, name: str
    ) -> web.Response:
        obj = copy.deepcopy(self.store.get(res, ns, name))
        body: Obj = {}
        if request.can_read_body:
            with contextlib.suppress(ValueError):
                body = await request.json() or {}
        policy = request.query.get("propagationPolicy") or body.get("propagationPolicy")
        grace_text = request.query.get("gracePeriodSeconds") or body.get("gracePeriodSeconds")
        grace = int(grace_text) if grace_text is not None else None
        if policy is None and res.kind == "Job":
            policy = "Orphan"  # batch/v1 Jobs orphan their pods unless asked otherwise
        if policy == "Orphan":
            for dep in list(self.store.objects.values()):
                refs = dep["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == obj["metadata"]["uid"] for r in refs):
                    dep["metadata"]["ownerReferences"] = [
                        r for r in refs if r.get("uid") != obj["metadata"]["uid"]
                    ]
        if res.kind == "Pod":
            obj["metadata"]["deletionTimestamp"] = now_rfc3339()
            self.kubelet.spawn(self.kubelet.delete_object(res, ns, name, grace))
            await asyncio.sleep(0)
            return web.json_response(obj)
        await self.kubelet.delete_object(res, ns, name, grace)
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": res.group,
                    "kind": res.plural,
                    "uid": obj["metadata"]["uid"],
                },
            }
        )

    async def _watch(
        self, request: web.Request, res: Resource, ns: str | None
    ) -> web.StreamResponse:
        labels = parse_label_selector(request.query.get("labelSelector"))
        fields = parse_field_selector(request.query.get("fieldSelector"))
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        rv_text = request.query.get("resourceVersion")
        watcher = Watcher(res, ns)
        initial: list[tuple[str, Obj]] = []
        expired = False
        if not rv_text or rv_text == "0":
            initial = [("ADDED", copy.deepcopy(o)) for o in self.store.list(res, ns)]
        else:
            rv = int(rv_text)
            if rv < self.store.oldest_rv() - 1:
                expired = True
            else:
                initial = [
                    (e.type, e.obj)
                    for e in self.store.history
                    if e.rv > rv and e.resource == res and (ns is None or e.namespace == ns)
                ]
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
        except ConnectionError:  # the client went away before the headers: nothing to send
            return response

        async def send(type_: str, obj: Obj) -> None:
            await response.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        if expired:
            await send(
                "ERROR",
                ApiError(
                    410,
                    "Expired",
                    f"too old resource version: {rv_text} ({self.store.oldest_rv()})",
                ).status(),
            )
            await response.write_eof()
            return response
        self.store.watchers.append(watcher)
        deadline = time.monotonic() + timeout
        try:
            for type_, obj in initial:
                if labels(obj["metadata"].get("labels") or {}) and fields(obj):
                    await send(type_, obj)
            while time.monotonic() < deadline:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # aiohttp does not cancel a handler when its client goes away
                try:
                    type_, obj = await asyncio.wait_for(watcher.queue.get(), 0.25)
                except TimeoutError:
                    continue
                if labels(obj["metadata"].get("labels") or {}) and fields(obj):
                    await send(type_, obj)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self.store.watchers.remove(watcher)
        return response

    async def _pod_log(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        pod = self.store.get(resource_by_kind("Pod"), ns, name)
        names = [c["name"] for c in pod["spec"]["containers"]] + [
            c["name"] for c in pod["spec"].get("ephemeralContainers") or []
        ]
        container = request.query.get("container")
        if not container:
            if len(pod["spec"]["containers"]) != 1:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(names)}]",
                )
            container = names[0]
        if container not in names:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        rt = self.kubelet.pods.get((ns, name))
        cr = rt.containers.get(container) if rt is not None else None
        if cr is None:
            raise ApiError(
                400,
                "BadRequest",
                f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating',
            )
        follow = _go_bool(request.query.get("follow"))
        if not follow:
            return web.Response(body=bytes(cr.log.data), content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = 0
        try:
            while True:
                if len(cr.log.data) > sent:
                    await response.write(bytes(cr.log.data[sent:]))
                    sent = len(cr.log.data)
                    continue
                if cr.log.closed:
                    break
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await cr.log.wait_change(0.25)
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    async def _ephemeral(
        self, request: web.Request, res: Resource, ns: str, name: str
    ) -> web.StreamResponse:
        pod = self.store.get(res, ns, name)
        if request.method == "GET":
            return web.json_response(pod)
        body = await _json_body(request)
        if request.method == "PATCH":
            new = _apply_patch(copy.deepcopy(pod), body, request.content_type)
        else:
            new = body
        old_list = pod["spec"].get("ephemeralContainers") or []
        new_list = (new.get("spec") or {}).get("ephemeralContainers") or []
        old_by_name = {c["name"]: c for c in old_list}
        new_by_name = {c["name"]: c for c in new_list}
        for cname, c in old_by_name.items():
            if cname not in new_by_name or _strip_defaults(new_by_name[cname]) != _strip_defaults(
                c
            ):
                raise ApiError(
                    422,
                    "Invalid",
                    f'Pod "{name}" is invalid: spec.ephemeralContainers: Forbidden: existing '
                    "ephemeral containers may not be removed or changed",
                    {"name": name, "kind": "Pod"},
                )
        added = [c for n, c in new_by_name.items() if n not in old_by_name]
        for c in added:
            if not c.get("image"):
                raise ApiError(
                    422,
                    "Invalid",
                    f'Pod "{name}" is invalid: spec.ephemeralContainers[0].image: Required value',
                )
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("imagePullPolicy", "IfNotPresent")
            c.setdefault("resources", {})
        for check in self.admission:
            err = check(res, ns, {**pod, "spec": {**pod["spec"], "ephemeralContainers": new_list}})
            if err is not None:
                raise err
        pod = copy.deepcopy(pod)
        pod["spec"]["ephemeralContainers"] = [*old_list, *added]
        out = self.store.replace(res, pod)
        for c in added:
            self.kubelet.add_ephemeral(ns, name, c)
        return web.json_response(out)

    async def _access_review(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            raise ApiError(405, "MethodNotAllowed", "only POST")
        body = await _json_body(request)
        attrs = (body.get("spec") or {}).get("resourceAttributes") or {}
        resource = attrs.get("resource", "")
        if attrs.get("subresource"):
            resource = f"{resource}/{attrs['subresource']}"
        allowed = self.rbac.allowed(attrs.get("verb", ""), attrs.get("group", ""), resource)
        out = {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": body.get("spec") or {},
            "status": {"allowed": allowed}
            | ({} if allowed else {"reason": "no RBAC policy matched"}),
        }
        return web.json_response(out, status=201)

    async def _portforward(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        pod = self.store.get(resource_by_kind("Pod"), ns, name)
        ports_text = request.query.get("ports", "")
        try:
            ports = [int(p) for p in ports_text.split(",") if p.strip()]
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid port {ports_text!r}") from None
        if not ports:
            raise ApiError(400, "BadRequest", "at least one port must be specified")
        if not pod["spec"].get("nodeName") or pod.get("status", {}).get("phase") != "Running":
            raise ApiError(
                400,
                "BadRequest",
                f"pod {name} does not have a host assigned"
                if not pod["spec"].get("nodeName")
                else f"unable to upgrade connection: pod {name} is not running",
            )
        if "v4.channel.k8s.io" not in request.headers.get("Sec-WebSocket-Protocol", ""):
            raise ApiError(400, "BadRequest", "websocket port-forward needs v4.channel.k8s.io")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",), autoping=True)
        await ws.prepare(request)
        key = (ns, name)
        self.portforwards_opened[key] += 1
        self.portforwards_open[key] += 1
        self._open_ws.add(ws)
        try:
            await relay_portforward(ws, self.kubelet, self.store, (ns, name), ports)
        finally:
            self.portforwards_open[key] -= 1
            self._open_ws.discard(ws)
            if not ws.closed:
                await ws.close()
        return ws


# ------------------------------------------------------------------------------- helpers


def _go_bool(text: str | None) -> bool:
    """Query booleans as the API server (Go's strconv.ParseBool) reads them."""
    return text in ("1", "t", "T", "TRUE", "true", "True")


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "BadRequest", "the request body is not valid JSON") from None


def _merge(target: Any, patch: Any, *, strategic: bool) -> Any:
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif (
            strategic
            and isinstance(v, list)
            and isinstance(target.get(k), list)
            and all(isinstance(x, dict) and "name" in x for x in [*v, *target[k]])
        ):
            by_name = {x["name"]: x for x in target[k]}
            for x in v:
                by_name[x["name"]] = _merge(by_name.get(x["name"], {}), x, strategic=True)
            target[k] = list(by_name.values())
        else:
            target[k] = _merge(target.get(k), v, strategic=strategic)
    return target


def _apply_patch(obj: Obj, patch: Any, content_type: str) -> Obj:
    if content_type == "application/json-patch+json":
        for op in patch:
            parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
            node: Any = obj
            for p in parts[:-1]:
                node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
            last = parts[-1]
            if op["op"] in ("add", "replace"):
                if isinstance(node, list):
                    if last == "-":
                        node.append(op["value"])
                    else:
                        node.insert(int(last), op["value"])
                else:
                    node[last] = op["value"]
            elif op["op"] == "remove":
                if isinstance(node, list):
                    del node[int(last)]
                else:
                    node.pop(last, None)
        return obj
    return _merge(obj, patch, strategic=content_type != "application/merge-patch+json")  # type: ignore[no-any-return]


def _strip_defaults(c: Obj) -> Obj:
    return {
        k: v
        for k, v in c.items()
        if k
        not in (
            "terminationMessagePath",
            "terminationMessagePolicy",
            "imagePullPolicy",
            "resources",
        )
    }


def _defaults(res: Resource, body: Obj) -> Obj:
    """Defaults and server-side checks the real API server applies on create."""
    if res.kind == "Pod":
        if not (body.get("spec") or {}).get("containers"):
            raise ApiError(
                422,
                "Invalid",
                f'Pod "{body.get("metadata", {}).get("name", "")}" is invalid: '
                "spec.containers: Required value",
            )
        return pod_defaults(body)
    if res.kind == "Job":
        meta = body.setdefault("metadata", {})
        uid = meta["uid"] = str(uuid.uuid4())
        job_labels = {"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid}
        if meta.get("name"):
            job_labels |= {"batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"]}
        meta["labels"] = {**job_labels, **(meta.get("labels") or {})}
        spec = body.setdefault("spec", {})
        spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
        tmeta = spec.setdefault("template", {}).setdefault("metadata", {})
        tmeta["labels"] = {**(tmeta.get("labels") or {}), **job_labels}
        tmpl = spec.get("template") or {}
        if (tmpl.get("spec") or {}).get("restartPolicy") not in ("Never", "OnFailure"):
            raise ApiError(
                422,
                "Invalid",
                f'Job.batch "{body.get("metadata", {}).get("name", "")}" is invalid: '
                'spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"',
            )
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        body.setdefault("status", {})
        return body
    if res.kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
        spec = body.setdefault("spec", {})
        if res.kind != "DaemonSet":
            spec.setdefault("replicas", 1)
        body.setdefault("status", {})
        return body
    if res.kind == "Service":
        spec = body.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("clusterIP", f"10.96.{os.getpid() % 250}.{len(body) + 10}")
        spec.setdefault("sessionAffinity", "None")
        body.setdefault("status", {"loadBalancer": {}})
        return body
    body.setdefault("spec", body.get("spec", {}))
    return body
