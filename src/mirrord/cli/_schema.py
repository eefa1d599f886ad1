"""`mirrord schema`: print the JSON schema of the config file (for editor completion).

Owns: printing it. Does not own: the schema (mirrord.config.config_schema).
"""

from __future__ import annotations

import json

import typer

from mirrord.cli._app import app
from mirrord.config import config_schema


@app.command("schema")
def schema() -> None:
    """Print the JSON schema of mirrord.json / .toml / .yaml (docs/mirrord.schema.json)."""
    typer.echo(json.dumps(config_schema(), indent=2))
