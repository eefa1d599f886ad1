"""The configuration model's root: `MirrordConfig`, the daemon's section, the warnings.

Owns: the shape of a resolved configuration (`MirrordConfig` and its top-level keys), the
`daemon` and `experimental` sections, the checks between sections and `config_warnings`. The
sections live beside it by what they model: `_target.py`, `_agent.py`, `_feature.py`
(environment and files), `_network.py` (incoming, outgoing, DNS); their value types and base
in `_values.py`. Together they are mirrord's key names and shorthands as pydantic v2 models:
the shorthands mirrord accepts (`"fs": "read"`, `"incoming": "steal"`, `"outgoing": false`,
`"env": false`, `"dns": false`, `"target": "pod/x"`), per-value checks (regexes compile,
address filters parse, ports are ports) and the conflicts between keys. A validated model is
always normalised: every shorthand expanded, lists are lists, the target path is a string;
`model_dump(mode="json")` of it validates back to an equal model (that is how it crosses to
the daemon).
Does not own: reading files, templating, environment variables or CLI flags (`_loader.py`), and
turning pydantic's errors into messages (`_errors.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from mirrord.config._agent import AgentConfig
from mirrord.config._feature import FeatureConfig
from mirrord.config._incoming_tls import tls_warnings
from mirrord.config._target import TargetConfig
from mirrord.config._values import NameList, Seconds, _Section

__all__ = [
    "DaemonConfig",
    "ExperimentalConfig",
    "MirrordConfig",
    "config_warnings",
]

LogLevel = Literal["debug", "info", "warning", "error"]


class DaemonConfig(_Section):
    """mirrordd, the per-user daemon sessions share (not in mirrord)."""

    idle_timeout: Seconds = Field(
        default=300.0,
        description="Seconds the daemon stays up with no session (0: exit with the last session).",
    )
    agent_linger: Seconds = Field(
        default=60.0,
        description="Seconds an agent is kept after its last "
        "session, for a quick restart to reuse it.",
    )
    log_level: LogLevel = Field(
        default="info", description="Daemon log level: 'debug', 'info', 'warning' or 'error'."
    )


class ExperimentalConfig(_Section):
    """Switches for features still being built (mirrord's own experimental keys are ignored)."""

    syscall_supervisor: bool | None = Field(
        default=None,
        description="Run the command under the system-call supervisor (seccomp), so that "
        "programs that bypass libc (static binaries, Go) get the target's files: true "
        "(as `mirrord run --syscalls`), false (never), unset (for statically linked "
        "executables only). Not in mirrord.",
    )


class MirrordConfig(_Section):
    """A resolved mirrord configuration (defaults < file < MIRRORD_* env < CLI flags)."""

    target: TargetConfig = Field(
        default_factory=TargetConfig,
        description="What to impersonate: a string or {path, namespace}.",
    )
    agent: AgentConfig = Field(default_factory=AgentConfig, description="The agent.")
    feature: FeatureConfig = Field(
        default_factory=FeatureConfig, description="What the user app sees of the target."
    )
    kubeconfig: str | None = Field(
        default=None, description="Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)."
    )
    accept_invalid_certificates: bool | None = Field(
        default=None,
        description="Accept an API server certificate that does not verify (self-signed). "
        "Unset: as the kubeconfig says (`insecure-skip-tls-verify`).",
    )
    kube_context: str | None = Field(
        default=None, description="Context in the kubeconfig (default: its current context)."
    )
    skip_processes: NameList = Field(
        default_factory=list,
        description="Programs (names) the layer does not load into (list or 'a;b').",
    )
    skip_build_tools: bool = Field(
        default=True,
        description="Do not load into build tools (cc, ld, go, cargo, …) started by the command.",
    )
    daemon: DaemonConfig = Field(
        default_factory=DaemonConfig, description="mirrordd, the per-user daemon."
    )
    experimental: ExperimentalConfig = Field(
        default_factory=ExperimentalConfig, description="Features still being built."
    )

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> MirrordConfig:
        # Checks between sections hold for the whole configuration, not for one of its layers:
        # a file with `agent.ephemeral: true` is completed by `-t deployment/web`
        # (`resolve_config` validates each layer with `{"layer": True}`, then the result).
        if isinstance(info.context, dict) and info.context.get("layer"):
            return self
        if self.agent.is_ephemeral and self.target.is_targetless:
            raise PydanticCustomError(
                "conflict",
                "agent.ephemeral needs a target (an ephemeral container is added "
                "to the target pod); set target or agent.ephemeral: false",
                {},
            )
        if self.agent.is_ephemeral and self.target.is_local:
            raise PydanticCustomError(
                "conflict",
                "agent.ephemeral does not apply to a local target {t}",
                {"t": repr(self.target.path)},
            )
        return self


def config_warnings(cfg: MirrordConfig) -> list[str]:
    """Things that are allowed but probably not what the user meant."""
    out: list[str] = []
    net = cfg.feature.network
    if net.dns.filter is not None and not net.dns.enabled:
        out.append(
            "feature.network.dns.filter is ignored because feature.network.dns.enabled is false"
        )
    filt = net.outgoing.filter
    if filt is not None and not (net.outgoing.tcp or net.outgoing.udp):
        out.append("feature.network.outgoing.filter is ignored because tcp and udp are false")
    if net.incoming.http_filter.is_set and net.incoming.mode == "off":
        out.append("feature.network.incoming.http_filter is ignored because incoming.mode is 'off'")
    out += tls_warnings(net.incoming.mode, net.incoming.http_filter.is_set, net.incoming.tls_steal)
    if net.incoming.mode == "steal" and cfg.target.is_targetless:
        out.append(
            "feature.network.incoming.mode is 'steal' but there is no target: there is "
            "no traffic to steal in targetless mode"
        )
    fs = cfg.feature.fs
    lists: dict[str, list[str]] = {
        "read_write": fs.read_write,
        "read_only": fs.read_only,
        "local": fs.local,
        "not_found": fs.not_found,
    }
    seen: dict[str, str] = {}
    for key, patterns in lists.items():
        for pattern in patterns:
            if pattern in seen and seen[pattern] != key:
                out.append(
                    f"feature.fs: pattern {pattern!r} is in both {seen[pattern]} and "
                    f"{key}; which one applies is unspecified"
                )
            seen.setdefault(pattern, key)
    if cfg.feature.env.include is not None and cfg.feature.env.include == []:
        out.append("feature.env.include is empty: no remote variable is used")
    return out
