"""Imports every command module so that each registers itself on the typer app."""

from __future__ import annotations

from mirrord.cli import (  # noqa: F401  # noqa: F401
    _daemon,
    _demo,
    _ext,
    _ls,
    _run,
    _schema,
    _verify,
)
