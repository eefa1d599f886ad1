"""The event loop of mirrord's asyncio processes (the daemon, the Kubernetes helper).

Owns: choosing it. uvloop when it is installed (a dependency where it has wheels): it is
asyncio's event loop API, implemented on libuv, and it halves the loop's own cost per wake-up,
which a relayed request pays several times in the daemon (docs/performance.md, "Seventeenth
session"); asyncio's own loop otherwise, with the same behaviour. Does not own what runs on it.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

__all__ = ["asyncio_options", "loop_name"]


def asyncio_options() -> dict[str, Any]:
    """`backend_options` for `anyio.run(..., backend="asyncio")`."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def loop_name() -> str:
    """The running loop, for status and logs: "uvloop" or "asyncio"."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )
