"""`mirrord verify-config [--ide] PATH`: check a config file and show what it resolves to.

Owns: the command's output: human (rich) or mirrord's IDE JSON
(`{"type": "Success", "config": ..., "warnings": [...]}` / `{"type": "Fail", "errors": [...]}`),
and its exit code (0 valid, 1 invalid).
Does not own: loading or validation (mirrord.config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from mirrord.cli._app import app
from mirrord.config import ConfigError, MirrordConfig, resolve_config


def _summary(cfg: MirrordConfig) -> list[tuple[str, str]]:
    feature = cfg.feature
    net = feature.network
    env = feature.env
    if not env.enabled:
        env_text = "off"
    elif env.include is not None:
        env_text = "only " + ";".join(env.include)
    elif env.exclude:
        env_text = "all but " + ";".join(env.exclude)
    else:
        env_text = "all"
    incoming: str = net.incoming.mode
    if net.incoming.http_filter.is_set:
        incoming += (
            " (HTTP filter on ports "
            + ", ".join(str(p) for p in net.incoming.http_filter.ports)
            + ")"
        )
    outgoing = (
        "+".join(p for p, on in (("tcp", net.outgoing.tcp), ("udp", net.outgoing.udp)) if on)
        or "off"
    )
    if net.outgoing.filter is not None:
        side = "remote" if net.outgoing.filter.remote is not None else "local"
        outgoing += f" (filter: {side})"
    return [
        ("target", cfg.target.path or "targetless"),
        ("namespace", cfg.target.namespace or "(kube context default)"),
        ("env", env_text),
        ("fs", feature.fs.mode),
        ("incoming", incoming),
        ("outgoing", outgoing),
        ("dns", "remote" if net.dns.enabled else "local"),
    ]


@app.command("verify-config")
def verify_config(
    path: Annotated[
        Path,
        typer.Argument(help="The config file to check (.json, .toml, .yaml).", show_default=False),
    ],
    ide: Annotated[
        bool, typer.Option("--ide", help="Print mirrord's IDE JSON instead of text.")
    ] = False,
) -> None:
    """Check a config file: every problem with its key path, or what it resolves to.

    MIRRORD_* environment variables apply, as they would for `mirrord run`.
    """
    try:
        resolved = resolve_config(path)
    except ConfigError as exc:
        if ide:
            typer.echo(json.dumps({"type": "Fail", "errors": exc.errors}))
        else:
            err = Console(stderr=True, highlight=False, soft_wrap=True)
            err.print(f"[bold red]✗[/] {escape(str(path))} is not a valid mirrord config:")
            for line in exc.errors:
                err.print(f"  • {escape(line)}")
            err.print("Fix the values above and run `mirrord verify-config` again.")
        raise typer.Exit(1) from None
    if ide:
        typer.echo(
            json.dumps(
                {
                    "type": "Success",
                    "config": resolved.config.model_dump(mode="json"),
                    "warnings": resolved.warnings,
                }
            )
        )
        return
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold green]✓[/] {escape(str(path))} is a valid mirrord config.")
    for key, value in _summary(resolved.config):
        out.print(f"  {key:<10} {escape(value)}")
    for warning in resolved.warnings:
        out.print(f"[yellow]warning:[/] {escape(warning)}")
