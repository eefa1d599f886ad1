"""The environment a session's user command starts with.

Owns: fetching the target's environment through the agent (filtered by the config's include /
exclude globs), applying overrides and unsets, the variables that always stay the user's own
(they would break the user's machine: PATH, HOME, loader and interpreter paths), and adding
the layer's variables (`mirrord.layer.layer_env`, docs/layer.md). Does not own the merge with the user's
own environment (the CLI does that, so `LD_PRELOAD` can be appended to the user's value).
"""

from __future__ import annotations

import errno as errno_mod
import fnmatch
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirrord.daemon._exceptions import AgentLost, ChannelLost, ConfigRefused, DaemonError
from mirrord.daemon._link import AgentLink
from mirrord.protocol import messages as m

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig

__all__ = [
    "ENV_REQUEST_TIMEOUT",
    "KEEP_LOCAL",
    "check_layer_settings",
    "fetch_remote_env",
    "filter_for_port",
    "incoming_settings",
    "layer_variables",
    "merge_env",
    "on_concurrent_steal",
    "steal_for_port",
    "unset_names",
]

ENV_REQUEST_TIMEOUT = 30.0
# Never taken from the target: they describe the user's machine, not the pod, or they are
# the layer's own control variables (which socket, session, config and inherited fds the
# layer in the user command uses). Every other `MIRRORD_*` variable of the target is the
# app's, imported like any other (mirrord's scenarios set e.g. `MIRRORD_FAKE_VAR_FIRST`).
KEEP_LOCAL = (
    "PATH",
    "HOME",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
    "TERM",
    "USER",
    "LOGNAME",
    "SHELL",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "PYTHONHOME",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "MIRRORD_LAYER_*",
    "MIRRORD_SESSION",
    "MIRRORD_DONT_LOAD",
    "MIRRORD_RUNTIME_DIR",
)


def env_enabled(config: MirrordConfig) -> bool:
    return config.feature.env.enabled


class _EnvChannel:
    """The owner of the short-lived channel the session's env is read on."""

    def on_incoming(self, msg: m.IncomingConnection) -> None:
        del msg

    def on_conn_reset(self, conn_id: int, errno: int) -> None:
        del conn_id, errno

    def on_channel_closed(self, reason: str) -> None:
        del reason

    def on_traffic_stats(self, msg: m.TrafficStats) -> None:
        del msg


async def fetch_remote_env(link: AgentLink, config: MirrordConfig, pid: int) -> dict[str, str]:
    """The target's environment as filtered by `feature.env.include/exclude`."""
    if not env_enabled(config):
        return {}
    include = config.feature.env.include
    if include is not None and not include:
        return {}  # an empty include list is "none of them" (the agent reads [] as "all")
    exclude = config.feature.env.exclude or []
    channel = link.open_channel(_EnvChannel(), pid=pid, label="session environment")
    try:
        reply = await link.call(
            channel,
            m.EnvRequest(request_id=0, include=include or [], exclude=exclude),
            timeout=ENV_REQUEST_TIMEOUT,
        )
    except TimeoutError:
        raise AgentLost(
            f"{link.handle.description} did not answer the request for the target's "
            f"environment within {ENV_REQUEST_TIMEOUT:g} s (the agent is stopped, stuck or "
            "overloaded, or the connection to it stalled): check the agent (its log, or "
            "`kubectl logs` for a cluster target), then run again"
        ) from None
    except ChannelLost as exc:
        raise AgentLost(f"the agent could not read the target's environment: {exc}") from None
    finally:
        link.close_channel(channel, "environment read")
    if isinstance(reply, m.EnvReply):
        return dict(reply.env)
    if isinstance(reply, m.ErrorReply):
        hint = ""
        if reply.errno == errno_mod.ESRCH:  # what /proc/PID/environ gives for a kernel thread
            hint = (
                "; the target has no environment to read (a kernel thread?) or has exited: "
                "target a process of the application"
            )
        raise AgentLost(
            f"the agent could not read the target's environment: {reply.message} "
            f"({errno_mod.errorcode.get(reply.errno, reply.errno)}){hint}"
        )
    raise AgentLost(f"the agent answered the environment request with {type(reply).__name__}")


def merge_env(
    remote: dict[str, str], config: MirrordConfig, cwd: str | None = None
) -> dict[str, str]:
    """Remote env minus the always-local variables, then `env_file`, `mapping`, `override`,
    and last `unset`."""
    settings = config.feature.env
    include = settings.include or []
    env = {
        k: v
        for k, v in remote.items()
        if not any(fnmatch.fnmatchcase(k, pat) for pat in KEEP_LOCAL)
        or any(fnmatch.fnmatchcase(k, pat) for pat in include if pat != "*")
    }
    if settings.env_file:
        env.update(_read_env_file(Path(cwd or "/") / settings.env_file))
    for pattern, value in settings.mapping.items():
        regex = re.compile(pattern)
        for key in [k for k in env if regex.search(k)]:
            env[key] = value
    env.update(settings.override)
    for name in unset_names(config):
        for key in [k for k in env if k.upper() == name.upper()]:
            del env[key]
    return env


def unset_names(config: MirrordConfig) -> list[str]:
    """`feature.env.unset`: removed from the session's env here, and by the CLI (or the IDE)
    from the user's own environment too (mirrord's use: a local AWS_PROFILE that would make
    the app ignore the target's credentials)."""
    return list(config.feature.env.unset)


_FILTER_CRITERIA = ("header_filter", "path_filter", "method_filter", "all_of", "any_of")


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (optional `export `, quotes stripped, `#` comments)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DaemonError(
            f"cannot read feature.env.env_file {path}: {exc.strerror}; fix the path in the config"
        ) from None
    result: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        result[key.strip()] = value
    return result


def incoming_settings(config: MirrordConfig) -> tuple[str, dict[str, Any] | None]:
    """(mode, http_filter): mode is `mirror`, `steal` or `off`; the filter (steal: which
    requests are stolen; mirror: which requests are copied) is the config's `http_filter`
    object in its JSON shape when it has any criterion, else None."""
    incoming = config.feature.network.incoming
    raw = incoming.http_filter.model_dump(mode="json", exclude_none=True)
    if incoming.mode == "off" or not any(raw.get(k) for k in _FILTER_CRITERIA):
        return incoming.mode, None
    return incoming.mode, raw


def on_concurrent_steal(config: MirrordConfig) -> str:
    """`feature.network.incoming.on_concurrent_steal` ("abort" when unset)."""
    return config.feature.network.incoming.on_concurrent_steal


def filter_for_port(http_filter: dict[str, Any] | None, port: int) -> dict[str, Any] | None:
    """The filter applies only to its `ports` (default 80 and 8080)."""
    if http_filter is None:
        return None
    ports = http_filter.get("ports") or [80, 8080]
    return http_filter if port in ports else None


def steal_for_port(
    config: MirrordConfig, http_filter: dict[str, Any] | None, port: int
) -> tuple[bool, dict[str, Any] | None, str]:
    """How a steal session subscribes `port`: (subscribe?, filter, warning).

    mirrord's rule: with an HTTP filter, only the filter's `ports` are stolen (filtered);
    another port is stolen whole only when `feature.network.incoming.ports` lists it, and
    otherwise stays with the user app alone (not stolen, no traffic from the target)."""
    flt = filter_for_port(http_filter, port)
    if http_filter is None or flt is not None:
        return True, flt, ""
    listed = config.feature.network.incoming.ports
    if listed is not None and port in listed:
        return True, None, ""
    filtered = http_filter.get("ports") or [80, 8080]
    return (
        False,
        None,
        f"not stolen: the HTTP filter applies to ports {', '.join(map(str, filtered))} only; "
        "list this port in feature.network.incoming.http_filter.ports to filter it, or in "
        "feature.network.incoming.ports to steal it whole",
    )


def check_layer_settings(config: MirrordConfig) -> None:
    """Refuse, before anything starts, a configuration the layer cannot take: one too large
    for its environment variable or its parser (`LayerSettingsTooLarge` names the limit), or
    a pattern it cannot express. Raises `DaemonError` with code `config_error`."""
    from mirrord.layer import LayerSettings

    try:
        LayerSettings.from_config(config).encode()
    except ValueError as exc:
        raise ConfigRefused(f"the configuration does not fit the layer: {exc}") from None


def layer_variables(
    config: MirrordConfig, *, socket_path: str, session_id: str, debug: bool = False
) -> dict[str, str]:
    """The variables that load and configure the layer in the user command (docs/layer.md).

    `LD_PRELOAD` is only the layer library: the daemon's own environment is not the user's,
    so the CLI appends it to the user's value (`mirrord.cli._sessions.child_env`)."""
    from mirrord.layer import LayerSettings, layer_env

    return dict(
        layer_env(
            socket_path=socket_path,
            session_id=session_id,
            settings=LayerSettings.from_config(config),
            debug=debug,
            existing_preload="",
        )
    )
