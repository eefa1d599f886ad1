"""`mirrord run`'s fast path (`mirrord.cli._main`) parses exactly as typer does, or not at all."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import typer.core
import typer.main

from mirrord.cli import app
from mirrord.cli._app import _register_commands
from mirrord.cli._main import FLAG_OPTIONS, VALUE_OPTIONS, parse_run_args


def _typer_parse(args: list[str]) -> dict[str, Any]:
    """The keywords typer's `run` command would pass on (parsing only, nothing runs)."""
    _register_commands()
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    ctx = group.make_context("mirrord", ["run", *args])
    command = group.get_command(ctx, "run")
    assert command is not None
    params = dict(command.make_context("run", list(args), parent=ctx).params)
    params["command"] = list(params["command"] or [])
    return params


ACCEPTED = [
    ["-t", "pid/1", "--", "true"],
    ["--", "python3", "-c", "print(1)"],
    ["--target", "deployment/api", "--steal", "--", "app", "--port", "80"],
    ["--target=pod/x/container/c", "--", "a", "--", "b"],
    ["-f", "mirrord.json", "-t", "pid/2", "--", "x"],
    ["--config-file=conf/m.yaml", "--fs-mode", "write", "--", "x"],
    ["--fs-mode=local", "--no-outgoing", "--no-remote-dns", "--", "x", "-t", "y"],
    ["-t", "pid/3", "--syscalls", "--", "./static-app"],
    ["-s", "A;B*", "--", "env"],
    ["--override-env-vars-include=A", "--", "env"],
    ["-x", "SECRET*", "--override-env-vars-include", "A", "--", "env"],
    ["--override-env-vars-exclude", "B", "--", "env"],
    ["-t", "pid/1", "--", "--"],
    ["-n", "prod", "-a", "agents", "-l", "debug", "-i", "img:1", "--", "x"],
    ["--agent-ttl", "0", "--agent-startup-timeout=30", "-e", "--rw", "--", "x"],
    ["--skip-processes", "a;b", "--context", "kind", "--env-file", ".env", "--", "x"],
    ["--accept-invalid-certificates=false", "--steal", "--no-tcp-outgoing", "--", "x"],
    ["--no-udp-outgoing", "--no-telemetry", "--disable-version-check", "-q", "--", "x"],
]


@pytest.mark.parametrize("args", ACCEPTED, ids=" ".join)
def test_fast_path_parses_like_typer(args: list[str]) -> None:
    assert parse_run_args(args) == _typer_parse(args)


@pytest.mark.parametrize(
    "args",
    [
        ["-t", "pid/1"],  # no command: typer's error
        ["-t", "pid/1", "--"],
        ["-t", "pid/1", "true"],  # no `--`
        ["--help"],
        ["-t", "pid/1", "--help", "--", "x"],
        ["--version", "--", "x"],
        ["-tpid/1", "--", "x"],  # attached short value
        ["-t", "pid/1", "-t", "pid/2", "--", "x"],  # repeated
        ["--steal", "--steal", "--", "x"],
        ["-t", "--steal", "--", "x"],  # a value that looks like an option
        ["--target=", "--", "x"],
        ["-t"],
        ["--steal=yes", "--", "x"],
        ["--bogus", "--", "x"],
        ["--targ", "pid/1", "--", "x"],  # click would expand a prefix; typer decides
        ["--agent-ttl", "soon", "--", "x"],  # typer's int error
        ["--agent-startup-timeout", "0", "--", "x"],  # below its minimum
    ],
    ids=lambda a: " ".join(a) or "empty",
)
def test_fast_path_leaves_everything_else_to_typer(args: list[str]) -> None:
    assert parse_run_args(args) is None


def test_fast_path_knows_every_option_of_run() -> None:
    _register_commands()
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    ctx = group.make_context("mirrord", ["run", "--", "x"])
    command = group.get_command(ctx, "run")
    assert command is not None
    flags: set[str] = set()
    values: set[str] = set()
    for param in command.params:
        if param.param_type_name != "option":
            continue
        opts = {*param.opts, *param.secondary_opts}
        (flags if getattr(param, "is_flag", False) else values).update(opts)
    assert flags == set(FLAG_OPTIONS)
    assert values == set(VALUE_OPTIONS)


def test_plain_run_loads_neither_typer_nor_rich_nor_pydantic() -> None:
    # what `mirrord run` asks of the layer package (ensure_daemon, check_layer_env) either
    code = (
        "import sys, mirrord.cli, mirrord.cli._runner, mirrord.layer;"
        "mirrord.layer.build_id(); mirrord.layer.library_path();"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} &"
        " {'typer', 'click', 'rich', 'pydantic', 'yaml', 'asyncio', 'anyio'}"
        " | {m for m in sys.modules if m == 'mirrord.layer._settings'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["-c", "-t", "pid/1", "--", "x"],
            ["--accept-invalid-certificates=true", "-t", "pid/1", "--", "x"],
        ),
        (["-c=false", "--", "x", "-c"], ["--accept-invalid-certificates=false", "--", "x", "-c"]),
        (
            ["--accept-invalid-certificates", "--", "x"],
            ["--accept-invalid-certificates=true", "--", "x"],
        ),
        (["-t", "-c", "x", "-c"], ["-t", "-c", "x", "-c"]),  # a value, then the command
    ],
)
def test_a_bare_accept_invalid_certificates_means_true(
    args: list[str], expected: list[str]
) -> None:
    from mirrord.cli._main import normalize_run_args

    assert normalize_run_args(args) == expected
    if "--" in expected:
        assert parse_run_args(expected) == _typer_parse(expected)
