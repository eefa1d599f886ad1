"""File discovery, formats, templating and the precedence defaults < file < env < CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mirrord.config import (
    ConfigError,
    cli_overrides,
    find_config_file,
    load_config,
    resolve_config,
)

CASES = Path(__file__).parent / "cases"


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_no_file_anywhere_gives_defaults(tmp_path: Path) -> None:
    resolved = resolve_config(env={}, cwd=tmp_path)
    assert resolved.source is None
    assert resolved.config.feature.fs.mode == "read"
    assert resolved.warnings == []


@pytest.mark.parametrize("name", ["mirrord.json", "mirrord.toml", "mirrord.yaml", "mirrord.yml"])
def test_dot_mirrord_file_found_upward_from_cwd(tmp_path: Path, name: str) -> None:
    text = {
        "mirrord.json": '{"target": "pod/up"}',
        "mirrord.toml": 'target = "pod/up"',
        "mirrord.yaml": "target: pod/up",
        "mirrord.yml": "target: pod/up",
    }[name]
    _write(tmp_path / ".mirrord" / name, text)
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    resolved = resolve_config(env={}, cwd=deep)
    assert resolved.source == tmp_path / ".mirrord" / name
    assert resolved.config.target.path == "pod/up"


def test_nearest_dot_mirrord_wins(tmp_path: Path) -> None:
    _write(tmp_path / ".mirrord" / "mirrord.json", {"target": "pod/outer"})
    _write(tmp_path / "inner" / ".mirrord" / "mirrord.json", {"target": "pod/inner"})
    assert load_config(env={}, cwd=tmp_path / "inner").target.path == "pod/inner"


def test_env_config_file_beats_discovery_and_flag_beats_env(tmp_path: Path) -> None:
    _write(tmp_path / ".mirrord" / "mirrord.json", {"target": "pod/discovered"})
    _write(tmp_path / "env.json", {"target": "pod/from-env"})
    _write(tmp_path / "flag.json", {"target": "pod/from-flag"})
    env = {"MIRRORD_CONFIG_FILE": "env.json"}
    assert load_config(env=env, cwd=tmp_path).target.path == "pod/from-env"
    assert load_config("flag.json", env=env, cwd=tmp_path).target.path == "pod/from-flag"


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.json", env={})
    assert "nope.json" in str(info.value) and "not found" in str(info.value)


def test_find_config_file_relative_to_cwd(tmp_path: Path) -> None:
    assert find_config_file("x.toml", env={}, cwd=tmp_path) == tmp_path / "x.toml"
    assert find_config_file(env={}, cwd=tmp_path) is None


def test_json_comments_are_allowed_but_not_inside_strings(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.json",
        """{
      // line comment
      "target": "pod/a", /* block
      comment */ "feature": {"env": {"override": {"URL": "http://x//y/*z*/"}}}
    }""",
    )
    cfg = load_config(path, env={})
    assert cfg.target.path == "pod/a"
    assert cfg.feature.env.override == {"URL": "http://x//y/*z*/"}


def test_templating_get_env_forms(tmp_path: Path) -> None:
    env = {"MRD_TEST_AGENT_NS": "agents", "MRD_TEST_FS_MODE": "write"}
    cfg = load_config(CASES / "templated.json", env=env)
    assert cfg.target.path == "pod/fallback"
    assert cfg.agent.namespace == "agents"
    assert cfg.feature.fs.mode == "write"
    env["MRD_TEST_TARGET"] = "deployment/from-env"
    del env["MRD_TEST_FS_MODE"]
    cfg = load_config(CASES / "templated.json", env=env)
    assert cfg.target.path == "deployment/from-env"
    assert cfg.feature.fs.mode == "read"


def test_templating_works_in_toml_and_yaml(tmp_path: Path) -> None:
    env = {"NS": "n1"}
    toml = _write(tmp_path / "a.toml", '[target]\nnamespace = "{{ get_env("NS") }}"\n')
    yml = _write(tmp_path / "a.yaml", "target:\n  namespace: '{{ get_env(\"NS\") }}'\n")
    assert load_config(toml, env=env).target.namespace == "n1"
    assert load_config(yml, env=env).target.namespace == "n1"


def test_template_value_is_not_evaluated_again(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", '{"target": {"namespace": "{{ get_env("NS") }}"}}')
    cfg = load_config(path, env={"NS": "{{ get_env('OTHER') }}"})
    assert cfg.target.namespace == "{{ get_env('OTHER') }}"


def test_env_vars_override_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.json",
        {
            "target": "pod/file",
            "agent": {"ttl": 3},
            "feature": {"fs": "read", "network": {"incoming": "mirror"}},
        },
    )
    env = {
        "MIRRORD_IMPERSONATED_TARGET": "pod/env",
        "MIRRORD_TARGET_NAMESPACE": "ns-env",
        "MIRRORD_AGENT_NAMESPACE": "agent-ns",
        "MIRRORD_AGENT_IMAGE": "registry/agent:1",
        "MIRRORD_AGENT_TTL": "9",
        "MIRRORD_AGENT_STARTUP_TIMEOUT": "15",
        "MIRRORD_FILE_MODE": "write",
        "MIRRORD_AGENT_TCP_STEAL_TRAFFIC": "true",
        "MIRRORD_REMOTE_DNS": "false",
        "MIRRORD_SKIP_PROCESSES": "bash;node",
        "MIRRORD_KUBE_CONTEXT": "kind-dev",
        "MIRRORD_HTTP_FILTER_PORTS": "8080,9090",
        "MIRRORD_DAEMON_IDLE_TIMEOUT": "2.5",
    }
    cfg = load_config(path, env=env)
    assert cfg.target.path == "pod/env" and cfg.target.namespace == "ns-env"
    assert cfg.agent.namespace == "agent-ns" and cfg.agent.image == "registry/agent:1"
    assert cfg.agent.ttl == 9 and cfg.agent.startup_timeout == 15
    assert cfg.feature.fs.mode == "write"
    assert cfg.feature.network.incoming.mode == "steal"
    assert cfg.feature.network.dns.enabled is False
    assert cfg.skip_processes == ["bash", "node"]
    assert cfg.kube_context == "kind-dev"
    assert cfg.feature.network.incoming.http_filter.ports == [8080, 9090]
    assert cfg.daemon.idle_timeout == 2.5


def test_impersonated_target_beats_mirrord_target_and_empty_is_unset() -> None:
    env = {"MIRRORD_TARGET": "pod/a", "MIRRORD_IMPERSONATED_TARGET": "pod/b"}
    assert load_config(env=env, cwd=Path("/")).target.path == "pod/b"
    env = {"MIRRORD_TARGET": "pod/a", "MIRRORD_IMPERSONATED_TARGET": ""}
    assert load_config(env=env, cwd=Path("/")).target.path == "pod/a"


@pytest.mark.parametrize(
    ("ops", "ro", "mode"),
    [
        ("true", None, "write"),
        ("false", "true", "read"),
        ("false", None, "local"),
        (None, "false", "local"),
    ],
)
def test_legacy_file_ops_switches(ops: str | None, ro: str | None, mode: str) -> None:
    env = {k: v for k, v in (("MIRRORD_FILE_OPS", ops), ("MIRRORD_FILE_RO_OPS", ro)) if v}
    assert load_config(env=env, cwd=Path("/")).feature.fs.mode == mode


def test_env_include_replaces_file_exclude(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", {"feature": {"env": {"exclude": "SECRET"}}})
    cfg = load_config(path, env={"MIRRORD_OVERRIDE_ENV_VARS_INCLUDE": "A;B"})
    assert cfg.feature.env.include == ["A", "B"]
    assert cfg.feature.env.exclude is None


def test_env_include_on_disabled_env_turns_it_on_for_those(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", {"feature": {"env": False}})
    cfg = load_config(path, env={"MIRRORD_OVERRIDE_ENV_VARS_INCLUDE": "ONLY"})
    assert cfg.feature.env.include == ["ONLY"] and cfg.feature.env.enabled


def test_cli_flags_override_env_and_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.json",
        {
            "target": "pod/file",
            "feature": {
                "network": {
                    "incoming": {"mode": "mirror", "ignore_ports": [22]},
                    "outgoing": {"filter": {"local": [":53"]}},
                },
                "env": {"include": ["X"]},
            },
        },
    )
    overrides = cli_overrides(
        target="deployment/flag",
        steal=True,
        fs_mode="local",
        env_exclude="SECRET;TOKEN",
        no_outgoing=True,
        no_remote_dns=True,
        config_file=path,
        target_namespace="fl",
        port_mapping=[(9333, 80)],
    )
    cfg = load_config(
        path,
        env={"MIRRORD_IMPERSONATED_TARGET": "pod/env", "MIRRORD_FILE_MODE": "write"},
        overrides=overrides,
    )
    assert cfg.target.path == "deployment/flag" and cfg.target.namespace == "fl"
    incoming = cfg.feature.network.incoming
    assert incoming.mode == "steal" and incoming.ignore_ports == [22]
    assert incoming.port_mapping == [(9333, 80)]
    assert cfg.feature.fs.mode == "local"
    assert cfg.feature.env.exclude == ["SECRET", "TOKEN"] and cfg.feature.env.include is None
    assert not cfg.feature.network.outgoing.tcp and not cfg.feature.network.outgoing.udp
    assert cfg.feature.network.outgoing.filter is not None  # kept, with a warning
    assert not cfg.feature.network.dns.enabled


def test_cli_overrides_only_contains_given_flags() -> None:
    assert cli_overrides() == {}
    assert cli_overrides(steal=True) == {"feature": {"network": {"incoming": {"mode": "steal"}}}}
    assert cli_overrides(env_include=["A", "B"]) == {"feature": {"env": {"include": ["A", "B"]}}}


def test_overrides_may_use_shorthands_and_ignored_keys() -> None:
    cfg = load_config(
        env={},
        cwd=Path("/"),
        overrides={
            "feature": {"network": {"incoming": "steal"}, "fs": "write"},
            "telemetry": False,
        },
    )
    assert cfg.feature.network.incoming.mode == "steal"
    assert cfg.feature.fs.mode == "write"


def test_warnings(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.json",
        {
            "feature": {
                "network": {
                    "dns": {"enabled": False, "filter": {"local": ["x.com"]}},
                    "incoming": "steal",
                },
                "fs": {"read_only": ["^/a"], "local": ["^/a"]},
            },
        },
    )
    warnings = resolve_config(path, env={}).warnings
    text = "\n".join(warnings)
    assert "feature.network.dns.filter is ignored" in text
    assert "'steal' but there is no target" in text
    assert "'^/a' is in both read_only and local" in text


def test_dollar_schema_key_is_allowed_silently(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", {"$schema": "../docs/mirrord.schema.json"})
    resolved = resolve_config(path, env={})
    assert resolved.warnings == []


def test_yaml_is_read_as_yaml_1_2(tmp_path: Path) -> None:
    # mirrord reads YAML 1.2: `off` is a string (the incoming mode), not false.
    path = _write(tmp_path / "m.yaml", "feature:\n  network:\n    incoming:\n      mode: off\n")
    assert load_config(path, env={}).feature.network.incoming.mode == "off"
    path = _write(tmp_path / "n.yaml", "feature:\n  hostname: no\n")
    with pytest.raises(ConfigError, match=r"feature\.hostname: invalid value 'no'"):
        load_config(path, env={})


def test_config_package_does_no_io_imports() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mirrord.config;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('anyio', 'trio', 'asyncio', 'scapy', 'kubernetes_asyncio', 'aiohttp'));"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_missing_file_named_by_env_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"named by \$MIRRORD_CONFIG_FILE"):
        load_config(env={"MIRRORD_CONFIG_FILE": "gone.json"}, cwd=tmp_path)


def test_command_line_target_completes_a_file_with_an_ephemeral_agent(tmp_path: Path) -> None:
    """The layers are checked together: `-t deployment/web` gives the target a file with
    `agent.ephemeral: true` needs; without one, the file alone is still an error."""
    path = _write(tmp_path / "a.json", {"agent": {"ephemeral": True}})
    cfg = load_config(path, overrides=cli_overrides(target="deployment/web"), env={}, cwd=tmp_path)
    assert cfg.agent.is_ephemeral and cfg.target.path == "deployment/web"
    env_cfg = load_config(path, env={"MIRRORD_IMPERSONATED_TARGET": "pod/api"}, cwd=tmp_path)
    assert env_cfg.target.path == "pod/api"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={}, cwd=tmp_path)
    assert any("agent.ephemeral needs a target" in line for line in caught.value.errors)
    assert str(path) in str(caught.value)
