"""The layer's Python side: locating libmirrord_layer.so, its build id, its settings and env.

Owns: `library_path`, `build_id`, `LayerSettings` (what the C side needs, encoded for
MIRRORD_LAYER_CONFIG) and `layer_env` (the variables that load the layer into the user
command). Does not own the hooks (native/*.c) or the daemon side of the layer protocol.
"""

from __future__ import annotations

from mirrord.layer._library import build_id, library_path
from mirrord.layer._settings import LayerSettings, LayerSettingsTooLarge, layer_env, posix_regex

__all__ = [
    "LayerSettings",
    "LayerSettingsTooLarge",
    "build_id",
    "layer_env",
    "library_path",
    "posix_regex",
]
