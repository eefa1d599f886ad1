"""The `target` section: what to impersonate.

Owns: `TargetConfig`, the target string's forms and kinds and its normalisation to one
canonical string (`normalise_target_path`). Does not own resolving a target to a pod (the
Kubernetes backend) or a process (the agent).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from mirrord.config._values import _Section, _shorthand_error

__all__ = ["LOCAL_TARGET_KINDS", "TARGET_KINDS", "TargetConfig", "normalise_target_path"]

TARGET_KINDS = (
    "pod",
    "deployment",
    "rollout",
    "job",
    "cronjob",
    "statefulset",
    "service",
    "replicaset",
)
LOCAL_TARGET_KINDS = ("pid", "container")
_KIND_ALIASES = {"deploy": "deployment"}
_TARGET_FORMS = (
    "'targetless', 'KIND/NAME' or 'KIND/NAME/container/CONTAINER' with KIND one of "
    + ", ".join(TARGET_KINDS)
    + ", or a local 'pid/N' or 'container/ID'"
)
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _target_error(value: Any, why: str) -> PydanticCustomError:
    return PydanticCustomError(
        "target",
        "{value}: {why}; expected {forms}",
        {"value": repr(value), "why": why, "forms": _TARGET_FORMS},
    )


def normalise_target_path(value: Any) -> str:
    """`"pod/x"`, `{"pod": "x", "container": "c"}`, `"deploy/x"`… → the canonical string."""
    if isinstance(value, dict):
        kinds = [k for k in value if k in TARGET_KINDS]
        extra = [k for k in value if k not in TARGET_KINDS and k != "container"]
        if len(kinds) != 1 or extra or not all(isinstance(v, str) for v in value.values()):
            raise _target_error(
                value,
                "an object target path has exactly one KIND key "
                "(and optionally 'container'), all strings",
            )
        text = f"{kinds[0]}/{value[kinds[0]]}"
        if "container" in value:
            text += f"/container/{value['container']}"
        value = text
    if not isinstance(value, str):
        raise _target_error(value, "not a string")
    if value == "targetless":
        return value
    parts = value.split("/")
    kind = _KIND_ALIASES.get(parts[0], parts[0])
    if kind in LOCAL_TARGET_KINDS and len(parts) == 2:
        if kind == "pid" and not (parts[1].isdigit() and int(parts[1]) > 0):
            raise _target_error(value, f"pid {parts[1]!r} is not a positive number")
        if not parts[1]:
            raise _target_error(value, "the container id is empty")
        return f"{kind}/{parts[1]}"
    if kind not in TARGET_KINDS:
        if len(parts) == 1:
            guess = f"'pod/{value}'"
            if value.isdigit() and int(value) > 0:  # a process id as often as a pod name
                guess = f"'pid/{value}' or 'pod/{value}'"
            raise _target_error(value, f"no kind given (did you mean {guess}?)")
        raise _target_error(value, f"unknown kind {parts[0]!r}")
    if len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "container"):
        raise _target_error(value, "wrong number of '/'-separated parts")
    for name in parts[1::2]:
        if not _K8S_NAME.match(name):
            raise _target_error(value, f"{name!r} is not a valid Kubernetes name")
    return "/".join([kind, *parts[1:]])


class TargetConfig(_Section):
    """What to impersonate. `target: "pod/x"` is short for `target: {path: "pod/x"}`."""

    _shorthand_doc = "a target string or an object with 'path' and 'namespace'"
    _shorthand_schema = [{"type": "string"}]

    path: Annotated[
        str | None,
        BeforeValidator(lambda v: None if v is None else normalise_target_path(v)),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "properties": {k: {"type": "string"} for k in (*TARGET_KINDS, "container")},
                        "additionalProperties": False,
                        "minProperties": 1,
                    },
                    {"type": "null"},
                ]
            }
        ),
    ] = Field(
        default=None,
        description="The target: 'targetless', 'pod/NAME[/container/C]', 'deployment/NAME', "
        "'statefulset/NAME', 'rollout/NAME', 'job/NAME', 'cronjob/NAME', 'service/NAME', "
        "'replicaset/NAME', or a local 'pid/N' / 'container/ID'. Also an object like "
        '{"pod": "x", "container": "c"}. Unset means targetless.',
    )
    namespace: str | None = Field(
        default=None,
        description="Namespace of the target (targetless: where the agent runs). "
        "Defaults to the kube context's namespace.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            return {"path": value}
        if (
            isinstance(value, dict)
            and not {"path", "namespace"} & value.keys()
            and any(k in TARGET_KINDS for k in value)
        ):
            return {"path": value}
        if not isinstance(value, dict | TargetConfig):
            raise _shorthand_error(cls._shorthand_doc, value)
        return value

    @property
    def kind(self) -> str | None:
        """ "pod", "deployment", …, "pid", "container", "targetless", or None when unset."""
        if self.path is None:
            return None
        return self.path.split("/")[0]

    @property
    def name(self) -> str | None:
        """The resource name (or pid / container id); None for targetless and unset."""
        if self.path is None or self.path == "targetless":
            return None
        return self.path.split("/")[1]

    @property
    def container(self) -> str | None:
        """The container named with `/container/C`, if any."""
        if self.path is None:
            return None
        parts = self.path.split("/")
        return parts[3] if len(parts) == 4 else None

    @property
    def is_targetless(self) -> bool:
        return self.path is None or self.path == "targetless"

    @property
    def is_local(self) -> bool:
        """True for `pid/N` and `container/ID` targets (an agent on this machine)."""
        return self.kind in LOCAL_TARGET_KINDS
