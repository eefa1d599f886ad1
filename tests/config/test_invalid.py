"""Invalid configurations: each gives a ConfigError whose message names the source, the key path,
the bad value and what is allowed; nothing else ever escapes (no traceback for the user)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrord.config import ConfigError, MirrordConfig, load_config


def _j(data: Any) -> str:
    return json.dumps(data)


# (case id, file name, file text, substrings the message must contain)
INVALID: list[tuple[str, str, str, list[str]]] = [
    # --- unknown keys, with did-you-mean
    (
        "unknown-root-key",
        "m.json",
        _j({"targt": "pod/x"}),
        ["targt", "unknown key", "did you mean 'target'"],
    ),
    (
        "unknown-incoming-key",
        "m.json",
        _j({"feature": {"network": {"incoming": {"ignroe_ports": [1]}}}}),
        [
            "feature.network.incoming.ignroe_ports",
            "did you mean 'ignore_ports'",
            "allowed keys here",
        ],
    ),
    (
        "unknown-fs-key",
        "m.json",
        _j({"feature": {"fs": {"read_onyl": ["x"]}}}),
        ["feature.fs.read_onyl", "did you mean 'read_only'"],
    ),
    (
        "unknown-env-key",
        "m.json",
        _j({"feature": {"env": {"includes": "A"}}}),
        ["feature.env.includes", "did you mean 'include'"],
    ),
    (
        "unknown-agent-key",
        "m.json",
        _j({"agent": {"namepsace": "x"}}),
        ["agent.namepsace", "did you mean 'namespace'"],
    ),
    (
        "unknown-target-key",
        "m.json",
        _j({"target": {"path": "pod/x", "namspace": "a"}}),
        ["target.namspace", "did you mean 'namespace'"],
    ),
    (
        "unknown-inner-filter-key",
        "m.json",
        _j({"feature": {"network": {"incoming": {"http_filter": {"all_of": [{"heder": "x"}]}}}}}),
        ["feature.network.incoming.http_filter.all_of[0].heder", "did you mean 'header'"],
    ),
    (
        "unknown-daemon-key",
        "m.toml",
        "[daemon]\nidle_timout = 3\n",
        ["daemon.idle_timout", "did you mean 'idle_timeout'"],
    ),
    (
        "unknown-key-no-suggestion",
        "m.yaml",
        "feature:\n  zzzzz: 1\n",
        ["feature.zzzzz", "unknown key 'zzzzz'", "allowed keys here: env, fs, network, hostname"],
    ),
    (
        "misplaced-key",
        "m.json",
        _j({"feature": {"incoming": "steal"}}),
        ["feature.incoming", "unknown key 'incoming'", "it belongs at feature.network.incoming"],
    ),
    (
        "misplaced-key-at-root",
        "m.toml",
        '[http_filter]\nheader_filter = "x"\n',
        ["unknown key 'http_filter'", "it belongs at feature.network.incoming.http_filter"],
    ),
    (
        "duplicate-key",
        "m.json",
        '{"feature": {"fs": {"mode": "read", "mode": "write"}}}',
        ["key 'mode' appears twice"],
    ),
    # --- enumerations
    (
        "incoming-mode",
        "m.json",
        _j({"feature": {"network": {"incoming": {"mode": "stael"}}}}),
        ["feature.network.incoming.mode", "'stael'", "did you mean 'steal'", "'mirror'", "'off'"],
    ),
    (
        "incoming-shorthand",
        "m.json",
        _j({"feature": {"network": {"incoming": "copy"}}}),
        ["feature.network.incoming.mode", "'copy'", "'mirror', 'steal' or 'off'"],
    ),
    (
        "fs-mode",
        "m.json",
        _j({"feature": {"fs": {"mode": "raed"}}}),
        ["feature.fs.mode", "'raed'", "did you mean 'read'", "'localwithoverrides'"],
    ),
    (
        "fs-shorthand",
        "m.yaml",
        "feature:\n  fs: readwrite\n",
        ["feature.fs.mode", "'readwrite'", "'write'"],
    ),
    (
        "on-concurrent-steal",
        "m.json",
        _j({"feature": {"network": {"incoming": {"on_concurrent_steal": "kill"}}}}),
        ["feature.network.incoming.on_concurrent_steal", "'kill'", "'abort'", "'override'"],
    ),
    (
        "capability",
        "m.json",
        _j({"agent": {"disabled_capabilities": ["NET_RAWW"]}}),
        ["agent.disabled_capabilities[0]", "'NET_RAWW'", "did you mean 'NET_RAW'"],
    ),
    (
        "pull-policy",
        "m.json",
        _j({"agent": {"image_pull_policy": "Sometimes"}}),
        ["agent.image_pull_policy", "'Sometimes'", "'IfNotPresent'"],
    ),
    (
        "daemon-log-level",
        "m.toml",
        '[daemon]\nlog_level = "verbose"\n',
        ["daemon.log_level", "'verbose'", "'debug', 'info', 'warning' or 'error'"],
    ),
    (
        "method-filter",
        "m.json",
        _j({"feature": {"network": {"incoming": {"http_filter": {"method_filter": "FETCH"}}}}}),
        ["feature.network.incoming.http_filter.method_filter", "'FETCH'", "GET", "PATCH"],
    ),
    # --- types
    (
        "ttl-string",
        "m.json",
        _j({"agent": {"ttl": "30"}}),
        ["agent.ttl", "'30'", "expected an integer"],
    ),
    (
        "bool-as-int",
        "m.json",
        _j({"feature": {"hostname": 1}}),
        ["feature.hostname", "1", "expected true or false"],
    ),
    (
        "outgoing-number",
        "m.json",
        _j({"feature": {"network": {"outgoing": 5}}}),
        ["feature.network.outgoing", "5", "expected true, false or an object"],
    ),
    (
        "env-list",
        "m.json",
        _j({"feature": {"env": [1]}}),
        ["feature.env", "[1]", "expected true, false or an object"],
    ),
    (
        "feature-string",
        "m.json",
        _j({"feature": "all"}),
        ["feature", "'all'", "expected an object"],
    ),
    (
        "override-value-int",
        "m.json",
        _j({"feature": {"env": {"override": {"A": 1}}}}),
        ["feature.env.override.A", "expected a string"],
    ),
    ("top-level-list", "m.json", "[1, 2]", ["top level must be an object", "list"]),
    (
        "skip-processes-number",
        "m.json",
        _j({"skip_processes": 5}),
        ["skip_processes", "5", "expected a list"],
    ),
    # --- ranges
    (
        "port-too-big",
        "m.json",
        _j({"feature": {"network": {"incoming": {"port_mapping": [[1, 70000]]}}}}),
        ["feature.network.incoming.port_mapping[0][1]", "70000", "<= 65535"],
    ),
    (
        "port-zero",
        "m.json",
        _j({"feature": {"network": {"incoming": {"ports": [0]}}}}),
        ["feature.network.incoming.ports[0]", "0", ">= 1"],
    ),
    (
        "port-pair-three",
        "m.json",
        _j({"feature": {"network": {"incoming": {"listen_ports": [[1, 2, 3]]}}}}),
        ["feature.network.incoming.listen_ports[0]", "[1, 2, 3]", "expected a pair [a, b]"],
    ),
    (
        "port-pair-one",
        "m.json",
        '{"feature": {"network": {"incoming": {"port_mapping": [[8080]]}}}}',
        ["feature.network.incoming.port_mapping[0]:", "[8080]", "expected a pair [a, b]"],
    ),
    (
        "negative-idle",
        "m.json",
        _j({"daemon": {"idle_timeout": -1}}),
        ["daemon.idle_timeout", "-1", ">= 0"],
    ),
    (
        "negative-buffer",
        "m.json",
        _j({"feature": {"fs": {"readonly_file_buffer": -5}}}),
        ["feature.fs.readonly_file_buffer", "-5", ">= 0"],
    ),
    # --- regexes
    (
        "bad-header-regex",
        "m.json",
        _j({"feature": {"network": {"incoming": {"http_filter": {"header_filter": "x-("}}}}}),
        [
            "feature.network.incoming.http_filter.header_filter",
            "'x-('",
            "not a valid regular expression",
        ],
    ),
    (
        "bad-path-regex",
        "m.json",
        _j({"feature": {"network": {"incoming": {"http_filter": {"path_filter": "[a"}}}}}),
        ["feature.network.incoming.http_filter.path_filter", "'[a'", "not a valid regular"],
    ),
    (
        "bad-inner-regex",
        "m.json",
        _j({"feature": {"network": {"incoming": {"http_filter": {"any_of": [{"path": "*x"}]}}}}}),
        ["feature.network.incoming.http_filter.any_of[0].path", "'*x'", "not a valid regular"],
    ),
    (
        "bad-fs-regex",
        "m.json",
        _j({"feature": {"fs": {"read_only": ["ok", "(unclosed"]}}}),
        ["feature.fs.read_only[1]", "'(unclosed'", "not a valid regular"],
    ),
    (
        "bad-mapping-key-regex",
        "m.json",
        _j({"feature": {"fs": {"mapping": {"(": "/x"}}}}),
        ["feature.fs.mapping['(']", "not a valid regular"],
    ),
    (
        "bad-unix-stream-regex",
        "m.json",
        _j({"feature": {"network": {"outgoing": {"unix_streams": "a)"}}}}),
        ["feature.network.outgoing.unix_streams[0]", "'a)'"],
    ),
    (
        "fs-lookaround",
        "m.json",
        _j({"feature": {"fs": {"not_found": "^/x(?!y)"}}}),
        ["feature.fs.not_found[0]", "'^/x(?!y)'", "not supported in file patterns"],
    ),
    # --- address filters
    (
        "filter-bad-port",
        "m.json",
        _j({"feature": {"network": {"outgoing": {"filter": {"local": ["tcp://1.1.1.1:99999"]}}}}}),
        ["feature.network.outgoing.filter.local[0]", "99999", "0 to 65535"],
    ),
    (
        "filter-bad-protocol",
        "m.json",
        _j({"feature": {"network": {"outgoing": {"filter": {"remote": ["sctp://db:1"]}}}}}),
        ["feature.network.outgoing.filter.remote[0]", "'sctp'", "'tcp', 'udp'"],
    ),
    (
        "filter-bad-subnet",
        "m.json",
        _j({"feature": {"network": {"outgoing": {"filter": {"remote": ["10.0.0.0/40"]}}}}}),
        ["feature.network.outgoing.filter.remote[0]", "'10.0.0.0/40'", "subnet"],
    ),
    (
        "filter-bad-name",
        "m.json",
        _j({"feature": {"network": {"outgoing": {"filter": {"remote": ["bad name!"]}}}}}),
        ["feature.network.outgoing.filter.remote[0]", "'bad name!'", "hostname"],
    ),
    (
        "dns-filter-protocol",
        "m.json",
        _j({"feature": {"network": {"dns": {"filter": {"local": ["udp://x.com"]}}}}}),
        ["feature.network.dns.filter.local[0]", "'udp://x.com'", "takes no protocol"],
    ),
    # --- targets
    (
        "target-no-kind",
        "m.json",
        _j({"target": "my-pod"}),
        ["target.path", "'my-pod'", "did you mean 'pod/my-pod'", "targetless"],
    ),
    (
        "target-bare-number",
        "m.json",
        _j({"target": "1234"}),
        ["target.path", "'1234'", "did you mean 'pid/1234' or 'pod/1234'"],
    ),
    (
        "target-bad-kind",
        "m.json",
        _j({"target": "pood/x"}),
        ["target.path", "'pood/x'", "unknown kind 'pood'", "deployment"],
    ),
    (
        "target-bad-container-part",
        "m.json",
        _j({"target": "pod/x/cont/c"}),
        ["target.path", "'pod/x/cont/c'", "container/CONTAINER"],
    ),
    (
        "target-bad-name",
        "m.json",
        _j({"target": "pod/My_Pod"}),
        ["target.path", "'My_Pod' is not a valid Kubernetes name"],
    ),
    (
        "target-bad-pid",
        "m.json",
        _j({"target": "pid/abc"}),
        ["target.path", "pid 'abc' is not a positive number"],
    ),
    (
        "target-object-two-kinds",
        "m.json",
        _j({"target": {"path": {"pod": "a", "deployment": "b"}}}),
        ["target.path", "exactly one KIND key"],
    ),
    ("target-number", "m.json", _j({"target": 5}), ["target", "5", "a target string or an object"]),
    # --- conflicts
    (
        "env-include-exclude",
        "m.json",
        _j({"feature": {"env": {"include": "A", "exclude": "B"}}}),
        ["feature.env", "include and exclude cannot both be set", "['A']", "['B']"],
    ),
    (
        "ports-and-ignore-ports",
        "m.json",
        _j({"feature": {"network": {"incoming": {"ports": [80], "ignore_ports": [22]}}}}),
        ["feature.network.incoming", "ports and ignore_ports cannot both be set", "[80]", "[22]"],
    ),
    (
        "two-http-filters",
        "m.json",
        _j(
            {
                "feature": {
                    "network": {
                        "incoming": {"http_filter": {"header_filter": "a", "path_filter": "b"}}
                    }
                }
            }
        ),
        ["feature.network.incoming.http_filter", "only one of", "header_filter, path_filter"],
    ),
    (
        "empty-any-of",
        "m.json",
        _j({"feature": {"network": {"incoming": {"http_filter": {"any_of": []}}}}}),
        ["feature.network.incoming.http_filter", "any_of must not be an empty list"],
    ),
    (
        "inner-filter-two-keys",
        "m.json",
        _j(
            {
                "feature": {
                    "network": {
                        "incoming": {"http_filter": {"all_of": [{"header": "a", "path": "b"}]}}
                    }
                }
            }
        ),
        ["feature.network.incoming.http_filter.all_of[0]", "exactly one of", "header, path"],
    ),
    (
        "outgoing-filter-both",
        "m.json",
        _j({"feature": {"network": {"outgoing": {"filter": {"remote": ["a"], "local": ["b"]}}}}}),
        ["feature.network.outgoing.filter", "exactly one of remote and local", "both"],
    ),
    (
        "dns-filter-neither",
        "m.json",
        _j({"feature": {"network": {"dns": {"filter": {}}}}}),
        ["feature.network.dns.filter", "exactly one of remote and local", "neither"],
    ),
    (
        "port-mapped-twice",
        "m.json",
        _j({"feature": {"network": {"incoming": {"port_mapping": [[80, 1], [80, 2]]}}}}),
        ["feature.network.incoming", "port_mapping maps port 80 twice"],
    ),
    (
        "ephemeral-targetless",
        "m.json",
        _j({"agent": {"ephemeral": True}}),
        ["agent.ephemeral needs a target"],
    ),
    (
        "ephemeral-local-target",
        "m.json",
        _j({"target": "pid/1", "agent": {"ephemeral": True}}),
        ["agent.ephemeral does not apply to a local target", "'pid/1'"],
    ),
    (
        "placement-value",
        "m.json",
        _j({"agent": {"placement": "sidecar"}}),
        ["agent.placement", "'sidecar'", "'job', 'ephemeral' or 'daemonset'"],
    ),
    (
        "placement-contradicts-ephemeral",
        "m.json",
        _j({"target": "pod/x", "agent": {"ephemeral": True, "placement": "job"}}),
        ["agent", "ephemeral: true and placement: 'job' contradict"],
    ),
    (
        "placement-ephemeral-targetless",
        "m.json",
        _j({"agent": {"placement": "ephemeral"}}),
        ["agent.ephemeral needs a target"],
    ),
    (
        "image-object",
        "m.json",
        _j({"agent": {"image": {"registry": "a", "tg": "b"}}}),
        ["agent.image", "'registry' and optionally 'tag'", "'tg'"],
    ),
    # --- syntax, extension, templating
    ("json-syntax", "m.json", '{"target": "pod/x",}', ["line 1", "not valid JSON"]),
    ("toml-syntax", "m.toml", "target = \n", ["not valid TOML"]),
    ("yaml-syntax", "m.yaml", "feature: [unclosed\n", ["not valid YAML", "line"]),
    ("bad-extension", "m.ini", "target=pod/x", ["unsupported file extension '.ini'", ".toml"]),
    (
        "template-missing-var",
        "m.json",
        '{"target": "{{ get_env(\\"MRD_TEST_UNSET_VAR\\") }}"}',
        ["line 1", "MRD_TEST_UNSET_VAR", "not set and no default"],
    ),
    (
        "template-other-expression",
        "m.json",
        '{"target": "{{ 7 * 7 }}"}',
        ["unsupported template expression", "get_env"],
    ),
    (
        "template-block-tag",
        "m.yaml",
        "{% if true %}target: pod/x{% endif %}\n",
        ["template tags", "not supported"],
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "expected"), [pytest.param(n, t, e, id=i) for i, n, t, e in INVALID]
)
def test_invalid_config_message(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert info.value.errors, message
    for line in info.value.errors:
        assert line.startswith(str(path)), line  # every line names the file
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert "Traceback" not in message


def test_there_are_at_least_forty_invalid_cases() -> None:
    assert len(INVALID) >= 40
    assert len({i for i, *_ in INVALID}) == len(INVALID)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"MIRRORD_AGENT_TTL": "soon"},
            ["environment variable MIRRORD_AGENT_TTL", "agent.ttl", "'soon'", "integer"],
        ),
        (
            {"MIRRORD_FILE_MODE": "rw"},
            ["environment variable MIRRORD_FILE_MODE", "feature.fs.mode", "'rw'", "'write'"],
        ),
        (
            {"MIRRORD_AGENT_TCP_STEAL_TRAFFIC": "maybe"},
            ["MIRRORD_AGENT_TCP_STEAL_TRAFFIC", "feature.network.incoming.mode", "'maybe'"],
        ),
        (
            {"MIRRORD_REMOTE_DNS": "perhaps"},
            ["MIRRORD_REMOTE_DNS", "feature.network.dns.enabled", "'perhaps'", "true or false"],
        ),
        (
            {"MIRRORD_IMPERSONATED_TARGET": "nopod"},
            ["MIRRORD_IMPERSONATED_TARGET", "target.path", "'nopod'"],
        ),
        (
            {"MIRRORD_HTTP_HEADER_FILTER": "(("},
            ["MIRRORD_HTTP_HEADER_FILTER", "http_filter.header_filter", "not a valid regular"],
        ),
    ],
)
def test_invalid_environment_variable_is_named(env: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env, cwd=Path("/"))
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_invalid_override_is_attributed_to_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, cwd=Path("/"), overrides={"feature": {"fs": {"mode": "rw"}}})
    assert info.value.errors[0].startswith("command line: feature.fs.mode")


def test_all_problems_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(_j({"agent": {"ttl": "x"}, "feature": {"fs": "nope", "bogus": 1}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert len(info.value.errors) == 3


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "mode",
                    "ports",
                    "filter",
                    "local",
                    "remote",
                    "path",
                    "include",
                    "incoming",
                    "fs",
                    "env",
                    "x",
                    "header_filter",
                    "all_of",
                    "network",
                ]
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)
_paths = st.sampled_from(
    [
        (),
        ("target",),
        ("agent",),
        ("feature",),
        ("feature", "env"),
        ("feature", "fs"),
        ("feature", "network"),
        ("feature", "network", "incoming"),
        ("feature", "network", "incoming", "http_filter"),
        ("feature", "network", "outgoing"),
        ("feature", "network", "dns"),
        ("daemon",),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=_paths, value=_json)
def test_arbitrary_values_give_config_error_or_a_config(path: tuple[str, ...], value: Any) -> None:
    data: Any = value
    for key in reversed(path):
        data = {key: data}
    try:
        cfg = load_config(env={}, cwd=Path("/"), overrides=data if isinstance(data, dict) else None)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) for e in exc.errors)
    else:
        assert MirrordConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(["json", "toml", "yaml"]),
    text=st.text(
        alphabet=st.sampled_from(list("{}[]:,\"'=\n -#/*!&|>tru01.abmode{}%")), max_size=60
    ),
)
def test_arbitrary_file_text_gives_config_error_or_a_config(fmt: str, text: str) -> None:
    from mirrord.config._loader import parse_config_text, render_template

    try:
        data = parse_config_text(render_template(text, {}, source="f"), fmt, source="f")
        load_config(env={}, cwd=Path("/"), overrides=data)
    except ConfigError as exc:
        assert exc.errors


@pytest.mark.parametrize("fmt", ["json", "yaml", "toml"])
def test_absurdly_nested_file_is_an_error(tmp_path: Path, fmt: str) -> None:
    depth = 100_000
    text = {
        "json": "[" * depth + "]" * depth,
        "yaml": "[" * depth + "]" * depth,
        "toml": "a = " + "[" * depth + "]" * depth,
    }[fmt]
    path = tmp_path / f"m.{fmt}"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path, env={})
