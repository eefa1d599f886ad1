"""`mirrord ls [-n NS] [--json] [--rich] [-f CONFIG]`: the targets of a namespace.

Owns: the command's output. `--json` prints mirrord's IDE format, a JSON array of target paths
(`["deployment/web", "pod/web-1/container/app", ...]`); `--rich` (or
`MIRRORD_LS_RICH_OUTPUT=true`) prints mirrord's rich object
`{"targets": [{"path", "available"}], "current_namespace", "namespaces"}`; otherwise a table.
Does not own listing (mirrord.kube).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mirrord.cli._app import app


def _config(config_file: Path | None) -> Any:
    from mirrord.config import ConfigError, load_config

    try:
        return load_config(config_file)
    except ConfigError as exc:
        typer.echo(f"mirrord ls: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("ls")
def ls(
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", "-o", help="Print a JSON array of target paths (for IDEs).")
    ] = False,
    rich_output: Annotated[
        bool,
        typer.Option(
            "--rich",
            help="Print {targets, current_namespace, namespaces} as JSON (mirrord's rich ls).",
        ),
    ] = False,
    config_file: Annotated[
        Path | None, typer.Option("--config-file", "-f", help="mirrord config file.")
    ] = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds to wait for the API server's answers.", min=0.1),
    ] = 30.0,
) -> None:
    """List the targets (deployments, rollouts, statefulsets, cronjobs, jobs, pods) of a
    namespace."""
    import asyncio

    from rich.console import Console

    from mirrord.kube import KubeError, list_targets
    from mirrord.kube._api import ApiCallError

    cfg = _config(config_file)
    ns = namespace or getattr(cfg.target, "namespace", None)
    rich_output = rich_output or os.environ.get("MIRRORD_LS_RICH_OUTPUT", "").lower() == "true"
    listing = list_targets(namespace=ns, kubeconfig=cfg.kubeconfig, context=cfg.kube_context)
    try:
        # An API server that accepts connections but never answers would hang an IDE's
        # target picker forever.
        found = asyncio.run(asyncio.wait_for(listing, timeout))
    except TimeoutError:
        typer.echo(
            f"mirrord ls: the API server did not answer within {timeout:g} s; check the "
            "kubeconfig's server and your network/VPN (or give more time with --timeout)",
            err=True,
        )
        raise typer.Exit(1) from None
    except KubeError as exc:
        typer.echo(f"mirrord ls: {exc}", err=True)
        raise typer.Exit(1) from None
    except ApiCallError as exc:
        typer.echo(
            f"mirrord ls: the API server refused to list targets ({exc.status} {exc.reason}: "
            f"{exc.message}); check your permissions in that namespace",
            err=True,
        )
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(
            f"mirrord ls: cannot reach the API server ({exc}); check the kubeconfig's server",
            err=True,
        )
        raise typer.Exit(1) from None
    if rich_output:
        typer.echo(json.dumps(found))
        return
    paths = [t["path"] for t in found["targets"] if t["available"]]
    if as_json:
        typer.echo(json.dumps(paths))
        return
    console = Console()
    if not paths:
        console.print(f"no targets in namespace {found['current_namespace']}")
        return
    for p in paths:
        console.print(p, highlight=False)
