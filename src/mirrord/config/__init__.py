"""Configuration: mirrord's `mirrord.json` / `.toml` / `.yaml` keys, env overrides, CLI flags.

Owns: the config model (`MirrordConfig`, mirrord's key names and shorthands), loading it with
precedence defaults < file < `MIRRORD_*` environment < CLI flags (`load_config`,
`cli_overrides`), validation with errors that name the file, key path, value and what is
allowed (`ConfigError`), and the JSON schema (`config_schema`).
Does not own: acting on the settings (layer, daemon, agent, kube backend read the model) or
the compact string the layer's C side parses (`mirrord.layer`).

The resolved config crosses to the daemon as `cfg.model_dump(mode="json")` and back with
`MirrordConfig.model_validate`.
"""

from __future__ import annotations

from mirrord.config._agent import AgentConfig
from mirrord.config._exceptions import ConfigError
from mirrord.config._feature import EnvConfig, FeatureConfig, FsConfig
from mirrord.config._filters import AddressFilter, check_regex, parse_address_filter, python_regex
from mirrord.config._loader import (
    ENV_VARS,
    ResolvedConfig,
    cli_overrides,
    env_overrides,
    find_config_file,
    load_config,
    read_config_file,
    resolve_config,
)
from mirrord.config._model import DaemonConfig, ExperimentalConfig, MirrordConfig, config_warnings
from mirrord.config._network import (
    DnsConfig,
    DnsFilterConfig,
    HttpFilterConfig,
    IncomingConfig,
    InnerHttpFilter,
    NetworkConfig,
    OutgoingConfig,
    OutgoingFilterConfig,
)
from mirrord.config._schema import config_schema, schema_key_paths
from mirrord.config._target import TARGET_KINDS, TargetConfig

__all__ = [
    "ENV_VARS",
    "TARGET_KINDS",
    "AddressFilter",
    "AgentConfig",
    "ConfigError",
    "DaemonConfig",
    "DnsConfig",
    "DnsFilterConfig",
    "EnvConfig",
    "ExperimentalConfig",
    "FeatureConfig",
    "FsConfig",
    "HttpFilterConfig",
    "IncomingConfig",
    "InnerHttpFilter",
    "MirrordConfig",
    "NetworkConfig",
    "OutgoingConfig",
    "OutgoingFilterConfig",
    "ResolvedConfig",
    "TargetConfig",
    "check_regex",
    "cli_overrides",
    "config_schema",
    "config_warnings",
    "env_overrides",
    "find_config_file",
    "load_config",
    "parse_address_filter",
    "python_regex",
    "read_config_file",
    "resolve_config",
    "schema_key_paths",
]
