"""mirrordd: the long-lived per-user daemon (control API, sessions, agent pool, multiplexing).

Owns: the daemon process, its control API, sessions, the agent pool and the relaying of
connections between agent channels and user-app sockets; the agent backend protocol (I4) and
the local backend. Does not own: the wire protocols (`mirrord.protocol`), the agent, the layer
library, the Kubernetes backend (`mirrord.kube`).
"""

from __future__ import annotations

from mirrord.daemon._backend import (
    AgentBackend,
    AgentConfig,
    AgentHandle,
    LocalAgentBackend,
    LocalAgentHandle,
    Progress,
    backends_for_daemon,
    config_value,
    select_backend,
)
from mirrord.daemon._exceptions import (
    AgentLost,
    AgentStartError,
    ControlError,
    DaemonError,
    DaemonNotRunning,
    RootRequired,
    SessionNotFound,
    TargetNotSupported,
)
from mirrord.daemon._main import main
from mirrord.daemon._runtime import RuntimePaths, runtime_dir, runtime_paths

__all__ = [
    "AgentBackend",
    "AgentConfig",
    "AgentHandle",
    "AgentLost",
    "AgentStartError",
    "ControlError",
    "DaemonError",
    "DaemonNotRunning",
    "LocalAgentBackend",
    "LocalAgentHandle",
    "Progress",
    "RootRequired",
    "RuntimePaths",
    "SessionNotFound",
    "TargetNotSupported",
    "backends_for_daemon",
    "config_value",
    "main",
    "runtime_dir",
    "runtime_paths",
    "select_backend",
]
