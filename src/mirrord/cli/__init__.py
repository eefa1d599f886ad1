"""The `mirrord` command line (typer). Commands live in one module each and are registered here.

Owns: parsing arguments, printing, and turning errors into a message that ends with what to
do. Does not own session state: that is the daemon's.
"""

from __future__ import annotations

from mirrord.cli._app import app, main

__all__ = ["app", "main"]
