"""The agent: runs next to the target, in its namespaces, and serves the daemon.

Owns: target resolution, entering the target's network/UTS namespaces, files confined to the
target's root, env, DNS, outgoing connections, and (with the incoming modules) mirror/steal.
See docs/agent.md. Public surface: the CLI entry point, and the pieces other parts reuse
(the node agent's container lookup, the namespace runner).
"""

from __future__ import annotations

from mirrord.agent._cli import main
from mirrord.agent._netns import NetnsRunner, enter_namespaces
from mirrord.agent._target import Target, find_container_pid, resolve_target

__all__ = [
    "NetnsRunner",
    "Target",
    "enter_namespaces",
    "find_container_pid",
    "main",
    "resolve_target",
]
