"""Local pods: network + mount + UTS namespaces with a real process, standing in for pods.

Owns: creating, using and removing local pods (see `_pod.py` for the layout). Used by the test
suite, `mirrord demo` and the benchmarks. Does not own agents or anything Kubernetes. Needs root.
"""

from __future__ import annotations

from mirrord.localpod._pod import (
    DEFAULT_PATH,
    DEFAULT_RESOLV_CONF,
    LocalPod,
    PodError,
    PodSpec,
    cleanup_leftovers,
    create_pod,
)

__all__ = [
    "DEFAULT_PATH",
    "DEFAULT_RESOLV_CONF",
    "LocalPod",
    "PodError",
    "PodSpec",
    "cleanup_leftovers",
    "create_pod",
]
