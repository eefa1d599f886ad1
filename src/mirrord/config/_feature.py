"""The `feature` section: what the user app sees of the target (environment, files, network).

Owns: `FeatureConfig`, `EnvConfig` (`feature.env`) and `FsConfig` (`feature.fs`). The network
part (`feature.network`) is in `_network.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from mirrord.config._network import NetworkConfig
from mirrord.config._values import (
    FsPatternList,
    NameList,
    Regex,
    _Section,
    expand_shorthand,
)

__all__ = ["EnvConfig", "FeatureConfig", "FsConfig", "FsMode"]


class EnvConfig(_Section):
    """The target's environment in the user app. `env: false` means exclude everything."""

    _shorthand_doc = "true, false or an object"
    _shorthand_schema = [{"type": "boolean"}]

    include: NameList | None = Field(
        default=None,
        description="Only these remote variables (list or 'A;B'; '*' and '?' wildcards)."
        " Mutually exclusive with exclude.",
    )
    exclude: NameList | None = Field(
        default=None,
        description="All remote variables except these (list or 'A;B'; wildcards). "
        "Mutually exclusive with include.",
    )
    override: dict[str, str] = Field(
        default_factory=dict, description="Variables set to these values whatever the target has."
    )
    unset: NameList = Field(
        default_factory=list,
        description="Variables removed from the user app's environment (case-insensitive).",
    )
    env_file: str | None = Field(
        default=None,
        description="A .env file whose variables are added "
        "(after the remote ones, before override).",
    )
    load_from_process: bool | None = Field(
        default=None,
        description="Accepted for compatibility; variables are always fetched before start.",
    )
    mapping: dict[Regex, str] = Field(
        default_factory=dict,
        description="Regex on a variable name → value replacing the remote value.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return expand_shorthand(cls, value, false={"exclude": ["*"]})

    @model_validator(mode="after")
    def _conflicts(self) -> EnvConfig:
        if self.include is not None and self.exclude is not None:
            raise PydanticCustomError(
                "conflict",
                "include and exclude cannot both be set (got include={inc}, "
                "exclude={exc}); keep one of them",
                {"inc": repr(self.include), "exc": repr(self.exclude)},
            )
        return self

    @property
    def enabled(self) -> bool:
        """False when no remote variable is wanted (`env: false`)."""
        return not (self.include is None and self.exclude == ["*"])


# --------------------------------------------------------------------------- feature.fs

FsMode = Literal["local", "localwithoverrides", "read", "write"]


class FsConfig(_Section):
    """Remote files. `fs: "write"` is short for `fs: {mode: "write"}`; true is read, false
    is local."""

    _shorthand_doc = (
        "true, false, one of 'local', 'localwithoverrides', 'read', 'write', or an object"
    )
    _shorthand_schema = [
        {"type": "boolean"},
        {"enum": ["local", "localwithoverrides", "read", "write"], "type": "string"},
    ]

    mode: FsMode = Field(
        default="read",
        description="Default for paths no list matches: 'local', "
        "'localwithoverrides', 'read' (remote, read-only) or 'write'.",
    )
    read_write: FsPatternList = Field(
        default_factory=list, description="Paths (regexes) read and written remotely."
    )
    read_only: FsPatternList = Field(
        default_factory=list,
        description="Paths (regexes) read remotely; opened for writing they are local.",
    )
    local: FsPatternList = Field(default_factory=list, description="Paths (regexes) always local.")
    not_found: FsPatternList = Field(
        default_factory=list, description="Paths (regexes) that appear not to exist (ENOENT)."
    )
    mapping: dict[Regex, str] = Field(
        default_factory=dict,
        description="Regex → replacement applied to a path before anything else ($1, ${name}).",
    )
    readonly_file_buffer: int = Field(
        default=128000,
        ge=0,
        description=(
            "Bytes read ahead at first for a read-only remote file read through its handle "
            "(bigger than the whole-file fetch): 4096 to 1 MiB, doubling while reads are "
            "sequential, up to 8 MiB; 0 disables read-ahead."
        ),
    )
    handover: bool = Field(
        default=True,
        description=(
            "For a local target (pid/N, container/ID): a remote regular file opened by the "
            "agent is handed to the user app itself (reads and writes are native); false "
            "serves every remote file through the agent."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return expand_shorthand(cls, value, false={"mode": "local"}, string_key="mode")


# --------------------------------------------------------------------------- feature


class FeatureConfig(_Section):
    """What the user app sees of the target."""

    env: EnvConfig = Field(
        default_factory=EnvConfig, description="The target's environment variables."
    )
    fs: FsConfig = Field(default_factory=FsConfig, description="The target's files.")
    network: NetworkConfig = Field(
        default_factory=NetworkConfig, description="Incoming, outgoing and DNS."
    )
    hostname: bool = Field(
        default=True, description="gethostname/uname report the target's hostname."
    )
