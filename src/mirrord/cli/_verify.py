"""`mirrord verify-config [--ide] PATH`: check a config file and show what it resolves to.

Owns: the command's output: human (rich) or mirrord's IDE JSON (`{"type": "Success", "config":
{"path": ..., "namespace": ...}, "warnings": [...], "compatible_target_types": [...]}` where
`path` is the target string as configured (`"pod/x/container/c"`, `"pid/1234"`), the string
`"targetless"`, or null when the IDE should offer a target picker; plus our `"resolved"`: the
whole resolved config; or `{"type": "Fail", "errors": [...]}`), and its exit code: with `--ide`
0 for both (the IDEs read the verdict from the JSON and take a non-zero exit for a crash, as
mirrord's own exit code is), without it 0 valid, 1 invalid.
Does not own: loading or validation (mirrord.config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mirrord.cli._app import app

__all__ = ["summary"]

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig


def summary(cfg: MirrordConfig) -> list[tuple[str, str]]:
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


def _ide_target(cfg: MirrordConfig) -> dict[str, Any]:
    """The target in the IDE shape: `path` is null (not set: the IDE offers a target picker),
    or the target string ("targetless", "deployment/api/container/main", "pid/1234")."""
    target = cfg.target
    return {"path": target.path or None, "namespace": target.namespace}


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
    # Imported here: the config models and rich cost every other command ~100 ms at import.
    from rich.console import Console
    from rich.markup import escape

    from mirrord.config import TARGET_KINDS, ConfigError, resolve_config

    try:
        resolved = resolve_config(path)
    except ConfigError as exc:
        if ide:
            typer.echo(json.dumps({"type": "Fail", "errors": exc.errors}, indent=2))
            return
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"[bold red]✗[/] {escape(str(path))} is not a valid mirrord config:")
        for line in exc.errors:
            err.print(f"  • {escape(line)}")
        err.print("Fix the values above and run `mirrord verify-config` again.")
        raise typer.Exit(1) from None
    if ide:
        success = {
            "type": "Success",
            "config": _ide_target(resolved.config),
            "warnings": resolved.warnings,
            # the kinds an IDE may offer for this config (mirrord's `compatible_target_types`):
            # mirrord narrows the list only for `copy_target`, which we lack
            "compatible_target_types": ["targetless", *TARGET_KINDS],
            "resolved": resolved.config.model_dump(mode="json"),
        }
        typer.echo(json.dumps(success, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold green]✓[/] {escape(str(path))} is a valid mirrord config.")
    for key, value in summary(resolved.config):
        out.print(f"  {key:<10} {escape(value)}")
    for warning in resolved.warnings:
        out.print(f"[yellow]warning:[/] {escape(warning)}")
