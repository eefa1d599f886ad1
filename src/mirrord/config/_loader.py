"""Finding, reading and layering configuration: defaults < file < MIRRORD_* env < CLI flags.

Owns: config file discovery (`-f`, `$MIRRORD_CONFIG_FILE`, else `.mirrord/mirrord.{json,toml,
yaml}` found upward from the working directory), the `{{ get_env(...) }}` templating, parsing
JSON (with `//` and `/* */` comments), TOML and YAML, mirrord keys we accept but ignore (with a
warning), the `MIRRORD_*` environment variables, the overrides of `mirrord run`'s flags, and
naming the source of every error.
Does not own: the model and its checks (`_model.py`), the wording of validation errors
(`_errors.py`), `KUBECONFIG` (the Kubernetes backend reads it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mirrord.config._errors import Loc, format_validation_error, key_path
from mirrord.config._exceptions import ConfigError
from mirrord.config._model import MirrordConfig, config_warnings

__all__ = [
    "ENV_VARS",
    "ResolvedConfig",
    "cli_overrides",
    "env_overrides",
    "find_config_file",
    "load_config",
    "read_config_file",
    "resolve_config",
]

CONFIG_FILE_ENV = "MIRRORD_CONFIG_FILE"
CONFIG_NAMES = ("mirrord.json", "mirrord.toml", "mirrord.yaml", "mirrord.yml")
_SUFFIXES = {".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}

# ----------------------------------------------------------------------------- ignored keys

# Keys of mirrord's own config that mean nothing here (operator, telemetry, macOS SIP, …).
# Users bring their existing files: these are accepted, removed, and reported as warnings
# instead of failing the whole file.
IGNORED_KEYS: dict[tuple[str, ...], frozenset[str]] = {
    (): frozenset(
        {
            "operator",
            "telemetry",
            "sip_binaries",
            "skip_sip",
            "use_proxy",
            "internal_proxy",
            "external_proxy",
            "profile",
            "key",
            "ci",
            "container",
            "startup_retry",
            "baggage",
            "multi_cluster",
            "api",
            "connect_tcp",
            "skip_extra_build_tools",
            "pause",
        }
    ),
    ("agent",): frozenset(
        {
            "check_out_of_pods",
            "dns",
            "exclude_from_mesh",
            "inject_headers",
            "max_body_buffer_size",
            "max_body_buffer_timeout",
            "metrics",
            "security_context",
            "disable_mesh_sidecar_injection",
            "ipv6",
        }
    ),
    ("feature",): frozenset({"copy_target", "split_queues", "preview", "db_branches", "magic"}),
    # mirrord's older name of `tls_delivery` (which we read): rename it
    ("feature", "network", "incoming"): frozenset({"https_delivery"}),
}
# Editors add "$schema" for completion; it is not a setting.
_SILENT_KEYS: dict[tuple[str, ...], frozenset[str]] = {(): frozenset({"$schema"})}


# `experimental` holds ours (EXPERIMENTAL_KEYS) next to mirrord's own experimental switches,
# which are many and change often: every other key there is ignored with the same warning.
EXPERIMENTAL_KEYS = frozenset({"syscall_supervisor"})


def _drop_ignored(raw: dict[str, Any]) -> list[str]:
    warnings: list[str] = []
    experimental = raw.get("experimental")
    if isinstance(experimental, dict):
        for key in sorted(experimental.keys() - EXPERIMENTAL_KEYS):
            del experimental[key]
            warnings.append(
                f"{key_path(('experimental', key))} is a mirrord setting that mirrord for "
                "Python does not use; ignored"
            )
    for table in (_SILENT_KEYS, IGNORED_KEYS):
        for path, keys in table.items():
            node: Any = raw
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                continue
            for key in sorted(keys & node.keys()):
                del node[key]
                if table is IGNORED_KEYS:
                    warnings.append(
                        f"{key_path((*path, key))} is a mirrord setting that mirrord for Python "
                        "does not use; ignored"
                    )
    return warnings


# ----------------------------------------------------------------------------- templating

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}|\{%|\{#", re.DOTALL)
# A string literal in "..." or '...'; inside a JSON string people may also write \"...\".
_STR = r"(?:\\?\"([^\"\\]*)\\?\"|'([^'\\]*)')"
_GET_ENV = re.compile(
    rf"^\s*get_env\(\s*(?:name\s*=\s*)?{_STR}\s*(?:,\s*(?:default\s*=\s*)?{_STR}\s*)?\)\s*$"
)


def render_template(text: str, env: Mapping[str, str], *, source: str) -> str:
    """Replace `{{ get_env("NAME") }}` / `{{ get_env("NAME", "default") }}` (and mirrord's
    `get_env(name="NAME", default="x")`) with the variable's value. Nothing else is evaluated:
    any other `{{ }}`, `{% %}` or `{# #}` is an error."""
    errors: list[str] = []

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def substitute(match: re.Match[str]) -> str:
        where = f"{source}: line {line_of(match.start())}"
        expr = match.group(1)
        if expr is None:
            errors.append(
                f"{where}: template tags {match.group(0)!r}... are not supported; "
                'only {{ get_env("NAME") }} and {{ get_env("NAME", "default") }} are supported'
            )
            return ""
        call = _GET_ENV.match(expr)
        if call is None:
            errors.append(
                f"{where}: unsupported template expression {{{{{expr}}}}}; only "
                '{{ get_env("NAME") }} and {{ get_env("NAME", "default") }} are supported'
            )
            return ""
        name = call.group(1) if call.group(1) is not None else call.group(2)
        has_default = call.group(3) is not None or call.group(4) is not None
        default = call.group(3) if call.group(3) is not None else call.group(4)
        if name in env:
            return env[name]
        if has_default:
            return default or ""
        errors.append(
            f'{where}: template get_env("{name}"): environment variable {name} is '
            f"not set and no default is given; set {name} or write "
            f'get_env("{name}", "default")'
        )
        return ""

    rendered = _TEMPLATE.sub(substitute, text)
    if errors:
        raise ConfigError(errors, source=source)
    return rendered


# ----------------------------------------------------------------------------- parsing


def _strip_json_comments(text: str) -> str:
    # Comments become spaces (newlines kept) so that the parser's line/column stay right.
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
        elif ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; mirrord (serde) refuses them, and a
    # silently dropped setting is exactly what a config check is for.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: only true/false are booleans and there are
    no base-60 integers. mirrord reads YAML 1.2, where `mode: off` is the string "off" (YAML
    1.1 would make it false) and `80:80` is a string, not 4880."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def parse_config_text(text: str, fmt: str, *, source: str) -> dict[str, Any]:
    """Parse rendered text as `fmt` ("json", "toml" or "yaml") into a dict."""
    data: Any
    try:
        if fmt == "json":
            data = json.loads(_strip_json_comments(text), object_pairs_hook=_no_duplicates)
        elif fmt == "toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass
            if data is None:
                data = {}
    except RecursionError:
        raise ConfigError(
            [f"{source}: nested too deeply to be a configuration"], source=source
        ) from None
    except _DuplicateKeyError as exc:
        raise ConfigError(
            [f"{source}: key {exc.key!r} appears twice in the same object; keep one"], source=source
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{source}: line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}"],
            source=source,
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"], source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}:{where} not valid YAML: {problem}"], source=source) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"{source}: the top level must be an object (key: value table), "
                f"got {_KIND_OF.get(type(data).__name__, type(data).__name__)}"
            ],
            source=source,
        )
    return data


_KIND_OF = {
    "list": "a list",
    "str": "a string",
    "NoneType": "null",
    "int": "a number",
    "float": "a number",
    "bool": "a boolean",
}


def read_config_file(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read, render and parse one config file (format from its extension)."""
    env = os.environ if env is None else env
    source = str(path)
    if path.is_dir():
        raise ConfigError(
            [
                f"{source}: is a directory; give the path of a config file (.json, .toml, .yaml or .yml)"
            ],
            source=source,
        )
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            [
                f"{source}: unsupported file extension {path.suffix!r}; use "
                ".json, .toml, .yaml or .yml"
            ],
            source=source,
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM some Windows editors write is skipped
    except FileNotFoundError:
        raise ConfigError([f"{source}: config file not found"], source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{source}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"],
            source=source,
        ) from None
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read the config file: {exc.strerror or exc}"], source=source
        ) from None
    return parse_config_text(render_template(text, env, source=source), fmt, source=source)


def find_config_file(
    config_file: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Path | None:
    """The file to use: `config_file`, else `$MIRRORD_CONFIG_FILE`, else the nearest
    `.mirrord/mirrord.{json,toml,yaml,yml}` in the working directory or one of its parents."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    if config_file is not None:
        return cwd / Path(config_file)
    if env.get(CONFIG_FILE_ENV):
        return cwd / Path(env[CONFIG_FILE_ENV])
    for directory in (cwd, *cwd.parents):
        for name in CONFIG_NAMES:
            candidate = directory / ".mirrord" / name
            if candidate.is_file():
                return candidate
    return None


# ----------------------------------------------------------------------------- env variables


def _bool(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    return text  # the model rejects it, naming the variable


def _int(text: str) -> Any:
    stripped = text.strip()
    return int(stripped) if re.fullmatch(r"-?\d+", stripped) else text


def _float(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _list(text: str) -> Any:
    return [part for part in (p.strip() for p in text.split(";")) if part]


def _int_list(text: str) -> Any:
    return [_int(p) for p in _list(text.replace(",", ";"))]


def _incoming_mode(text: str) -> Any:
    # mirrord: MIRRORD_AGENT_TCP_STEAL_TRAFFIC=true means steal, false means off.
    value = _bool(text)
    if value is True:
        return "steal"
    if value is False:
        return "off"
    return text


def _str(text: str) -> Any:
    return text


@dataclasses.dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    path: tuple[str, ...]
    parse: Any  # Callable[[str], Any]; Any keeps the dataclass simple for mypy


# The MIRRORD_* variables, with mirrord's names. Later entries win over earlier ones for the
# same key (MIRRORD_IMPERSONATED_TARGET over MIRRORD_TARGET).
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("MIRRORD_TARGET", ("target", "path"), _str),
    EnvVar("MIRRORD_IMPERSONATED_TARGET", ("target", "path"), _str),
    EnvVar("MIRRORD_TARGET_NAMESPACE", ("target", "namespace"), _str),
    EnvVar("MIRRORD_AGENT_NAMESPACE", ("agent", "namespace"), _str),
    EnvVar("MIRRORD_ACCEPT_INVALID_CERTIFICATES", ("accept_invalid_certificates",), _bool),
    EnvVar("MIRRORD_OVERRIDE_ENV_FILE", ("feature", "env", "env_file"), _str),
    EnvVar("MIRRORD_AGENT_IMAGE", ("agent", "image"), _str),
    EnvVar("MIRRORD_AGENT_IMAGE_PULL_POLICY", ("agent", "image_pull_policy"), _str),
    EnvVar("MIRRORD_AGENT_TTL", ("agent", "ttl"), _int),
    EnvVar("MIRRORD_EPHEMERAL_CONTAINER", ("agent", "ephemeral"), _bool),
    EnvVar("MIRRORD_AGENT_COMMUNICATION_TIMEOUT", ("agent", "communication_timeout"), _int),
    EnvVar("MIRRORD_AGENT_STARTUP_TIMEOUT", ("agent", "startup_timeout"), _int),
    EnvVar("MIRRORD_AGENT_RUST_LOG", ("agent", "log_level"), _str),
    EnvVar("MIRRORD_AGENT_JSON_LOG", ("agent", "json_log"), _bool),
    EnvVar("MIRRORD_AGENT_NETWORK_INTERFACE", ("agent", "network_interface"), _str),
    EnvVar("MIRRORD_AGENT_STEALER_FLUSH_CONNECTIONS", ("agent", "flush_connections"), _bool),
    EnvVar("MIRRORD_AGENT_DISABLED_CAPABILITIES", ("agent", "disabled_capabilities"), _list),
    EnvVar("MIRRORD_AGENT_CLEAN_IPTABLES_ON_START", ("agent", "clean_iptables_on_start"), _bool),
    EnvVar("MIRRORD_AGENT_PRIVILEGED", ("agent", "privileged"), _bool),
    EnvVar("MIRRORD_AGENT_NFTABLES", ("agent", "nftables"), _bool),
    EnvVar("MIRRORD_AGENT_PLACEMENT", ("agent", "placement"), _str),
    EnvVar("MIRRORD_FILE_MODE", ("feature", "fs", "mode"), _str),
    EnvVar("MIRRORD_FILE_READ_WRITE_PATTERN", ("feature", "fs", "read_write"), _list),
    EnvVar("MIRRORD_FILE_READ_ONLY_PATTERN", ("feature", "fs", "read_only"), _list),
    EnvVar("MIRRORD_FILE_LOCAL_PATTERN", ("feature", "fs", "local"), _list),
    EnvVar("MIRRORD_FILE_HANDOVER", ("feature", "fs", "handover"), _bool),
    EnvVar("MIRRORD_OVERRIDE_ENV_VARS_INCLUDE", ("feature", "env", "include"), _list),
    EnvVar("MIRRORD_OVERRIDE_ENV_VARS_EXCLUDE", ("feature", "env", "exclude"), _list),
    EnvVar("MIRRORD_REMOTE_DNS", ("feature", "network", "dns", "enabled"), _bool),
    EnvVar(
        "MIRRORD_AGENT_TCP_STEAL_TRAFFIC",
        ("feature", "network", "incoming", "mode"),
        _incoming_mode,
    ),
    EnvVar(
        "MIRRORD_HTTP_HEADER_FILTER",
        ("feature", "network", "incoming", "http_filter", "header_filter"),
        _str,
    ),
    EnvVar(
        "MIRRORD_HTTP_PATH_FILTER",
        ("feature", "network", "incoming", "http_filter", "path_filter"),
        _str,
    ),
    EnvVar(
        "MIRRORD_HTTP_FILTER_PORTS",
        ("feature", "network", "incoming", "http_filter", "ports"),
        _int_list,
    ),
    EnvVar("MIRRORD_TCP_OUTGOING", ("feature", "network", "outgoing", "tcp"), _bool),
    EnvVar("MIRRORD_UDP_OUTGOING", ("feature", "network", "outgoing", "udp"), _bool),
    EnvVar("MIRRORD_OUTGOING_HANDOVER", ("feature", "network", "outgoing", "handover"), _bool),
    EnvVar(
        "MIRRORD_OUTGOING_REMOTE_UNIX_STREAMS",
        ("feature", "network", "outgoing", "unix_streams"),
        _list,
    ),
    EnvVar("MIRRORD_ENABLE_IPV6", ("feature", "network", "ipv6"), _bool),
    EnvVar("MIRRORD_HOSTNAME", ("feature", "hostname"), _bool),
    EnvVar("MIRRORD_SKIP_PROCESSES", ("skip_processes",), _list),
    EnvVar("MIRRORD_SKIP_BUILD_TOOLS", ("skip_build_tools",), _bool),
    EnvVar("MIRRORD_KUBECONFIG", ("kubeconfig",), _str),
    EnvVar("MIRRORD_KUBE_CONTEXT", ("kube_context",), _str),
    EnvVar("MIRRORD_DAEMON_IDLE_TIMEOUT", ("daemon", "idle_timeout"), _float),
    EnvVar("MIRRORD_DAEMON_AGENT_LINGER", ("daemon", "agent_linger"), _float),
    EnvVar("MIRRORD_DAEMON_LOG_LEVEL", ("daemon", "log_level"), _str),
)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The patch the `MIRRORD_*` variables make, and which variable set which key path."""
    patch: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for var in ENV_VARS:
        text = env.get(var.name)
        if text is None or text == "":
            continue
        _set(patch, var.path, var.parse(text))
        sources[var.path] = var.name
    # mirrord's older switches, used only when MIRRORD_FILE_MODE is not set:
    # MIRRORD_FILE_OPS=true → write; MIRRORD_FILE_RO_OPS=true → read; both false → local.
    if "MIRRORD_FILE_MODE" not in sources.values():
        ops = _bool(env["MIRRORD_FILE_OPS"]) if env.get("MIRRORD_FILE_OPS") else None
        ro = _bool(env["MIRRORD_FILE_RO_OPS"]) if env.get("MIRRORD_FILE_RO_OPS") else None
        mode = None
        if ops is True:
            mode = "write"
        elif ro is True:
            mode = "read"
        elif ops is False or ro is False:
            mode = "local"
        if mode is not None:
            _set(patch, ("feature", "fs", "mode"), mode)
            sources[("feature", "fs", "mode")] = "MIRRORD_FILE_OPS/MIRRORD_FILE_RO_OPS"
    return patch, sources


# ----------------------------------------------------------------------------- CLI flags


def _names(value: str | list[str] | None) -> list[str] | None:
    """A flag's list of names: given as a list, or as mirrord's "A;B" string."""
    if value is None:
        return None
    return _list(value) if isinstance(value, str) else list(value)


def cli_overrides(
    *,
    target: str | None = None,
    target_namespace: str | None = None,
    agent_namespace: str | None = None,
    agent_image: str | None = None,
    config_file: Path | str | None = None,
    steal: bool = False,
    fs_mode: str | None = None,
    env_include: str | list[str] | None = None,
    env_exclude: str | list[str] | None = None,
    no_outgoing: bool = False,
    no_tcp_outgoing: bool = False,
    no_udp_outgoing: bool = False,
    no_remote_dns: bool = False,
    no_incoming: bool = False,
    ephemeral: bool = False,
    kube_context: str | None = None,
    kubeconfig: str | None = None,
    skip_processes: str | list[str] | None = None,
    port_mapping: list[tuple[int, int]] | None = None,
    agent_log_level: str | None = None,
    agent_ttl: int | None = None,
    agent_startup_timeout: int | None = None,
    accept_invalid_certificates: bool | None = None,
    env_file: str | None = None,
    rw: bool = False,
    context: str | None = None,
    syscalls: bool = False,
) -> dict[str, Any]:
    """Map `mirrord run`'s flags to a config patch (the highest-precedence layer).

    Only flags that were given appear; `config_file` is not a setting (pass it to
    `load_config` as `config_file`) and is accepted here only so a caller can forward all flags.
    """
    del config_file
    if context is not None:  # `--context`, mirrord's name for kube_context
        kube_context = context
    # Each key the flags set, and its value (None: not given). Where two flags set one key,
    # the more specific wins: `--fs-mode` over `--rw`, `--no-incoming` over `--steal`.
    settings: dict[tuple[str, ...], Any] = {
        ("target", "path"): target,
        ("target", "namespace"): target_namespace,
        ("agent", "namespace"): agent_namespace,
        ("agent", "image"): agent_image,
        ("agent", "ephemeral"): True if ephemeral else None,
        ("feature", "network", "incoming", "mode"): (
            "off" if no_incoming else "steal" if steal else None
        ),
        # mirrord's `--rw`: read-write file access
        ("feature", "fs", "mode"): fs_mode if fs_mode is not None else "write" if rw else None,
        ("agent", "log_level"): agent_log_level,
        ("agent", "ttl"): agent_ttl,
        ("agent", "startup_timeout"): agent_startup_timeout,
        ("accept_invalid_certificates",): accept_invalid_certificates,
        ("feature", "env", "env_file"): env_file,
        ("feature", "env", "include"): _names(env_include),
        ("feature", "env", "exclude"): _names(env_exclude),
        ("feature", "network", "outgoing", "tcp"): False
        if no_outgoing or no_tcp_outgoing
        else None,
        ("feature", "network", "outgoing", "udp"): False
        if no_outgoing or no_udp_outgoing
        else None,
        ("feature", "network", "dns", "enabled"): False if no_remote_dns else None,
        ("kube_context",): kube_context,
        ("kubeconfig",): kubeconfig,
        ("skip_processes",): _names(skip_processes),
        ("experimental", "syscall_supervisor"): True if syscalls else None,
        ("feature", "network", "incoming", "port_mapping"): (
            [list(pair) for pair in port_mapping] if port_mapping else None
        ),
    }
    patch: dict[str, Any] = {}
    for path, value in settings.items():
        if value is not None:
            _set(patch, path, value)
    return patch


# ----------------------------------------------------------------------------- layering

# Keys that exclude each other. When a higher layer (env, flags) sets one of them, the others
# inherited from lower layers are cleared: `-s VAR` on the command line replaces the file's
# `exclude` rather than conflicting with it. Within one layer both set is still an error.
_EXCLUSIVE: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("feature", "env"), {"include": None, "exclude": None}),
    (("feature", "network", "incoming"), {"ports": None, "ignore_ports": []}),
    (
        ("feature", "network", "incoming", "http_filter"),
        {
            "header_filter": None,
            "path_filter": None,
            "method_filter": None,
            "all_of": None,
            "any_of": None,
        },
    ),
    (("feature", "network", "outgoing", "filter"), {"remote": None, "local": None}),
    (("feature", "network", "dns", "filter"), {"remote": None, "local": None}),
)


def _merge(base: dict[str, Any], patch: Mapping[str, Any], path: tuple[str, ...] = ()) -> None:
    for group_path, members in _EXCLUSIVE:
        if group_path == path:
            chosen = members.keys() & patch.keys()
            if chosen:
                for other, unset in members.items():
                    if other not in chosen:
                        base[other] = copy.deepcopy(unset)
    for key, value in patch.items():
        current = base.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            _merge(current, value, (*path, key))
        else:
            base[key] = copy.deepcopy(value)


@dataclasses.dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """The outcome of `resolve_config`: the config, warnings for the user, and the file used."""

    config: MirrordConfig
    warnings: list[str]
    source: Path | None


def _validate(data: Any, source_of: Any, *, source: str, layer: bool = False) -> MirrordConfig:
    """`data` as the model; `layer`: one layer of several (file, env, flags), so the checks
    between sections wait for the whole configuration."""
    try:
        return MirrordConfig.model_validate(data, context={"layer": layer})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source_of), source=source) from None


def _source_from(sources: Mapping[tuple[str, ...], str], label: str) -> Any:
    def source_of(loc: Loc) -> str:
        names = [name for path, name in sources.items() if path[: len(loc)] == loc[: len(path)]]
        if names:
            plural = "s" if len(set(names)) > 1 else ""
            return f"environment variable{plural} {', '.join(dict.fromkeys(names))}"
        return label

    return source_of


def resolve_config(
    config_file: Path | str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ResolvedConfig:
    """Build the configuration: defaults < file < `MIRRORD_*` env < `overrides`.

    Raises ConfigError naming the file or variable, the key path, the value and what is
    allowed, for every problem found in the first layer that has any.
    """
    env = os.environ if env is None else env
    path = find_config_file(config_file, env=env, cwd=cwd)
    warnings: list[str] = []
    raw: dict[str, Any] = {}
    label = "defaults"
    if path is not None:
        if config_file is None and env.get(CONFIG_FILE_ENV) and not path.exists():
            raise ConfigError(
                [
                    f"{path}: config file not found (named by ${CONFIG_FILE_ENV}); fix or unset "
                    f"{CONFIG_FILE_ENV}"
                ],
                source=str(path),
            )
        raw = read_config_file(path, env)
        label = str(path)
        warnings.extend(f"{label}: {w}" for w in _drop_ignored(raw))
    last: tuple[Any, str] = (lambda loc: label, label)
    cfg = _validate(raw, last[0], source=label, layer=True)

    patch, sources = env_overrides(env)
    if patch:
        merged = cfg.model_dump(mode="json")
        _merge(merged, patch)
        last = (_source_from(sources, label), "environment")
        cfg = _validate(merged, last[0], source=last[1], layer=True)

    if overrides:
        merged = cfg.model_dump(mode="json")
        extra = copy.deepcopy(dict(overrides))
        _drop_ignored(extra)
        _merge(merged, extra)
        last = (lambda loc: "command line", "command line")
        cfg = _validate(merged, last[0], source=last[1], layer=True)
    # the checks between sections, on the configuration all layers made together
    cfg = _validate(cfg.model_dump(mode="json"), last[0], source=last[1])

    warnings.extend(config_warnings(cfg))
    return ResolvedConfig(config=cfg, warnings=warnings, source=path)


def load_config(
    config_file: Path | str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> MirrordConfig:
    """`resolve_config(...).config`: the configuration without its warnings."""
    return resolve_config(config_file, overrides=overrides, env=env, cwd=cwd).config
