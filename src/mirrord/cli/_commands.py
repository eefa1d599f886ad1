"""Imports every command module so that each registers itself on the typer app."""

from __future__ import annotations

from mirrord.cli import _schema, _verify  # noqa: F401
