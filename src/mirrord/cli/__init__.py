"""The `mirrord` command line (typer). Commands live in one module each and are registered here.

Owns: parsing arguments, printing, and turning errors into a message that ends with what to
do. Does not own session state: that is the daemon's.

`app` (the typer application) is imported on first use: `main` runs a plain `mirrord run`
without loading typer at all (see `_main.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mirrord.cli._main import main

if TYPE_CHECKING:
    from mirrord.cli._app import app

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from mirrord.cli._app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
