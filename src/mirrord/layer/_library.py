"""Locate the compiled layer library and read its build id.

The library is compiled from `native/*.c` by the package build (setup.py), into this
package directory, for both regular and editable installs.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ["LayerNotBuilt", "build_id", "library_path", "supervisor_path"]

_LIBRARY_NAME = "libmirrord_layer.so"
_SUPERVISOR_NAME = "mirrord-supervisor"
_BUILD_ID = re.compile(rb"MIRRORD_BUILD_ID=([0-9a-zA-Z_-]{1,64});")


class LayerNotBuilt(RuntimeError):
    """The layer library is missing from the installed package: reinstall mirrord."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"the layer library {path} is missing: reinstall mirrord "
            "(`pip install .` or `pip install -e .` compiles it; it needs gcc)"
        )


def library_path() -> Path:
    """Absolute path of `libmirrord_layer.so` inside the installed package."""
    path = Path(__file__).resolve().parent / _LIBRARY_NAME
    if not path.is_file():
        raise LayerNotBuilt(path)
    return path


def supervisor_path() -> Path:
    """Absolute path of the system-call supervisor (`mirrord-supervisor`) next to the layer."""
    path = Path(__file__).resolve().parent / _SUPERVISOR_NAME
    if not path.is_file():
        raise LayerNotBuilt(path)
    return path


@functools.cache
def build_id() -> str:
    """The build id compiled into the library; the layer handshake checks both ends share it."""
    match = _BUILD_ID.search(library_path().read_bytes())
    if match is None:
        raise LayerNotBuilt(library_path())
    return match.group(1).decode()
