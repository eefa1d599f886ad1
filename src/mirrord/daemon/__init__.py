"""mirrordd: the long-lived per-user daemon (control API, sessions, agent pool, multiplexing)."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    sys.exit("mirrordd: the daemon is not built yet (see the daemon issue)")
