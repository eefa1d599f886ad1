"""mirrordd: the long-lived per-user daemon (control API, sessions, agent pool, multiplexing).

Owns: the daemon process, its control API, sessions, the agent pool and the relaying of
connections between agent channels and user-app sockets; the choice of agent backend and the
local backend; the control API's client and the checks of a session's config before a daemon
starts (used by the CLI, through this module only). Does not own: the wire protocols
(`mirrord.protocol`), the agent backend interface (`mirrord.backend`), the agent, the layer
library, the Kubernetes backend (`mirrord.kube`).

Names are imported on first use: the CLI's client side (`_client`, `_control`, `_runtime`,
`_exceptions`) must not pay for the daemon's event-loop machinery on every `mirrord run`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mirrord._lazy import lazy_names

if TYPE_CHECKING:
    from mirrord.daemon._backend import (
        AgentBackend,
        AgentHandle,
        LocalAgentBackend,
        LocalAgentHandle,
        Progress,
        backends_for_daemon,
        check_session_target,
        select_backend,
    )
    from mirrord.daemon._client import (
        ControlClient,
        check_layer_env,
        daemon_status,
        ensure_daemon,
        live_daemon_pid,
        stop_daemon,
        wait_daemon_gone,
    )
    from mirrord.daemon._control import (
        AgentLostEvent,
        ClosedEvent,
        CloseSession,
        ControlEvent,
        CreateSession,
        DisconnectedEvent,
        ListSessions,
        ProcessEvent,
        ProgressEvent,
        SessionCreated,
        SessionIdle,
        SessionStatus,
        Shutdown,
        Status,
        WaitSession,
        WarningEvent,
    )
    from mirrord.daemon._daemon import resolve_session_config
    from mirrord.daemon._exceptions import (
        AgentLost,
        AgentStartError,
        ConfigRefused,
        ControlError,
        DaemonDisconnected,
        DaemonError,
        DaemonNotRunning,
        DaemonStopping,
        RootRequired,
        SessionNotFound,
        TargetNotSupported,
        UntrustedDaemon,
    )
    from mirrord.daemon._main import main
    from mirrord.daemon._relay import open_relay_pair
    from mirrord.daemon._runtime import RuntimePaths, runtime_dir, runtime_paths

_WHERE = {
    "AgentBackend": "_backend",
    "AgentHandle": "_backend",
    "LocalAgentBackend": "_backend",
    "LocalAgentHandle": "_backend",
    "Progress": "_backend",
    "backends_for_daemon": "_backend",
    "check_session_target": "_backend",
    "select_backend": "_backend",
    "ControlClient": "_client",
    "check_layer_env": "_client",
    "daemon_status": "_client",
    "ensure_daemon": "_client",
    "live_daemon_pid": "_client",
    "stop_daemon": "_client",
    "wait_daemon_gone": "_client",
    "resolve_session_config": "_daemon",
    "AgentLostEvent": "_control",
    "CloseSession": "_control",
    "ClosedEvent": "_control",
    "ControlEvent": "_control",
    "CreateSession": "_control",
    "DisconnectedEvent": "_control",
    "ListSessions": "_control",
    "ProcessEvent": "_control",
    "ProgressEvent": "_control",
    "SessionCreated": "_control",
    "SessionIdle": "_control",
    "SessionStatus": "_control",
    "Shutdown": "_control",
    "Status": "_control",
    "WaitSession": "_control",
    "WarningEvent": "_control",
    "ConfigRefused": "_exceptions",
    "DaemonDisconnected": "_exceptions",
    "DaemonStopping": "_exceptions",
    "UntrustedDaemon": "_exceptions",
    "AgentLost": "_exceptions",
    "AgentStartError": "_exceptions",
    "ControlError": "_exceptions",
    "DaemonError": "_exceptions",
    "DaemonNotRunning": "_exceptions",
    "RootRequired": "_exceptions",
    "SessionNotFound": "_exceptions",
    "TargetNotSupported": "_exceptions",
    "main": "_main",
    "open_relay_pair": "_relay",
    "RuntimePaths": "_runtime",
    "runtime_dir": "_runtime",
    "runtime_paths": "_runtime",
}

__all__ = [
    "AgentBackend",
    "AgentHandle",
    "AgentLost",
    "AgentLostEvent",
    "AgentStartError",
    "CloseSession",
    "ClosedEvent",
    "ConfigRefused",
    "ControlClient",
    "ControlError",
    "ControlEvent",
    "CreateSession",
    "DaemonDisconnected",
    "DaemonError",
    "DaemonNotRunning",
    "DaemonStopping",
    "DisconnectedEvent",
    "ListSessions",
    "LocalAgentBackend",
    "LocalAgentHandle",
    "ProcessEvent",
    "Progress",
    "ProgressEvent",
    "RootRequired",
    "RuntimePaths",
    "SessionCreated",
    "SessionIdle",
    "SessionNotFound",
    "SessionStatus",
    "Shutdown",
    "Status",
    "TargetNotSupported",
    "UntrustedDaemon",
    "WaitSession",
    "WarningEvent",
    "backends_for_daemon",
    "check_layer_env",
    "check_session_target",
    "daemon_status",
    "ensure_daemon",
    "live_daemon_pid",
    "main",
    "open_relay_pair",
    "resolve_session_config",
    "runtime_dir",
    "runtime_paths",
    "select_backend",
    "stop_daemon",
    "wait_daemon_gone",
]


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
