"""The agent backend interface: what the daemon asks of a way to run agents, and what every
backend (the daemon's local one, `mirrord.kube`'s) implements.

Owns: the `AgentBackend` / `AgentHandle` protocols, the `Progress` callback type, and where the
kubeconfig is (`kubeconfig_path`: the daemon checks it before any backend is loaded, the
Kubernetes backend reads it). Does not own any backend (`mirrord.daemon` has the local one and
chooses between them, `mirrord.kube` the Kubernetes one), the agent protocol spoken on the
stream (the daemon's agent pool), nor the error backends raise
(`mirrord.daemon.AgentStartError`). Imports nothing of either side, so both can import it.

Contract for every backend
--------------------------
- `handles(target)` is cheap and synchronous: it only looks at the target string.
- `start_agent(target, config, progress)` makes an agent exist and be reachable; it may take
  seconds. It reports steps through `progress("...")` (short phrases a user reads, no secrets)
  and raises `AgentStartError` (or a subclass) with a message that says what to check.
  `config` is the session's resolved `mirrord.config.MirrordConfig`; a backend reads only the
  sections it owns (`agent`, `kubeconfig`, `kube_context`, `target`, ...).
- The returned handle's `key` decides sharing: sessions whose handle keys are equal share one
  agent and one stream (the daemon stops the handle it did not need). Keys name the backend
  and the resolved target, e.g. `local:pid/123` (`local:pid/123@settings` for an agent started
  with other than the default agent settings), `kube:ctx/ns/pod/container@settings`.
- Optional `agent_fingerprint(config) -> str`: the settings an agent was started with that a
  session must share to reuse it; the pool reuses a running agent for a target only when the
  fingerprints are equal (without the method: by target alone).
- `connect()` returns the ONE stream the daemon speaks the agent protocol on; the daemon calls
  it again to re-establish after a break. `secret` is the agent's per-agent secret (sent in
  `Hello`). `alive()` is cheap and synchronous. `stop()` releases the agent and everything the
  backend created for it; it is idempotent and never raises for an agent already gone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import anyio.abc

    from mirrord.config import MirrordConfig

__all__ = ["AgentBackend", "AgentHandle", "Progress", "kubeconfig_path"]

Progress = Callable[[str], None]


@runtime_checkable
class AgentHandle(Protocol):
    """One started agent: how to reach it and how to release it."""

    key: str
    description: str
    secret: str

    async def connect(self) -> anyio.abc.ByteStream:
        """A new byte stream to the agent (raises `AgentStartError` if it cannot be reached)."""
        ...

    async def stop(self) -> None:
        """Release the agent; idempotent; never raises for an agent that is already gone."""
        ...

    def alive(self) -> bool:
        """Cheap check: False once the agent is known to be gone."""
        ...


@runtime_checkable
class AgentBackend(Protocol):
    """A way to run agents: local subprocesses, Kubernetes jobs, ..."""

    name: str

    def handles(self, target: str) -> bool:
        """Whether this backend runs agents for `target` (looks at the string only)."""
        ...

    async def start_agent(
        self, target: str, config: MirrordConfig, progress: Progress
    ) -> AgentHandle:
        """Start (or find) an agent for `target`; raises `AgentStartError` with what to check."""
        ...


def kubeconfig_path(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    """The kubeconfig file(s) to read: `explicit`, else `$KUBECONFIG`, else ~/.kube/config."""
    env = os.environ if env is None else env
    if explicit:
        return os.path.expanduser(explicit)
    if env.get("KUBECONFIG"):
        return env["KUBECONFIG"]
    return str(Path(env.get("HOME", "~")).expanduser() / ".kube" / "config")
