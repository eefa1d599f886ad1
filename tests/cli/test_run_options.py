"""`mirrord run` / `mirrord exec` take mirrord 3.250's `exec` options, with their meanings: each
one parsed by the real typer command, sent as the CLI sends it, and resolved as the daemon
resolves it; `-h`, shell completion and `--quiet` through the real `mirrord` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.main

from mirrord.cli import app
from mirrord.cli._app import _register_commands
from mirrord.cli._main import normalize_run_args, parse_run_args
from mirrord.cli._sessions import layer_debug_requested, session_request
from mirrord.daemon._daemon import resolve_session_config
from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import MIRRORD, Mirrord


def _resolved(args: list[str], cwd: Path) -> Any:
    """The session config `mirrord exec ARGS -- true` would get (nothing runs)."""
    _register_commands()
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    argv = [*normalize_run_args(args), "--", "true"]
    ctx = group.make_context("mirrord", ["exec", *argv])
    command = group.get_command(ctx, "exec")
    assert command is not None
    params = dict(command.make_context("exec", argv, parent=ctx).params)
    for key in ("command", "quiet", "no_telemetry", "disable_version_check"):
        params.pop(key)
    certs = params.pop("accept_invalid_certificates")
    if certs is not None:
        params["accept_invalid_certificates"] = certs == "true"
    old = os.getcwd()
    os.chdir(cwd)
    try:
        request = session_request(**params)
    finally:
        os.chdir(old)
    config, _, _ = resolve_session_config(request)
    return config


def test_every_option_of_mirrords_exec_sets_its_setting(tmp_path: Path) -> None:
    config = _resolved(
        [
            "-t", "deployment/web", "-n", "prod", "-a", "agents", "-l", "debug",
            "-i", "registry.test/agent:1", "--agent-ttl", "30", "--agent-startup-timeout", "90",
            "-e", "--rw", "-s", "DB_*", "--no-remote-dns", "--skip-processes", "bash;sh",
            "-c", "--steal", "--no-tcp-outgoing", "--context", "staging",
            "--env-file", "dev.env", "--no-telemetry", "--disable-version-check", "-q",
        ],
        tmp_path,
    )  # fmt: skip
    assert config.target.path == "deployment/web" and config.target.namespace == "prod"
    agent = config.agent
    assert (agent.namespace, agent.log_level, agent.image) == (
        "agents",
        "debug",
        "registry.test/agent:1",
    )
    assert (agent.ttl, agent.startup_timeout, agent.ephemeral) == (30, 90, True)
    feature = config.feature
    assert feature.fs.mode == "write"
    assert feature.env.include == ["DB_*"] and feature.env.env_file == "dev.env"
    assert feature.network.dns.enabled is False
    assert feature.network.incoming.mode == "steal"
    assert (feature.network.outgoing.tcp, feature.network.outgoing.udp) == (False, True)
    assert config.skip_processes == ["bash", "sh"]
    assert config.accept_invalid_certificates is True
    assert config.kube_context == "staging"
    other = _resolved(
        ["-x", "SECRET", "--no-udp-outgoing", "--fs-mode", "local", "--rw", "-c=false"],
        tmp_path,
    )
    assert other.feature.env.exclude == ["SECRET"]
    assert (other.feature.network.outgoing.tcp, other.feature.network.outgoing.udp) == (True, False)
    assert other.feature.fs.mode == "local"  # an explicit --fs-mode wins over --rw
    assert other.accept_invalid_certificates is False
    both = _resolved(["--no-outgoing"], tmp_path)
    assert (both.feature.network.outgoing.tcp, both.feature.network.outgoing.udp) == (False, False)
    assert _resolved([], tmp_path).accept_invalid_certificates is None  # the kubeconfig's say


def test_help_completion_and_bad_option_values(mirrord: Mirrord) -> None:
    for command in ("run", "exec"):
        result = mirrord.run(command, "-h", timeout=30)
        assert result.returncode == 0, result.stderr
        for option in ("--agent-startup-timeout", "--ephemeral-container", "--env-file"):
            assert option in result.stdout
    completion = subprocess.run(
        [MIRRORD],
        env=dict(
            mirrord.env,
            _MIRRORD_COMPLETE="complete_bash",
            COMP_WORDS="mirrord exec --no-",
            COMP_CWORD="2",
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completion.returncode == 0
    assert {"--no-tcp-outgoing", "--no-udp-outgoing", "--no-telemetry"} <= set(
        completion.stdout.split()
    )
    # the script `mirrord --install-completion` installs (`--show-completion` prints it for
    # the shell it detects; here it is asked for bash by name, as the script itself does)
    script = subprocess.run(
        [MIRRORD],
        env=dict(mirrord.env, _MIRRORD_COMPLETE="source_bash"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert script.returncode == 0 and "_MIRRORD_COMPLETE=complete_bash" in script.stdout
    bad = mirrord.run("exec", "-c=maybe", "-t", "pid/1", "--", "true", timeout=30)
    assert bad.returncode == 2
    assert "--accept-invalid-certificates=maybe" in bad.stderr and "true or false" in bad.stderr
    local_ephemeral = mirrord.run("exec", "-e", "-t", "pid/1", "--", "true", timeout=30)
    assert local_ephemeral.returncode == 2
    assert "agent.ephemeral does not apply to a local target" in local_ephemeral.stderr
    assert not (mirrord.runtime / "mirrordd.sock").exists()


@pytest.mark.netns
def test_exec_with_mirrords_options_runs_quietly(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(PodSpec(env={"POD_VAR": "from-the-pod", "OTHER": "x"}))
    env_file = tmp_path / "dev.env"
    env_file.write_text("FROM_FILE=yes\n")
    show = "import json, os; print(json.dumps({k: os.environ.get(k) for k in ('POD_VAR', 'OTHER', 'FROM_FILE')}))"
    result = mirrord.run(
        "exec", "-q", "--no-telemetry", "--disable-version-check", "-c", "-s", "POD_VAR",
        "--env-file", str(env_file), "--agent-startup-timeout", "60", "-t", f"pid/{pod.pid}",
        "--", sys.executable, "-c", show,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "POD_VAR": "from-the-pod",
        "OTHER": None,
        "FROM_FILE": "yes",
    }
    assert result.stderr == ""  # --quiet: no progress lines


def test_config_file_option_alone_means_dot_mirrord_json(tmp_path: Path) -> None:
    """mirrord's `-f` with no value is `./.mirrord/mirrord.json`, through typer and the
    fast path alike."""
    (tmp_path / ".mirrord").mkdir()
    (tmp_path / ".mirrord" / "mirrord.json").write_text(
        '{"feature": {"env": {"include": "FROM_DOT_MIRRORD"}}}'
    )
    for args in (["-f", "-t", "pid/1"], ["-t", "pid/1", "--config-file"]):
        config = _resolved(args, tmp_path)
        assert config.feature.env.include == ["FROM_DOT_MIRRORD"], args
        assert config.target.path == "pid/1"
    fast = parse_run_args(normalize_run_args(["-t", "pid/1", "-f", "--", "true"]))
    assert fast is not None and fast["config_file"] == Path("./.mirrord/mirrord.json")
    assert fast["command"] == ["true"]
    given = parse_run_args(normalize_run_args(["-f", "other.json", "--", "true"]))
    assert given is not None and given["config_file"] == Path("other.json")  # a value is kept


@pytest.mark.parametrize(
    ("environ", "debug"),
    [
        ({}, False),
        ({"MIRRORD_LAYER_DEBUG": "1"}, True),
        ({"MIRRORD_LOG": "warn,mirrord=debug"}, True),  # mirrord's own end-to-end tests
        ({"MIRRORD_LOG": "debug"}, True),
        ({"MIRRORD_LOG": "mirrord_layer=TRACE"}, True),
        ({"MIRRORD_LOG": "mirrord"}, True),  # a bare target: all it logs
        ({"MIRRORD_LOG": "warn,mirrord[listen]=debug"}, True),
        ({"MIRRORD_LOG": "info"}, False),
        ({"MIRRORD_LOG": "warn,mirrord=info"}, False),
        ({"MIRRORD_LOG": "hyper=debug,mirrord=warn"}, False),
        ({"MIRRORD_LOG": " , "}, False),
    ],
)
def test_mirrord_log_turns_the_layers_debug_lines_on_as_mirrord_reads_it(
    environ: dict[str, str], debug: bool
) -> None:
    assert layer_debug_requested(environ) is debug
