"""The committed schema is current, describes the shorthands, and every key is documented."""

from __future__ import annotations

import json
from pathlib import Path

from mirrord.config import config_schema, schema_key_paths

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_committed_schema_is_current() -> None:
    committed = json.loads((DOCS / "mirrord.schema.json").read_text())
    assert committed == config_schema(), (
        "docs/mirrord.schema.json is stale: run `mirrord schema > docs/mirrord.schema.json`"
    )


def test_every_schema_key_is_documented() -> None:
    doc = (DOCS / "configuration.md").read_text()
    missing = [path for path in schema_key_paths() if f"`{path}`" not in doc]
    assert not missing, f"docs/configuration.md does not mention: {missing}"


def test_schema_lists_the_main_keys() -> None:
    paths = set(schema_key_paths())
    for key in (
        "target.path",
        "target.namespace",
        "feature.env.include",
        "feature.env.env_file",
        "feature.fs.mode",
        "feature.fs.not_found",
        "feature.network.incoming.mode",
        "feature.network.incoming.http_filter.header_filter",
        "feature.network.incoming.http_filter.any_of[].method",
        "feature.network.incoming.on_concurrent_steal",
        "feature.network.outgoing.filter.local",
        "feature.network.outgoing.unix_streams",
        "feature.network.dns.filter.remote",
        "feature.hostname",
        "agent.nftables",
        "agent.clean_iptables_on_start",
        "agent.tolerations",
        "agent.resources.limits.memory",
        "kubeconfig",
        "kube_context",
        "skip_processes",
        "skip_build_tools",
        "daemon.idle_timeout",
        "daemon.agent_linger",
        "daemon.log_level",
    ):
        assert key in paths, key


def test_schema_accepts_shorthands_for_editors() -> None:
    schema = config_schema()
    defs = schema["$defs"]
    incoming = defs["IncomingConfig"]["anyOf"]
    assert {"type": "boolean"} in incoming
    assert {"enum": ["mirror", "steal", "off"], "type": "string"} in incoming
    assert any(v.get("type") == "object" for v in incoming)
    assert {"type": "boolean"} in defs["OutgoingConfig"]["anyOf"]
    assert {"type": "boolean"} in defs["EnvConfig"]["anyOf"]
    assert {"type": "string"} in defs["TargetConfig"]["anyOf"]
    assert schema["additionalProperties"] is False
    assert "$schema" in schema["properties"]


def test_every_environment_variable_sets_a_real_key_and_is_documented() -> None:
    from mirrord.config import ENV_VARS

    doc = (DOCS / "configuration.md").read_text()
    paths = set(schema_key_paths())
    for var in ENV_VARS:
        assert ".".join(var.path) in paths, var
        assert f"`{var.name}`" in doc, var.name
    assert "`MIRRORD_CONFIG_FILE`" in doc


def test_every_ignored_mirrord_key_is_documented_and_not_a_real_key() -> None:
    from mirrord.config._loader import IGNORED_KEYS

    doc = (DOCS / "configuration.md").read_text()
    section = doc[doc.index("## mirrord keys that are ignored") :]
    paths = set(schema_key_paths())
    for parent, keys in IGNORED_KEYS.items():
        for key in keys:
            assert f"`{key}`" in section, key
            assert ".".join((*parent, key)) not in paths, key
