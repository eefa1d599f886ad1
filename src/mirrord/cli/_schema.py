"""`mirrord schema`: print the JSON schema of the config file (for editor completion).

Owns: printing it. Does not own: the schema (mirrord.config.config_schema).
"""

from __future__ import annotations

import json

import typer

from mirrord.cli._app import app


@app.command("schema")
def schema() -> None:
    """Print the JSON schema of mirrord.json / .toml / .yaml (docs/mirrord.schema.json)."""
    # Imported here: the config models cost every other command ~100 ms at import.
    from mirrord.config import config_schema

    typer.echo(json.dumps(config_schema(), indent=2))
