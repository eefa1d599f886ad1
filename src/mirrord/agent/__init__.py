"""The agent: runs next to the target, in its namespaces, and serves the daemon."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    sys.exit("mirrord-agent: the agent is not built yet (see the agent issue)")
