"""The event loop of mirrord's asyncio processes (the daemon, the Kubernetes helper, the
node agent).

Owns: choosing it. uvloop when it imports (a dependency): asyncio's event loop API on libuv,
with less of the loop's own work per wake-up, which a relayed request pays several times in
the daemon (relayed round trips 9-14 % shorter on the project's machine: docs/performance.md,
"Seventeenth session"); asyncio's own loop otherwise, with the same behaviour. Does not own
what runs on it.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

__all__ = ["asyncio_options", "loop_name"]


def asyncio_options() -> dict[str, Any]:
    """`backend_options` for `anyio.run(..., backend="asyncio")`: uvloop if it imports (a
    wheel that does not load on this system leaves asyncio's own loop, not a daemon that
    cannot start)."""
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return {"use_uvloop": False}
    return {"use_uvloop": True}


def loop_name() -> str:
    """The running loop, for status and logs: "uvloop" or "asyncio"."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )
