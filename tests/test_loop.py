"""The event loop of the daemon and the Kubernetes helper (`mirrord._loop`): uvloop, a
dependency, and asyncio's own loop where uvloop does not import. Each case in a fresh
interpreter, as the daemon starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

_RUN = """
import sys
if sys.argv[1] == "blocked":
    sys.modules["uvloop"] = None  # as a wheel that does not load: import raises ImportError
import anyio
from mirrord._loop import asyncio_options, loop_name

async def main() -> str:
    return loop_name()

print(anyio.run(main, backend="asyncio", backend_options=asyncio_options()))
"""


@pytest.mark.parametrize(("uvloop", "expected"), [("present", "uvloop"), ("blocked", "asyncio")])
def test_the_loop_is_uvloop_where_it_imports_and_asyncios_own_otherwise(
    uvloop: str, expected: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RUN, uvloop],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == expected, out.stderr
