"""The layer's Python side: locating libmirrord_layer.so, its build id, its settings and env.

Owns: `library_path`, `supervisor_path` (the system-call supervisor), `build_id`, `LayerSettings` (what the C side needs, encoded for
MIRRORD_LAYER_CONFIG) and `layer_env` (the variables that load the layer into the user
command). Does not own the hooks (native/*.c) or the daemon side of the layer protocol.

Names are imported on first use: `mirrord run` needs only the library's path and build id,
not the settings' dataclass and patterns (2-3 ms of every run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mirrord._lazy import lazy_names

if TYPE_CHECKING:
    from mirrord.layer._library import build_id, library_path, supervisor_path
    from mirrord.layer._settings import (
        LayerSettings,
        LayerSettingsTooLarge,
        layer_env,
        posix_regex,
    )

__all__ = [
    "LayerSettings",
    "LayerSettingsTooLarge",
    "build_id",
    "layer_env",
    "library_path",
    "posix_regex",
    "supervisor_path",
]

_WHERE = {
    "build_id": "_library",
    "library_path": "_library",
    "supervisor_path": "_library",
    "LayerSettings": "_settings",
    "LayerSettingsTooLarge": "_settings",
    "layer_env": "_settings",
    "posix_regex": "_settings",
}


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
