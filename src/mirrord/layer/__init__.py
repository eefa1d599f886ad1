"""The layer's Python side: locating libmirrord_layer.so and its build id."""

from __future__ import annotations

from mirrord.layer._library import build_id, library_path

__all__ = ["build_id", "library_path"]
