"""Config files in the style of mirrord's own tests/configs load and mean what they mean there."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrord.config import MirrordConfig, load_config, resolve_config

CASES = Path(__file__).parent / "cases"


def _load(name: str) -> MirrordConfig:
    return load_config(CASES / name, env={})


def test_http_filter_header_steals_matching_requests_on_default_ports() -> None:
    incoming = _load("http_filter_header.json").feature.network.incoming
    assert incoming.mode == "steal"
    assert incoming.http_filter.header_filter == "x-filter: yes"
    assert incoming.http_filter.path_filter is None
    assert incoming.http_filter.is_set
    assert incoming.http_filter.ports == [80, 8080]


def test_http_filter_header_with_mirror_mode() -> None:
    incoming = _load("http_filter_header_mirror.json").feature.network.incoming
    assert incoming.mode == "mirror"
    assert incoming.http_filter.header_filter == "x-filter: yes"


def test_http_filter_path() -> None:
    incoming = _load("http_filter_path.json").feature.network.incoming
    assert incoming.mode == "steal"
    assert incoming.http_filter.path_filter == "api/v1"
    assert incoming.http_filter.header_filter is None


def test_outgoing_filter_local_keeps_port_local_and_rest_remote() -> None:
    outgoing = _load("outgoing_filter_local.json").feature.network.outgoing
    assert outgoing.tcp and outgoing.udp
    assert outgoing.filter is not None
    assert outgoing.filter.local == [":31415"]
    assert outgoing.filter.remote is None


def test_outgoing_filter_remote_by_name() -> None:
    outgoing = _load("outgoing_filter_remote.json").feature.network.outgoing
    assert outgoing.filter is not None
    assert outgoing.filter.remote == ["udp-logger"]


def test_default_ide_config_is_the_defaults() -> None:
    cfg = _load("default_ide.json")
    assert cfg == MirrordConfig()
    net = cfg.feature.network
    assert net.incoming.mode == "mirror"
    assert net.outgoing.tcp and net.outgoing.udp
    assert net.dns.enabled
    assert cfg.feature.fs.mode == "read"
    assert cfg.feature.env.enabled
    assert cfg.target.path is None and cfg.target.is_targetless


def test_complete_mirrord_example_loads_and_warns_about_ignored_keys() -> None:
    resolved = resolve_config(CASES / "complete.json", env={})
    cfg = resolved.config
    assert cfg.target.path == "pod/bear-pod"
    assert cfg.target.namespace == "default"
    assert cfg.skip_processes == ["ide-debugger"]
    assert cfg.feature.env.include == ["DATABASE_USER", "PUBLIC_ENV"]
    assert cfg.feature.env.mapping == {".+_TIMEOUT": "1000"}
    assert cfg.feature.fs.mode == "write"
    assert cfg.feature.fs.read_write == [r".+\.json"]
    assert cfg.feature.network.incoming.port_mapping == [(7777, 8888)]
    assert cfg.feature.network.incoming.ignore_ports == [9999, 10000]
    assert cfg.feature.network.outgoing.unix_streams == ["bear.+"]
    dns_filter = cfg.feature.network.dns.filter
    assert dns_filter is not None and dns_filter.local is not None
    assert len(dns_filter.local) == 3
    assert cfg.agent.ttl == 30 and cfg.agent.startup_timeout == 360
    assert cfg.kube_context == "my-cluster"
    # keys mirrord has and this project does not use: each named with the file it is in
    from_file = [w for w in resolved.warnings if w.startswith(str(CASES / "complete.json"))]
    ignored = {w.split(": ", 1)[1].split(" ", 1)[0] for w in from_file}
    assert {"operator", "telemetry", "agent.metrics", "feature.copy_target"} <= ignored
    # and nothing is accepted but unsupported (outgoing.unix_streams used to be)
    unsupported = [w for w in resolved.warnings if w not in from_file]
    assert unsupported == []


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_same_config_in_every_format_is_equal(fmt: str) -> None:
    assert _load(f"same.{fmt}") == _load("same.json")


def test_same_config_values() -> None:
    cfg = _load("same.json")
    assert cfg.target.kind == "deployment"
    assert cfg.target.name == "api"
    assert cfg.target.container == "main"
    assert cfg.feature.env.exclude == ["AWS_*", "SECRET"]
    assert cfg.feature.fs.not_found == [r"\.aws"]
    http = cfg.feature.network.incoming.http_filter
    assert http.any_of is not None
    assert [(f.header, f.path) for f in http.any_of] == [("^x-user: me$", None), (None, "^/debug/")]
    assert cfg.feature.network.outgoing.udp is False
    assert cfg.feature.network.dns.enabled is False
    assert cfg.agent.nftables is True and cfg.agent.clean_iptables_on_start is True
    assert cfg.daemon.idle_timeout == 120.0 and cfg.daemon.log_level == "debug"


@pytest.mark.parametrize(
    ("raw", "check"),
    [
        ({"feature": {"fs": "write"}}, lambda c: c.feature.fs.mode == "write"),
        ({"feature": {"fs": False}}, lambda c: c.feature.fs.mode == "local"),
        ({"feature": {"fs": True}}, lambda c: c.feature.fs.mode == "read"),
        ({"feature": {"env": False}}, lambda c: not c.feature.env.enabled),
        (
            {"feature": {"network": {"incoming": "steal"}}},
            lambda c: c.feature.network.incoming.is_steal,
        ),
        (
            {"feature": {"network": {"incoming": False}}},
            lambda c: c.feature.network.incoming.mode == "off",
        ),
        (
            {"feature": {"network": {"incoming": True}}},
            lambda c: c.feature.network.incoming.mode == "mirror",
        ),
        (
            {"feature": {"network": {"outgoing": False}}},
            lambda c: not c.feature.network.outgoing.tcp and not c.feature.network.outgoing.udp,
        ),
        ({"feature": {"network": {"dns": False}}}, lambda c: not c.feature.network.dns.enabled),
        (
            {"feature": {"network": False}},
            lambda c: (
                c.feature.network.incoming.mode == "off"
                and not c.feature.network.outgoing.tcp
                and not c.feature.network.dns.enabled
            ),
        ),
        ({"target": "pod/x"}, lambda c: c.target.path == "pod/x" and c.target.namespace is None),
        ({"target": "deploy/x"}, lambda c: c.target.path == "deployment/x"),
        ({"target": "targetless"}, lambda c: c.target.is_targetless and c.target.name is None),
        (
            {"target": {"path": {"pod": "x", "container": "c"}, "namespace": "n"}},
            lambda c: c.target.path == "pod/x/container/c" and c.target.namespace == "n",
        ),
        ({"target": {"pod": "x"}}, lambda c: c.target.path == "pod/x"),
        ({"target": "pid/123"}, lambda c: c.target.is_local and c.target.name == "123"),
        ({"target": "container/0123abcd"}, lambda c: c.target.kind == "container"),
        (
            {"agent": {"image": {"registry": "r.io/mirrord", "tag": "1.2"}}},
            lambda c: c.agent.image == "r.io/mirrord:1.2",
        ),
        (
            {"feature": {"network": {"incoming": {"http_filter": {"ports": 9090}}}}},
            lambda c: c.feature.network.incoming.http_filter.ports == [9090],
        ),
        (
            {"feature": {"network": {"incoming": {"http_filter": {"method_filter": "post"}}}}},
            lambda c: c.feature.network.incoming.http_filter.method_filter == "POST",
        ),
        (
            {"feature": {"fs": {"mapping": {"^/home/(?<user>\\S+)/dev": "/srv/${user}"}}}},
            lambda c: len(c.feature.fs.mapping) == 1,
        ),
    ],
)
def test_shorthands(raw: dict[str, object], check: object, tmp_path: Path) -> None:
    import json

    path = tmp_path / "mirrord.json"
    path.write_text(json.dumps(raw))
    cfg = load_config(path, env={})
    assert callable(check) and check(cfg)


@pytest.mark.parametrize(
    "name", ["complete.json", "same.json", "same.toml", "http_filter_path.json"]
)
def test_resolved_config_round_trips_through_json(name: str) -> None:
    cfg = _load(name)
    again = MirrordConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
