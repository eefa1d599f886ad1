"""The object store of the in-process API server: resources, resource versions, watch events.

Owns: the resource table (which REST paths exist), objects with server-set metadata (uid,
resourceVersion, creationTimestamp, generation), a bounded event history (so a watch from an
old resourceVersion gets 410 Expired, as on a compacted etcd) and the queues of open watches.
Does not own HTTP (see `_server`) nor controllers (see `_kubelet`).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.kube.apiserver._errors import ApiError, already_exists, not_found

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: list[Resource] = [
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "services", "Service"),
    Resource("", "v1", "namespaces", "Namespace", namespaced=False),
    Resource("", "v1", "nodes", "Node", namespaced=False),
    Resource("", "v1", "serviceaccounts", "ServiceAccount"),
    Resource("", "v1", "secrets", "Secret"),
    Resource("", "v1", "events", "Event"),
    Resource("apps", "v1", "deployments", "Deployment"),
    Resource("apps", "v1", "replicasets", "ReplicaSet"),
    Resource("apps", "v1", "statefulsets", "StatefulSet"),
    Resource("apps", "v1", "daemonsets", "DaemonSet"),
    Resource("batch", "v1", "jobs", "Job"),
    Resource("batch", "v1", "cronjobs", "CronJob"),
    Resource("argoproj.io", "v1alpha1", "rollouts", "Rollout"),
]

_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


def find_resource(group: str, version: str, plural: str) -> Resource | None:
    return _BY_PATH.get((group, version, plural))


def resource_by_kind(kind: str) -> Resource:
    for r in RESOURCES:
        if r.kind == kind:
            return r
    raise KeyError(kind)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(n: int = 5) -> str:
    # The real generator avoids vowels and look-alike digits so names never spell words.
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=n))


@dataclass
class Watcher:
    resource: Resource
    namespace: str | None
    queue: asyncio.Queue[tuple[str, Obj]] = field(default_factory=asyncio.Queue)


@dataclass
class Event:
    rv: int
    resource: Resource
    namespace: str | None
    type: str
    obj: Obj


Key = tuple[str, str, str, str]  # group, plural, namespace ("" when cluster-scoped), name


class Store:
    """Objects by (group, plural, namespace, name); every write bumps the resourceVersion."""

    HISTORY = 500  # events kept for watches that resume from a resourceVersion

    def __init__(self) -> None:
        self._rv = 1000
        self.objects: dict[Key, Obj] = {}
        self.history: list[Event] = []
        self.watchers: list[Watcher] = []
        self.on_change: list[Callable[[str, Resource, Obj], None]] = []

    # ---------------------------------------------------------------------- reading

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    @staticmethod
    def key(res: Resource, namespace: str | None, name: str) -> Key:
        return (res.group, res.plural, namespace or "", name)

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        obj = self.objects.get(self.key(res, namespace, name))
        if obj is None:
            raise not_found(res.group, res.plural, name)
        return obj

    def find(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        return self.objects.get(self.key(res, namespace, name))

    def list(self, res: Resource, namespace: str | None) -> list[Obj]:
        out = [
            obj
            for (g, p, ns, _name), obj in self.objects.items()
            if g == res.group and p == res.plural and (namespace is None or ns == namespace)
        ]
        out.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return out

    def oldest_rv(self) -> int:
        return self.history[0].rv if self.history else self._rv

    # ---------------------------------------------------------------------- writing

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, type_: str, res: Resource, obj: Obj) -> None:
        ns = obj["metadata"].get("namespace")
        snapshot = copy.deepcopy(obj)
        self.history.append(
            Event(int(obj["metadata"]["resourceVersion"]), res, ns, type_, snapshot)
        )
        if len(self.history) > self.HISTORY:
            del self.history[: len(self.history) - self.HISTORY]
        for w in self.watchers:
            if w.resource == res and (w.namespace is None or w.namespace == ns):
                w.queue.put_nowait((type_, snapshot))
        for callback in list(self.on_change):
            callback(type_, res, obj)

    def create(self, res: Resource, namespace: str | None, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + random_suffix()
            else:
                raise ApiError(
                    422,
                    "Invalid",
                    f'{res.kind} "" is invalid: metadata.name: Required value: name or '
                    "generateName is required",
                    {"kind": res.kind, "causes": [{"field": "metadata.name"}]},
                )
        if res.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request",
                )
            meta["namespace"] = namespace
        key = self.key(res, namespace if res.namespaced else None, meta["name"])
        if key in self.objects:
            raise already_exists(res.group, res.plural, meta["name"])
        obj["apiVersion"] = res.api_version
        obj["kind"] = res.kind
        meta["uid"] = meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        meta["resourceVersion"] = self._bump()
        self.objects[key] = obj
        self._emit("ADDED", res, obj)
        return obj

    def replace(self, res: Resource, obj: Obj, *, bump_generation: bool = False) -> Obj:
        meta = obj["metadata"]
        key = self.key(res, meta.get("namespace"), meta["name"])
        if key not in self.objects:
            raise not_found(res.group, res.plural, meta["name"])
        if bump_generation:
            meta["generation"] = int(meta.get("generation", 1)) + 1
        meta["resourceVersion"] = self._bump()
        self.objects[key] = obj
        self._emit("MODIFIED", res, obj)
        return obj

    def delete(self, res: Resource, namespace: str | None, name: str) -> Obj:
        key = self.key(res, namespace, name)
        obj = self.objects.pop(key, None)
        if obj is None:
            raise not_found(res.group, res.plural, name)
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit("DELETED", res, obj)
        return obj
