"""What every part of the agent shares about its target, built once at startup.

Owns: the `AgentContext` value (target, its root, its namespace runner, its resolver, limits).
The incoming code (`IncomingService`) is constructed with it: `ctx.pid`, `ctx.netns`
(`NetnsRunner`: `await ctx.netns.run(fn)`, `ctx.netns.run_sync(fn)`, `ctx.netns.socket(...)`),
`ctx.root` (`TargetRoot`). Does not own any I/O itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirrord.agent._dns import TargetResolver
from mirrord.agent._files import TargetRoot
from mirrord.agent._netns import NetnsRunner
from mirrord.agent._target import Target

__all__ = ["AgentContext"]


@dataclass
class AgentContext:
    target: Target
    root: TargetRoot
    netns: NetnsRunner
    resolver: TargetResolver
    connect_timeout: float = 15.0
    max_requests_per_connection: int = 256

    @property
    def pid(self) -> int:
        return self.target.pid

    def close(self) -> None:
        self.netns.close()
        self.root.close()
