"""`mirrord ls [-n NS] [-o json|table] [-t KIND]... [-f CONFIG]`: the targets of a namespace.

Owns: the command's output, in mirrord's IDE shapes: a JSON array of target paths
(`["deployment/web", "pod/web-1/container/app", ...]`), or with `MIRRORD_LS_RICH_OUTPUT=true`
(or `--rich`) mirrord's rich object `{"targets": [{"path", "available"}], "current_namespace",
"namespaces"}`; `-o table` (the default on a terminal) is for people. The kinds listed:
`-t KIND` (repeatable), else `MIRRORD_LS_TARGET_TYPES` (a JSON array of kinds), else all.
Errors in JSON output are one `Error: {...}` line on stderr (what the IDEs parse), in a table
`mirrord ls: ...`.
Does not own listing (mirrord.kube).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mirrord.cli._app import app
from mirrord.cli._progress import ProgressMode, progress_mode, write_error

# mirrord's target types that name Kubernetes kinds we list (`targetless` and the others are
# accepted and list nothing)
_KINDS = ("deployment", "rollout", "statefulset", "cronjob", "job", "pod")
_TYPES = (*_KINDS, "targetless", "service", "replicaset")


class _Fail:
    """Errors in the output's language: JSON for IDEs, a sentence for people."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def __call__(self, message: str, help: str, code: int = 1) -> NoReturn:
        if self.as_json:
            write_error(message, help=help)
        else:
            typer.echo(f"mirrord ls: {message}; {help[0].lower()}{help[1:]}", err=True)
        raise typer.Exit(code)


def _env_flag(name: str) -> bool:
    # mirrord parses these as a Rust bool: `true` (and `false`) only
    return os.environ.get(name, "") == "true"


def _kinds(target_types: list[str] | None, fail: _Fail) -> list[str] | None:
    """The kinds to list, or None for all."""
    source = "-t"
    if target_types:
        types = target_types
    else:
        raw = os.environ.get("MIRRORD_LS_TARGET_TYPES", "")
        if not raw.strip():
            return None
        source = "MIRRORD_LS_TARGET_TYPES"
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(
                f"MIRRORD_LS_TARGET_TYPES={raw!r} is not a JSON array of target types",
                'Set it like ["deployment", "pod"], or unset it to list every kind.',
                2,
            )
        types = value
        if not types:
            return None
    unknown = [t for t in types if t not in _TYPES]
    if unknown:
        fail(
            f"{source}: unknown target type {unknown[0]!r}",
            "Use one of " + ", ".join(_TYPES) + ".",
            2,
        )
    return [t for t in types if t in _KINDS]


NamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        help="Namespace (default: target.namespace / MIRRORD_TARGET_NAMESPACE, else the "
        "context's).",
    ),
]
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        help="json (for IDEs; the default when stdout is not a terminal) or table.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="The same as `-o json`.")]
RichOpt = Annotated[
    bool,
    typer.Option(
        "--rich",
        help="Print {targets, current_namespace, namespaces} as JSON (as "
        "MIRRORD_LS_RICH_OUTPUT=true does).",
    ),
]
TargetTypeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target-type",
        "-t",
        help="Only this kind (repeatable): deployment, rollout, statefulset, cronjob, job, "
        "pod. Default: MIRRORD_LS_TARGET_TYPES, else all.",
        show_default=False,
    ),
]
ConfigFileOpt = Annotated[
    Path | None, typer.Option("--config-file", "-f", help="mirrord config file.")
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", help="Seconds to wait for the API server's answers.", min=0.1),
]


@app.command("ls")
def ls(
    *,
    namespace: NamespaceOpt = None,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
    rich_output: RichOpt = False,
    target_types: TargetTypeOpt = None,
    config_file: ConfigFileOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """List the targets (deployments, rollouts, statefulsets, cronjobs, jobs, pods) of a
    namespace."""
    rich_output = rich_output or _env_flag("MIRRORD_LS_RICH_OUTPUT")
    if output is None:
        output = "json" if as_json or rich_output or not sys.stdout.isatty() else "table"
        if progress_mode() is ProgressMode.JSON:
            output = "json"
    fail = _Fail(output != "table")
    if output not in ("json", "table"):
        fail(f"unknown output format {output!r}", "Use `-o json` or `-o table`.", 2)
    kinds = _kinds(target_types, fail)
    found = _list_targets(config_file, namespace, kinds, timeout, fail)
    if rich_output:
        typer.echo(json.dumps(found))
        return
    paths = [t["path"] for t in found["targets"] if t["available"]]
    if output == "json":
        typer.echo(json.dumps(paths))
        return
    from rich.console import Console

    console = Console()
    if not paths:
        console.print(f"no targets in namespace {found['current_namespace']}")
        return
    for p in paths:
        console.print(p, highlight=False)


def _list_targets(
    config_file: Path | None,
    namespace: str | None,
    kinds: list[str] | None,
    timeout: float,
    fail: _Fail,
) -> dict[str, Any]:
    """mirrord's rich listing of the namespace's targets, read within `timeout` seconds with
    the config's cluster (kubeconfig, context, namespace); `fail` on any error."""
    import asyncio

    from mirrord.config import ConfigError, load_config
    from mirrord.kube import ApiCallError, KubeError, list_targets

    try:
        cfg = load_config(config_file)
    except ConfigError as exc:
        fail(str(exc), "Fix the configuration (`mirrord verify-config PATH` shows it).", 2)
    ns = namespace or cfg.target.namespace
    listing = list_targets(
        namespace=ns, kubeconfig=cfg.kubeconfig, context=cfg.kube_context, kinds=kinds
    )
    try:
        # An API server that accepts connections but never answers would hang an IDE's
        # target picker forever.
        found: dict[str, Any] = asyncio.run(asyncio.wait_for(listing, timeout))
    except TimeoutError:
        fail(
            f"the API server did not answer within {timeout:g} s",
            "Check the kubeconfig's server and your network/VPN (or give more time with "
            "--timeout).",
        )
    except KubeError as exc:
        fail(str(exc), "Check your kubeconfig and its current context (`kubectl get pods`).")
    except ApiCallError as exc:
        fail(
            f"the API server refused to list targets ({exc.status} {exc.reason}: {exc.message})",
            "Check your permissions in that namespace.",
        )
    except OSError as exc:
        fail(f"cannot reach the API server ({exc})", "Check the kubeconfig's server.")
    return found
