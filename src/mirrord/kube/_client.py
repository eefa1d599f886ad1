"""Kubeconfig and context selection for kubernetes_asyncio.

Owns: which kubeconfig file (config `kubeconfig`, else `$KUBECONFIG`, else ~/.kube/config),
which context (config `kube_context`, else the file's current context) and the default
namespace (the target's `namespace`, else the context's, else "default"). The file is always
passed explicitly: kubernetes_asyncio reads `$KUBECONFIG` at import time, which would ignore a
later change of the environment (for example in a long-lived daemon).
Does not own any API call beyond loading the configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from mirrord.backend import kubeconfig_path
from mirrord.kube._exceptions import KubeConfigError

__all__ = ["KubeContext", "kubeconfig_path", "load_context"]


@dataclass(frozen=True)
class KubeContext:
    """A loaded kubeconfig context: the client configuration and where it came from."""

    configuration: Any  # kubernetes_asyncio.client.Configuration
    context: str
    namespace: str
    kubeconfig: str

    def __repr__(self) -> str:  # the configuration holds tokens: never show it
        return f"<KubeContext {self.context} ns={self.namespace} file={self.kubeconfig}>"


async def load_context(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
    env: Mapping[str, str] | None = None,
    accept_invalid_certificates: bool | None = None,
) -> KubeContext:
    """Load the client configuration; raises `KubeConfigError` saying what to fix."""
    path = kubeconfig_path(kubeconfig, env)
    first = path.split(os.pathsep)[0]
    if not any(Path(p).is_file() for p in path.split(os.pathsep) if p):
        raise KubeConfigError(
            f"kubeconfig {first} does not exist: set `kubeconfig` in the mirrord config, or "
            "$KUBECONFIG, to your cluster's kubeconfig file"
        )
    try:
        contexts, current = k8s_config.list_kube_config_contexts(config_file=path)
    except Exception as exc:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    names = [c["name"] for c in contexts or []]
    chosen = context or (current or {}).get("name")
    if not chosen:
        raise KubeConfigError(
            f"kubeconfig {path} has no current context: set `kube_context` in the mirrord "
            f"config (contexts: {', '.join(names) or 'none'})"
        )
    if chosen not in names:
        raise KubeConfigError(
            f"context {chosen!r} is not in kubeconfig {path} (contexts: "
            f"{', '.join(names) or 'none'}): fix `kube_context` in the mirrord config"
        )
    ctx_ns = next(
        ((c.get("context") or {}).get("namespace") for c in contexts if c["name"] == chosen),
        None,
    )
    cfg = k8s.Configuration()
    try:
        await k8s_config.load_kube_config(
            config_file=path, context=chosen, client_configuration=cfg, persist_config=False
        )
    except Exception as exc:
        raise KubeConfigError(f"cannot load context {chosen!r} from {path}: {exc}") from exc
    if accept_invalid_certificates is not None:  # `-c`, over the kubeconfig's own setting
        cfg.verify_ssl = not accept_invalid_certificates
    return KubeContext(
        configuration=cfg,
        context=chosen,
        namespace=namespace or ctx_ns or "default",
        kubeconfig=path,
    )
